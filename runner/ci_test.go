package runner

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/admission"
	"github.com/vmharness/vmharness/report"
)

// mesonBuildDir configures a Meson project with six tests in the
// integration-tests suite and one in another, and returns its build dir.
func mesonBuildDir(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("meson"); err != nil {
		t.Skip("needs meson")
	}
	src := t.TempDir()
	var b strings.Builder
	b.WriteString("project('shardtest', meson_version: '>= 1.0.0')\nsh = find_program('sh')\n")
	for _, n := range []string{"alpha", "beta", "gamma", "delta", "epsilon", "zeta"} {
		b.WriteString("test('" + n + "', sh, args: ['-c', 'true'], suite: 'integration-tests')\n")
	}
	b.WriteString("test('unit', sh, args: ['-c', 'true'], suite: 'unit')\n")
	require.NoError(t, os.WriteFile(filepath.Join(src, "meson.build"), []byte(b.String()), 0o644))
	build := filepath.Join(src, "build")
	out, err := exec.Command("meson", "setup", build, src).CombinedOutput()
	require.NoError(t, err, "%s", out)
	return build
}

// syncBuffer is a bytes.Buffer safe to read while a run writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func runCmd(t *testing.T, cmd func(context.Context, *cliEnv, []string) int, vars map[string]string, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	env := &cliEnv{stdin: strings.NewReader(""), stdout: &stdout, stderr: &stderr, getenv: func(k string) string { return vars[k] }}
	code := cmd(context.Background(), env, args)
	return code, stdout.String(), stderr.String()
}

func TestShardCommand(t *testing.T) {
	build := mesonBuildDir(t)
	durations := filepath.Join(t.TempDir(), "durations.json")
	require.NoError(t, os.WriteFile(durations, []byte(`{"alpha": 100, "beta": 60, "gamma": 50, "delta": 40, "epsilon": 10}`), 0o644))
	corrupt := filepath.Join(t.TempDir(), "corrupt.json")
	require.NoError(t, os.WriteFile(corrupt, []byte(`{"alpha": 1`), 0o644))
	base := []string{"-C", build, "--suite", "integration-tests"}

	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string
		wantStderr string
	}{
		{"by duration, shard 1", append(base, "--index", "1", "--total", "2", "--durations", durations), 0, "alpha\nepsilon\nzeta\n",
			"shard 1 of 2: 3 tests, estimated 160s (all shards: 160s 150s); 1 tests without a recorded duration counted as the median 50s"},
		{"by duration, shard 2", append(base, "--index", "2", "--total", "2", "--durations", durations), 0, "beta\ndelta\ngamma\n", "shard 2 of 2"},
		{"no testlog yet: by count", append(base, "--index", "1", "--total", "2"), 0, "alpha\ndelta\ngamma\n",
			"no recorded durations (" + filepath.Join(build, "meson-logs", "testlog.json") + " does not exist); balancing by test count"},
		{"missing durations file", append(base, "--index", "1", "--total", "3", "--durations", "/nonexistent/d.json"), 0, "alpha\nepsilon\n",
			"no recorded durations (/nonexistent/d.json does not exist); balancing by test count"},
		{"corrupt durations file", append(base, "--index", "1", "--total", "3", "--durations", corrupt), 0, "alpha\nepsilon\n", "corrupt.json is corrupt: not valid JSON: unexpected end of JSON input); balancing by test count"},
		{"one of two files corrupt", append(base, "--index", "1", "--total", "2", "--durations", corrupt, "--durations", durations), 0, "alpha\nepsilon\nzeta\n", "corrupt.json is corrupt: not valid JSON: unexpected end of JSON input; skipped"},
		{"index out of range", append(base, "--index", "3", "--total", "2"), 99, "", "vmharness shard: --index 3 is out of range: shards are numbered 1 to 2\n"},
		{"index 0 (shards count from 1)", append(base, "--index", "0", "--total", "2"), 99, "", "--index 0 is out of range"},
		{"no total", append(base, "--index", "1"), 99, "", "--total must be at least 1"},
		{"unknown suite", []string{"-C", build, "--suite", "integration", "--index", "1", "--total", "2"}, 99, "",
			"vmharness shard: no test is in suite \"integration\" (suites: integration-tests, unit)\n"},
		{"more shards than tests", append(base, "--index", "1", "--total", "7"), 99, "",
			"6 tests selected, fewer than --total 7: a shard would be empty, and `meson test` given no test names runs every test; use --total 6 or less"},
		{"not a build dir", []string{"-C", t.TempDir(), "--index", "1", "--total", "1"}, 99, "", "not a Meson build directory"},
		{"stray argument", append(base, "--index", "1", "--total", "1", "boot"), 99, "", `unexpected argument "boot"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runCmd(t, cmdShard, nil, tt.args...)
			assert.Equal(t, tt.wantCode, code, "stderr: %s", stderr)
			assert.Equal(t, tt.wantStdout, stdout)
			assert.Contains(t, stderr, tt.wantStderr)
			if code != 0 {
				assert.Equal(t, 1, strings.Count(stderr, "\n"), "one line: %q", stderr)
			}
		})
	}
}

// TestShardsCoverTheSuite: every shard count splits the suite so that each
// test is in exactly one shard, whatever the durations source.
func TestShardsCoverTheSuite(t *testing.T) {
	build := mesonBuildDir(t)
	durations := filepath.Join(t.TempDir(), "durations.json")
	require.NoError(t, os.WriteFile(durations, []byte(`{"alpha": 100, "gamma": 50, "unit": 5}`), 0o644))
	want := []string{"alpha", "beta", "delta", "epsilon", "gamma", "zeta"}
	for _, extra := range [][]string{nil, {"--durations", durations}} {
		for total := 1; total <= len(want); total++ {
			var all []string
			for i := 1; i <= total; i++ {
				args := append([]string{"-C", build, "--suite", "integration-tests", "--index", strconv.Itoa(i), "--total", strconv.Itoa(total)}, extra...)
				code, stdout, stderr := runCmd(t, cmdShard, nil, args...)
				require.Equal(t, 0, code, stderr)
				lines := strings.Split(strings.TrimSpace(stdout), "\n")
				require.NotEmpty(t, lines[0], "shard %d of %d is empty", i, total)
				all = append(all, lines...)
			}
			sort.Strings(all)
			assert.Equal(t, want, all, "%d shards, %v", total, extra)
		}
	}
}

func TestShardWriteDurations(t *testing.T) {
	dir := t.TempDir()
	testlog := filepath.Join(dir, "testlog.json")
	require.NoError(t, os.WriteFile(testlog, []byte(`{"name": "alpha", "duration": 12.5, "result": "OK"}
{"name": "beta", "duration": 30, "result": "FAIL"}
`), 0o644))
	old := filepath.Join(dir, "old.json")
	require.NoError(t, os.WriteFile(old, []byte(`{"alpha": 99, "gamma": 7}`), 0o644))
	out := filepath.Join(dir, "durations.json")

	code, _, stderr := runCmd(t, cmdShard, nil, "--write-durations", out, "--durations", old, "--durations", "/nonexistent", "--durations", testlog)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stderr, "/nonexistent does not exist; skipped")
	assert.Contains(t, stderr, "wrote the durations of 3 tests to "+out)
	data, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.JSONEq(t, `{"alpha": 12.5, "beta": 30, "gamma": 7}`, string(data), "later sources win")

	code, _, stderr = runCmd(t, cmdShard, nil, "--write-durations", out, "--durations", "/nonexistent")
	assert.Equal(t, 99, code)
	assert.Contains(t, stderr, "no durations could be read; "+out+" left unchanged")
	data2, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Equal(t, data, data2)
}

func TestTryNames(t *testing.T) {
	tests := []struct{ path, name, want string }{
		{"/j/boot.journal", "boot", "/j/boot.try1.journal"},
		{"/j/boot.console.log", "boot", "/j/boot.try1.console.log"},
		{"/j/boot@0001-0002.journal", "boot", "/j/boot.try1@0001-0002.journal"},
		{"/j/boot.export", "boot", "/j/boot.try1.export"},
		{"/j/other.journal", "boot", "/j/other.journal"},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, tryName(tt.path, tt.name, 1), tt.path)
	}

	dir := t.TempDir()
	for _, f := range []string{"boot.try1.journal", "boot.try1.console.log", "boot.try1@x.journal", "boot.journal", "boot-2.try1.journal"} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, f), nil, 0o644))
	}
	removeStaleTries(dir, "boot")
	left, err := filepath.Glob(filepath.Join(dir, "*"))
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Join(dir, "boot-2.try1.journal"), filepath.Join(dir, "boot.journal")}, left)
}

func runVars(t *testing.T) map[string]string {
	root := t.TempDir()
	return map[string]string{
		"VMHARNESS_IMAGE_DIR":   fakeImageDir(t),
		"VMHARNESS_RUNTIME_DIR": filepath.Join(root, "run"),
		"VMHARNESS_STATE_DIR":   filepath.Join(root, "state"),
		"VMHARNESS_VSOCK":       "user",
		"VMHARNESS_REPORT_DIR":  filepath.Join(root, "reports"),
	}
}

// TestRunWaitsForASlot: with VMHARNESS_MAX_VMS=1 and the slot taken, a
// run says once that it waits, starts nothing, and a SIGTERM (here: its
// context) ends it as an interrupted test with a report.
func TestRunWaitsForASlot(t *testing.T) {
	vars := runVars(t)
	vars["VMHARNESS_MAX_VMS"] = "1"
	cfg, err := admission.ConfigFromEnv(func(k string) string { return vars[k] }, vars["VMHARNESS_RUNTIME_DIR"], 2)
	require.NoError(t, err)
	held, err := admission.Admit(context.Background(), cfg, admission.Request{Name: "holder", MemoryMiB: 1024}, nil)
	require.NoError(t, err)
	defer held.Release()

	unit := writeUnit(t, "waiter.service", "[Service]\nType=oneshot\nExecStart=/bin/true\n")
	var stderr syncBuffer
	env := &cliEnv{stdin: strings.NewReader(""), stdout: &bytes.Buffer{}, stderr: &stderr, getenv: func(k string) string { return vars[k] }}
	ctx, cancel := context.WithCancelCause(context.Background())
	done := make(chan int)
	go func() { done <- cmdRun(ctx, env, []string{unit}) }()
	require.Eventually(t, func() bool { return strings.Contains(stderr.String(), "waiting for a VM slot") }, 10*time.Second, 10*time.Millisecond)
	time.Sleep(300 * time.Millisecond)
	cancel(errors.New("terminated"))
	code := <-done

	out := stderr.String()
	assert.Equal(t, 1, code, out)
	assert.Equal(t, 1, strings.Count(out, "waiter: waiting for a VM slot"), "said once: %s", out)
	assert.Contains(t, out, "vmharness: waiter: waiting for a VM slot: 1 running, limit 1 (limit from VMHARNESS_MAX_VMS); the boot timeout starts once admitted\n")
	assert.Contains(t, out, "waiter: FAIL: interrupted while waiting for a VM slot (1 running, limit 1): terminated")
	assert.NotContains(t, out, "booting", "nothing started")
	entries, err := os.ReadDir(vars["VMHARNESS_RUNTIME_DIR"])
	require.NoError(t, err)
	for _, e := range entries {
		assert.False(t, e.IsDir(), "work dir %s", e.Name())
	}

	dir := filepath.Join(vars["VMHARNESS_REPORT_DIR"], "waiter")
	assert.Contains(t, out, "vmharness: waiter: report: "+dir)
	rep, err := report.Read(filepath.Join(dir, report.FileName))
	require.NoError(t, err)
	assert.Equal(t, "fail", rep.Result)
	assert.Equal(t, 1, rep.ExitCode)
	assert.Equal(t, "waiter.service", rep.Unit)
	assert.Contains(t, rep.Verdict.Reason, "interrupted while waiting for a VM slot")
	require.Len(t, rep.Attempts, 1)
	assert.Greater(t, rep.Attempts[0].WaitSeconds, 0.0)
}

// TestRunReportOfAHarnessError: a run that cannot start QEMU exits 99,
// is not retried, and its report says why.
func TestRunReportOfAHarnessError(t *testing.T) {
	vars := runVars(t)
	vars["VMHARNESS_QEMU"] = "/nonexistent/qemu-system-x86_64"
	unit := writeUnit(t, "noqemu.service", "[Service]\nType=oneshot\nExecStart=/bin/true\n")
	code, _, stderr := runCmd(t, cmdRun, vars, "--name", "nq", unit)
	assert.Equal(t, 99, code, stderr)
	assert.NotContains(t, stderr, "RETRY")
	rep, err := report.Read(filepath.Join(vars["VMHARNESS_REPORT_DIR"], "nq", report.FileName))
	require.NoError(t, err)
	assert.Equal(t, "error", rep.Result)
	assert.Contains(t, rep.Verdict.Reason, "QEMU not found")
	require.Len(t, rep.Attempts, 1)
	assert.False(t, rep.Attempts[0].Retried)
	assert.Equal(t, "nq", rep.Attempts[0].Name)
}
