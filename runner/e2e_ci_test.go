package runner

import (
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/registry"
	"github.com/vmharness/vmharness/report"
	"github.com/vmharness/vmharness/shard"
)

// End-to-end tests of what CI relies on: infrastructure retries, VM
// admission and shards. They boot real VMs when VMHARNESS_E2E=1.

// TestE2ERetryAfterQEMUKilled kills QEMU with SIGKILL mid-boot (what the
// OOM killer does): the runner runs the test again, the test passes, and
// the first attempt's journal and console log are kept as try1 files.
func TestE2ERetryAfterQEMUKilled(t *testing.T) {
	requireE2E(t)
	// Alongside the other CI tests: each boots its VMs one after the
	// other, in its own runtime directory.
	t.Parallel()
	rdir := filepath.Join(t.TempDir(), "reports")
	r := startRun(t, "--name", "retry", "--timeout", "8m", "--report-dir", rdir, testUnitPath("boot.service"))
	entry := r.waitForQEMU(t, "retry")
	// Mid-boot: PID 1 runs on the real root (it logs to the console
	// until journald is up), the test unit has not run yet.
	console := filepath.Join(r.jdir, "retry.console.log")
	require.Eventually(t, func() bool {
		data, err := os.ReadFile(console)
		return err == nil && strings.Contains(string(data), "systemd[1]: ")
	}, 5*time.Minute, 200*time.Millisecond, "PID 1 never started")
	require.NoError(t, syscall.Kill(entry.QEMUPID, syscall.SIGKILL))

	r.wait(t)
	out := r.stderr.String()
	assert.Equal(t, 0, r.exitCode)
	assert.Contains(t, out, "retry: FAIL: QEMU was killed by signal killed")
	assert.Contains(t, out, "retry: RETRY: QEMU itself failed before the test had a result (QEMU was killed by signal killed); running the test again (attempt 2 of 2); its files are kept as retry.try1.journal, retry.try1.console.log")
	assert.Contains(t, out, "retry: PASS")
	assert.Equal(t, 1, strings.Count(out, "RETRY"), "retried once")
	assert.FileExists(t, filepath.Join(r.jdir, "retry.try1.console.log"))
	try1 := filepath.Join(r.jdir, "retry.try1.journal")
	require.FileExists(t, try1)
	boots, err := exec.Command("journalctl", "--file="+try1, "--list-boots", "--no-pager").CombinedOutput()
	require.NoError(t, err, "the first attempt's journal is readable: %s", boots)
	r.assertNothingLeft(t, entry.QEMUPID)

	rep, err := report.Read(filepath.Join(rdir, "retry", report.FileName))
	require.NoError(t, err)
	assert.Equal(t, "pass", rep.Result)
	require.Len(t, rep.Attempts, 2)
	assert.True(t, rep.Attempts[0].Retried)
	assert.Equal(t, 99, rep.Attempts[0].ExitCode)
	assert.Equal(t, []string{"retry.try1.journal", "retry.try1.console.log"}, rep.Attempts[0].Files)
	assert.False(t, rep.Attempts[1].Retried)
	assert.Equal(t, 0, rep.Attempts[1].ExitCode)
	assert.FileExists(t, filepath.Join(rdir, "retry", "retry.try1.journal"))
}

// startRunIn starts `vmharness run` sharing runtime (and so VM slots)
// with other runs, with extra environment.
func startRunIn(t *testing.T, runtime, jdir string, env []string, args ...string) *e2eRun {
	t.Helper()
	r := &e2eRun{runtime: runtime, jdir: jdir}
	r.cmd = exec.Command(vmharnessBinary(t), append([]string{"run", "--journal-dir", jdir}, args...)...)
	r.cmd.Env = append(append(os.Environ(), "VMHARNESS_RUNTIME_DIR="+runtime), env...)
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

// TestE2EAdmissionAndNoRetryOfAFailure: with VMHARNESS_MAX_VMS=1 a second
// run waits, says so, and starts its VM only after the first one's QEMU
// has exited; that second test fails, and a failing test is not retried.
func TestE2EAdmissionAndNoRetryOfAFailure(t *testing.T) {
	requireE2E(t)
	// Alongside the other CI tests: each boots its VMs one after the
	// other, in its own runtime directory.
	t.Parallel()
	dir := t.TempDir()
	runtime, jdir, rdir := filepath.Join(dir, "run"), filepath.Join(dir, "journal"), filepath.Join(dir, "reports")
	env := []string{"VMHARNESS_MAX_VMS=1"}
	first := startRunIn(t, runtime, jdir, env, "--name", "adm-first", "--timeout", "8m", testUnitPath("boot.service"))
	firstEntry := first.waitForQEMU(t, "adm-first")

	second := startRunIn(t, runtime, jdir, env, "--name", "adm-second", "--timeout", "8m", "--report-dir", rdir, testUnitPath("fail.service"))
	reg, err := registry.Open(runtime)
	require.NoError(t, err)
	// While the first VM runs, the second never gets as far as its own
	// VM (it registers only once admitted).
	for firstEntry.QEMUAlive() {
		_, err := reg.Lookup("adm-second")
		require.ErrorIs(t, err, registry.ErrNotFound, "the second run started a VM while the first one ran")
		time.Sleep(250 * time.Millisecond)
	}
	first.wait(t)
	second.wait(t)
	assert.Equal(t, 0, first.exitCode)
	assert.NotContains(t, first.stderr.String(), "waiting for a VM slot")

	out := second.stderr.String()
	assert.Equal(t, 1, second.exitCode)
	assert.Equal(t, 1, strings.Count(out, "adm-second: waiting for a VM slot: 1 running, limit 1 (limit from VMHARNESS_MAX_VMS); the boot timeout starts once admitted"), out)
	assert.Contains(t, out, "adm-second: admitted after waiting")
	assert.Contains(t, out, "adm-second: FAIL: test exited with status 3")
	assert.NotContains(t, out, "RETRY")
	assert.NoFileExists(t, filepath.Join(jdir, "adm-second.try1.journal"))
	assert.FileExists(t, filepath.Join(jdir, "adm-second.journal"))

	rep, err := report.Read(filepath.Join(rdir, "adm-second", report.FileName))
	require.NoError(t, err)
	assert.Equal(t, "fail", rep.Result)
	assert.Equal(t, "test exited with status 3", rep.Verdict.Reason)
	require.Len(t, rep.Attempts, 1)
	assert.False(t, rep.Attempts[0].Retried)
	assert.Greater(t, rep.Attempts[0].WaitSeconds, 1.0)
	assert.Contains(t, rep.Files, "adm-second.journal")
	assert.Contains(t, rep.Files, "adm-second.console.log")
	first.assertNothingLeft(t, firstEntry.QEMUPID)
}

// TestE2EShardsCoverTheSuite configures this repository's Meson project and
// splits its integration suite with the real binary: two shards cover every
// test exactly once, by count and with the recorded durations, and with
// those they are within 25% of each other.
func TestE2EShardsCoverTheSuite(t *testing.T) {
	if _, err := exec.LookPath("meson"); err != nil {
		t.Skip("needs meson")
	}
	t.Parallel()
	bin := vmharnessBinary(t)
	build := filepath.Join(t.TempDir(), "build")
	out, err := exec.Command("meson", "setup", build, "..").CombinedOutput()
	require.NoError(t, err, "%s", out)
	tests, err := shard.ListTests(t.Context(), build)
	require.NoError(t, err)
	suite, err := shard.Select(tests, []string{"integration-tests"})
	require.NoError(t, err)
	var want []string
	for _, s := range suite {
		want = append(want, s.Name)
	}
	sort.Strings(want)
	require.GreaterOrEqual(t, len(want), 12, "the suite as meson.build declares it")

	testlog := filepath.Join("..", "shard", "testdata", "integration-testlog.json")
	durations, _, err := shard.ReadFile(testlog)
	require.NoError(t, err)
	for _, extra := range [][]string{nil, {"--durations", testlog}} {
		var all []string
		var loads []float64
		for i := 1; i <= 2; i++ {
			cmd := exec.Command(bin, append([]string{"shard", "-C", build, "--suite", "integration-tests", "--index", strconv.Itoa(i), "--total", "2"}, extra...)...)
			var stderr strings.Builder
			cmd.Stderr = &stderr
			stdout, err := cmd.Output()
			require.NoError(t, err, "%s", stderr.String())
			names := strings.Split(strings.TrimSpace(string(stdout)), "\n")
			all = append(all, names...)
			var load float64
			for _, n := range names {
				load += durations[n]
			}
			loads = append(loads, load)
		}
		sort.Strings(all)
		assert.Equal(t, want, all, "every test in exactly one shard (%v)", extra)
		if extra != nil {
			lo, hi := min(loads[0], loads[1]), max(loads[0], loads[1])
			assert.LessOrEqual(t, (hi-lo)/lo, 0.25, "shard loads %v", loads)
		}
	}
}
