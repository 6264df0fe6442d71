package harness

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func requireSWTPM(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("swtpm"); err != nil {
		t.Skip("swtpm is not installed (scripts/install-deps installs it)")
	}
}

func TestNewSWTPMErrors(t *testing.T) {
	_, err := newSWTPM(filepath.Join(t.TempDir(), "no-swtpm"), t.TempDir())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "--tpm: swtpm not found")
	assert.Contains(t, err.Error(), "install the swtpm package")

	long := filepath.Join(t.TempDir(), strings.Repeat("d", 100))
	_, err = newSWTPM("/bin/true", long)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "longer than a Unix socket address holds")
}

func TestSWTPMQEMUArgs(t *testing.T) {
	tpm, err := newSWTPM("/bin/true", "/run/x,y")
	require.NoError(t, err)
	assert.Equal(t, []string{
		"-chardev", "socket,id=chrtpm,path=/run/x,,y/tpm.sock",
		"-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
		"-device", "tpm-crb,tpmdev=tpm0",
	}, tpm.qemuArgs())
	assert.NotContains(t, strings.Join(swtpmArgs(), " "), "/", "no path goes through swtpm's option syntax")
}

// TestSWTPMLifecycle starts a real swtpm, talks to its control channel as
// QEMU would, and checks stop leaves no process, socket or state.
func TestSWTPMLifecycle(t *testing.T) {
	requireSWTPM(t)
	work := t.TempDir()
	tpm, err := newSWTPM("", work)
	require.NoError(t, err)
	require.NoError(t, tpm.start())
	pid := tpm.pid
	require.NoError(t, syscall.Kill(pid, 0), "swtpm runs")

	// CMD_GET_CAPABILITY (1) on the control channel: 4-byte command,
	// answered with a 4-byte capability mask.
	c, err := net.Dial("unix", filepath.Join(work, "tpm.sock"))
	require.NoError(t, err)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	_, err = c.Write([]byte{0, 0, 0, 1})
	require.NoError(t, err)
	buf := make([]byte, 4)
	_, err = c.Read(buf)
	require.NoError(t, err, "swtpm answers on the control socket")
	c.Close()
	entries, err := os.ReadDir(filepath.Join(work, "tpm"))
	require.NoError(t, err)
	t.Logf("state dir: %d entries", len(entries))

	require.NoError(t, tpm.stop())
	assert.ErrorIs(t, syscall.Kill(pid, 0), syscall.ESRCH, "swtpm is gone")
	for _, p := range []string{"tpm.sock", "tpm"} {
		_, err := os.Stat(filepath.Join(work, p))
		assert.ErrorIs(t, err, os.ErrNotExist, p)
	}
	require.NoError(t, tpm.stop(), "stop twice is harmless")
}

// TestSWTPMStartFails checks that a swtpm that dies at once is reported
// with its log and leaves nothing running.
func TestSWTPMStartFails(t *testing.T) {
	dir := t.TempDir()
	fake := filepath.Join(dir, "swtpm")
	require.NoError(t, os.WriteFile(fake, []byte("#!/bin/sh\necho 'swtpm: bad things' >&4\nexit 1\n"), 0o755))
	work := t.TempDir()
	tpm, err := newSWTPM(fake, work)
	require.NoError(t, err)
	if err := tpm.start(); err != nil {
		assert.Contains(t, err.Error(), "swtpm exited at start")
		assert.Contains(t, err.Error(), "swtpm: bad things")
	} else {
		// On a loaded machine the fake may exit after start's short
		// look; QEMU then fails to connect, a harness error as well.
		t.Log("the fake swtpm exited after start looked")
	}
	require.NoError(t, tpm.stop())
	_, err = os.Stat(filepath.Join(work, "tpm.sock"))
	assert.ErrorIs(t, err, os.ErrNotExist)
}
