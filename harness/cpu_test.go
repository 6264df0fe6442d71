package harness

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestTCGCPUModel(t *testing.T) {
	const models = "Available CPUs:\n  x86 erms                   (alias of nothing; a model line, not a flag)\n  x86 max                    Enables all features supported by the accelerator in the current host\n\n"
	tests := []struct {
		name    string
		cpuHelp string
		want    string
	}{
		{"QEMU 7.2 knows erms and fsrm", models + "Recognized CPUID flags:\n  3dnow erms est\n  fsgsbase fsrm fxsr\n\n", "max,erms=off,fsrm=off"},
		{"newer QEMU also knows fsrs", models + "Recognized CPUID flags:\n  erms fsrm\n  fsrs fzrm\n", "max,erms=off,fsrm=off,fsrs=off"},
		{"flags after the section are not flags", "Recognized CPUID flags:\n  sse2\n\nOther:\n  erms\n", "max"},
		{"no flag section", models, "max"},
		{"empty output", "", "max"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, tcgCPUModel(tt.cpuHelp))
		})
	}
}

func TestProbeTCGCPUModelFails(t *testing.T) {
	qemu := filepath.Join(t.TempDir(), "qemu")
	require.NoError(t, os.WriteFile(qemu, []byte("#!/bin/sh\necho 'broken' >&2\nexit 1\n"), 0o755))
	_, err := probeTCGCPUModel(context.Background(), qemu)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "-cpu help")
	assert.Contains(t, err.Error(), "broken", "QEMU's own message is passed on")
}

func TestProbeTCGCPUModelRealQEMU(t *testing.T) {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 is not installed")
	}
	model, err := probeTCGCPUModel(context.Background(), qemu)
	require.NoError(t, err)
	// Every QEMU from 7.2 on knows these two; if one is missing, the
	// parser no longer understands -cpu help.
	assert.Contains(t, model, "erms=off")
	assert.Contains(t, model, "fsrm=off")
}
