package runner

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness"
)

func TestParseRunFlagsDevices(t *testing.T) {
	tests := []struct {
		name         string
		args         []string
		environ      map[string]string
		wantEnv      []harness.EnvVar
		wantDisks    []harness.Disk
		wantFirmware harness.Firmware
		wantTPM      bool
		wantErr      string
	}{
		{name: "defaults", wantFirmware: harness.FirmwareLinux},
		{
			name:         "setenv, and upstream's subtest variables from the environment",
			args:         []string{"--setenv", "A=1", "--setenv", "TEST_MATCH_SUBTEST=flag", "--setenv", "A=2"},
			environ:      map[string]string{"TEST_MATCH_SUBTEST": "env", "TEST_SKIP_SUBTESTS": "x y", "UNRELATED": "no"},
			wantEnv:      []harness.EnvVar{{Name: "TEST_MATCH_SUBTEST", Value: "flag"}, {Name: "TEST_SKIP_SUBTESTS", Value: "x y"}, {Name: "A", Value: "2"}},
			wantFirmware: harness.FirmwareLinux,
		},
		{
			name: "disks, firmware, tpm",
			args: []string{"--disk", "1G", "--disk", "64M,serial=s,bus=virtio-scsi,format=qcow2", "--firmware", "uefi-secure-boot", "--tpm"},
			wantDisks: []harness.Disk{
				{Size: 1 << 30, Serial: "disk1", Format: "raw", Bus: harness.DiskVirtioBlk},
				{Size: 64 << 20, Serial: "s", Format: "qcow2", Bus: harness.DiskVirtioSCSI},
			},
			wantFirmware: harness.FirmwareUEFISecureBoot, wantTPM: true,
		},
		{name: "bad firmware", args: []string{"--firmware", "efi"}, wantErr: `--firmware "efi"`},
		{name: "bad disk", args: []string{"--disk", "1T"}, wantErr: "over the limit"},
		{name: "duplicate serial", args: []string{"--disk", "1G,serial=disk2", "--disk", "1G"}, wantErr: `two disks have the serial "disk2"`},
		{name: "bad env name", args: []string{"--setenv", "A.B=1"}, wantErr: `variable name "A.B"`},
		{name: "bad passed-through value", environ: map[string]string{"TEST_MATCH_SUBTEST": "a\nb"}, wantErr: "control character"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := &cliEnv{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, getenv: func(k string) string { return tt.environ[k] }}
			o, err := parseRunFlags(env, append(tt.args, "t.service"))
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.wantEnv, o.devices.env)
			assert.Equal(t, tt.wantDisks, o.devices.parsedDisks)
			assert.Equal(t, tt.wantFirmware, o.devices.parsedFirmware)
			assert.Equal(t, tt.wantTPM, o.devices.tpm)
		})
	}
}
