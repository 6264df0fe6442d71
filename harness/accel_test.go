package harness

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestChooseAccel(t *testing.T) {
	noDev := errors.New("open /dev/kvm: no such file or directory")
	tests := []struct {
		name    string
		ev      kvmEvidence
		want    string
		wantErr bool
	}{
		{"no /dev/kvm", kvmEvidence{devKVMErr: noDev, cpuFlags: "fpu vmx sse"}, "tcg", false},
		{"paravirtual kvm without vmx", kvmEvidence{cpuFlags: "fpu sse hypervisor", vendorModules: nil}, "tcg", false},
		{"vmx flag but no vendor module", kvmEvidence{cpuFlags: "fpu vmx"}, "tcg", false},
		{"intel", kvmEvidence{cpuFlags: "fpu vmx sse", vendorModules: []string{"kvm_intel"}}, "kvm", false},
		{"amd", kvmEvidence{cpuFlags: "svm fpu", vendorModules: []string{"kvm_amd"}}, "kvm", false},
		{"vmx as a substring only", kvmEvidence{cpuFlags: "fpu vmxfoo", vendorModules: []string{"kvm_intel"}}, "tcg", false},
		{"forced tcg", kvmEvidence{cpuFlags: "vmx", vendorModules: []string{"kvm_intel"}, forced: "tcg"}, "tcg", false},
		{"forced kvm", kvmEvidence{forced: "kvm"}, "kvm", false},
		{"forced kvm without device", kvmEvidence{forced: "kvm", devKVMErr: noDev}, "", true},
		{"bad value", kvmEvidence{forced: "xen"}, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := chooseAccel(tt.ev)
			if tt.wantErr {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got.Name)
			assert.NotEmpty(t, got.Reason)
		})
	}
}
