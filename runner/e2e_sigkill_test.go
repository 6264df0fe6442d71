package runner

import (
	"bytes"
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

// TestE2ESIGKILL plays what Meson does after SIGTERM's grace period and what
// a cancelled CI job does: SIGKILL to the runner while the test runs. QEMU
// must die with it, and the next `vmharness ps` must list no stale VM and
// remove the work dir and registry entry the runner could not.
func TestE2ESIGKILL(t *testing.T) {
	requireE2E(t)
	bin := vmharnessBinary(t)
	r := startRun(t, "--name", "sigkill", testUnitPath("hang.service"))
	entry := r.waitForQEMU(t, "sigkill")
	require.NotEmpty(t, entry.WorkDir)
	require.DirExists(t, entry.WorkDir)
	// Kill it mid-test, with the guest booting and talking to the runner.
	require.Eventually(t, func() bool {
		st, err := os.Stat(filepath.Join(r.jdir, "sigkill.console.log"))
		return err == nil && st.Size() > 0
	}, 5*time.Minute, 200*time.Millisecond, "the guest never wrote to its console")

	require.NoError(t, r.cmd.Process.Signal(syscall.SIGKILL))
	r.wait(t)
	// QEMU may linger as a zombie if nobody reaps orphans; QEMUAlive counts
	// that as gone, and checks the start time against pid reuse.
	require.Eventually(t, func() bool { return !entry.QEMUAlive() }, 5*time.Second, 50*time.Millisecond,
		"QEMU (pid %d) outlived its SIGKILLed runner", entry.QEMUPID)
	require.Eventually(t, func() bool { return len(processesMentioning(t, r.runtime, r.jdir)) == 0 }, 10*time.Second, 100*time.Millisecond,
		"processes of the killed run still run: %v", processesMentioning(t, r.runtime, r.jdir))

	// The runner could not clean up: its entry and work dir are still there.
	assert.FileExists(t, filepath.Join(r.runtime, "sigkill.json"))
	assert.DirExists(t, entry.WorkDir)

	ps := exec.Command(bin, "ps")
	ps.Env = r.env()
	out, err := ps.CombinedOutput()
	require.NoError(t, err, "%s", out)
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	assert.Len(t, lines, 1, "ps lists only its header:\n%s", out)
	assert.NotContains(t, string(out), "sigkill")

	assert.NoDirExists(t, entry.WorkDir)
	r.assertNothingLeft(t, 0)

	ps = exec.Command(bin, "ps", "--json")
	ps.Env = r.env()
	out, err = ps.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Equal(t, "[]", strings.TrimSpace(string(out)))
}

// processesMentioning lists the live (not zombie) processes whose command
// line contains one of paths: QEMU names the work dir, journal-remote the
// journal dir.
func processesMentioning(t *testing.T, paths ...string) []string {
	t.Helper()
	procs, err := filepath.Glob("/proc/[0-9]*")
	require.NoError(t, err)
	var found []string
	for _, p := range procs {
		cmdline, err := os.ReadFile(filepath.Join(p, "cmdline"))
		if err != nil || len(cmdline) == 0 { // gone, or a zombie
			continue
		}
		for _, path := range paths {
			if bytes.Contains(cmdline, []byte(path)) {
				found = append(found, filepath.Base(p)+": "+strings.ReplaceAll(string(cmdline), "\x00", " "))
				break
			}
		}
	}
	return found
}
