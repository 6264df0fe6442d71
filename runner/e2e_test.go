package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/registry"
)

// The end-to-end tests boot real VMs from the real default image (built on
// first use, cached afterwards). They run when VMHARNESS_E2E=1, as in CI.

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func requireE2E(t *testing.T) {
	t.Helper()
	if os.Getenv("VMHARNESS_E2E") != "1" {
		t.Skip("boots a real VM; set VMHARNESS_E2E=1 (scripts/test does)")
	}
}

// vmharnessBinary builds the runner once per test process.
func vmharnessBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "vmharness-e2e-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "vmharness")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = &buildError{out: string(out), err: err}
		}
	})
	require.NoError(t, buildErr)
	return binPath
}

type buildError struct {
	out string
	err error
}

func (e *buildError) Error() string { return e.err.Error() + ": " + e.out }

// e2eRun is one `vmharness run` process with private runtime and journal dirs.
type e2eRun struct {
	cmd            *exec.Cmd
	stderr         bytes.Buffer
	runtime, jdir  string
	exitCode       int
	elapsed        time.Duration
	start          time.Time
	registryOpened *registry.Registry
}

func startRun(t *testing.T, args ...string) *e2eRun {
	t.Helper()
	bin := vmharnessBinary(t)
	dir := t.TempDir()
	r := &e2eRun{runtime: filepath.Join(dir, "run"), jdir: filepath.Join(dir, "journal")}
	full := append([]string{"run", "--journal-dir", r.jdir}, args...)
	r.cmd = exec.Command(bin, full...)
	r.cmd.Env = append(os.Environ(), "VMHARNESS_RUNTIME_DIR="+r.runtime)
	r.cmd.Stderr = &r.stderr
	r.start = time.Now()
	require.NoError(t, r.cmd.Start())
	t.Cleanup(func() {
		if r.cmd.ProcessState == nil {
			r.cmd.Process.Kill()
			r.cmd.Wait()
		}
	})
	return r
}

func (r *e2eRun) wait(t *testing.T) {
	t.Helper()
	err := r.cmd.Wait()
	r.elapsed = time.Since(r.start)
	r.exitCode = r.cmd.ProcessState.ExitCode()
	if err != nil {
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee)
	}
	t.Logf("vmharness run exited %d after %s:\n%s", r.exitCode, r.elapsed.Round(time.Second), r.stderr.String())
}

// assertNothingLeft checks that a finished run left no QEMU, no work dir
// (overlay, sockets) and no registry entry.
func (r *e2eRun) assertNothingLeft(t *testing.T, qemuPID int) {
	t.Helper()
	if qemuPID > 0 {
		assert.ErrorIs(t, syscall.Kill(qemuPID, 0), syscall.ESRCH, "QEMU pid %d still exists", qemuPID)
	}
	entries, err := os.ReadDir(r.runtime)
	require.NoError(t, err)
	for _, e := range entries {
		assert.False(t, e.IsDir(), "leftover work dir %s", e.Name())
		assert.NotEqual(t, ".json", filepath.Ext(e.Name()), "leftover registry entry %s", e.Name())
	}
}

func testUnitPath(name string) string { return filepath.Join("..", "tests", name) }

func TestE2EExitCodes(t *testing.T) {
	requireE2E(t)
	tests := []struct {
		name     string
		unit     string
		args     []string
		wantCode int
		wantText string
	}{
		{"pass", "boot.service", nil, 0, "PASS"},
		{"fail", "fail.service", nil, 1, "test exited with status 3"},
		{"skip", "skip.service", nil, 77, "SKIP"},
		{"poweroff without success action", "poweroff.service", nil, 1, "VM stopped without the test's success action"},
		{"kernel panic", "panic.service", nil, 1, "guest kernel panicked"},
		{"hang past timeout", "hang.service", []string{"--timeout", "90s"}, 1, "test timed out after 1m30s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := startRun(t, append(tt.args, testUnitPath(tt.unit))...)
			r.wait(t)
			assert.Equal(t, tt.wantCode, r.exitCode)
			assert.Contains(t, r.stderr.String(), tt.wantText)
			r.assertNothingLeft(t, 0)
		})
	}
}

// TestE2ESIGTERM plays Meson's timeout: SIGTERM to the runner while the
// test runs must stop QEMU, report, and leave nothing behind.
func TestE2ESIGTERM(t *testing.T) {
	requireE2E(t)
	r := startRun(t, "--name", "sigterm", testUnitPath("hang.service"))
	reg, err := registry.Open(r.runtime)
	require.NoError(t, err)

	var qemuPID int
	require.Eventually(t, func() bool {
		e, err := reg.Lookup("sigterm")
		qemuPID = e.QEMUPID
		return err == nil && e.QEMUPID > 0
	}, 10*time.Minute, 200*time.Millisecond, "the VM never started")
	// Let the guest get somewhere so there is something to collect.
	time.Sleep(5 * time.Second)

	require.NoError(t, r.cmd.Process.Signal(syscall.SIGTERM))
	done := make(chan struct{})
	go func() { r.wait(t); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("the runner did not exit within 60s of SIGTERM")
	}
	assert.Equal(t, 1, r.exitCode)
	assert.Contains(t, r.stderr.String(), "interrupted")
	r.assertNothingLeft(t, qemuPID)
	// What was collected is kept for the failed run.
	_, err = os.Stat(filepath.Join(r.jdir, "sigterm.console.log"))
	assert.NoError(t, err)
}

// TestE2EJournalKept checks the journal policy end to end: a failed test's
// journal is a real journal file that journalctl reads.
func TestE2EJournalKept(t *testing.T) {
	requireE2E(t)
	r := startRun(t, "--name", "journalfail", testUnitPath("fail.service"))
	r.wait(t)
	require.Equal(t, 1, r.exitCode)
	path := filepath.Join(r.jdir, "journalfail.journal")
	out, err := exec.CommandContext(context.Background(), "journalctl", "--file="+path, "-u", "fail.service", "-o", "json", "--no-pager").Output()
	require.NoError(t, err)
	found := false
	for _, line := range bytes.Split(out, []byte("\n")) {
		var e map[string]any
		if json.Unmarshal(line, &e) == nil && e["MESSAGE"] == "this test fails on purpose" {
			found = true
		}
	}
	assert.True(t, found, "the failing unit's output is not in %s", path)
	assert.Contains(t, r.stderr.String(), "journalctl --file="+path)
}
