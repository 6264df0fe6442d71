package layer

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The end-to-end tests boot real VMs from the default image (built on
// first use, cached afterwards) with a layer attached the way the runner's
// --build-dir does. They run when VMHARNESS_E2E=1, as in CI.

func requireE2E(t *testing.T) {
	t.Helper()
	if os.Getenv("VMHARNESS_E2E") != "1" {
		t.Skip("boots a real VM; set VMHARNESS_E2E=1 (scripts/test does)")
	}
}

var (
	runnerOnce sync.Once
	runnerBin  string
	runnerErr  error
)

// vmharness builds the runner once per test process.
func vmharness(t *testing.T) string {
	t.Helper()
	runnerOnce.Do(func() {
		dir, err := os.MkdirTemp("", "vmharness-layer-e2e-")
		if err != nil {
			runnerErr = err
			return
		}
		runnerBin = filepath.Join(dir, "vmharness")
		out, err := exec.Command("go", "build", "-o", runnerBin, "../..").CombinedOutput()
		if err != nil {
			runnerErr = fmt.Errorf("go build ../..: %w: %s", err, out)
		}
	})
	require.NoError(t, runnerErr)
	return runnerBin
}

// runVM runs unit in a VM with the extra run arguments and returns the
// runner's exit code, its stderr and the console log.
func runVM(t *testing.T, extra []string, unit string) (code int, stderr, console string) {
	t.Helper()
	dir := t.TempDir()
	jdir := filepath.Join(dir, "journal")
	args := append([]string{"run", "--timeout", "8m", "--journal-dir", jdir, "--keep-journal", "always"}, extra...)
	cmd := exec.Command(vmharness(t), append(args, unit)...)
	cmd.Env = append(os.Environ(), "VMHARNESS_RUNTIME_DIR="+filepath.Join(dir, "run"))
	var errBuf bytes.Buffer
	cmd.Stderr = &errBuf
	start := time.Now()
	err := cmd.Run()
	if err != nil {
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee)
	}
	name := strings.TrimSuffix(filepath.Base(unit), ".service")
	log, _ := os.ReadFile(filepath.Join(jdir, name+".console.log"))
	t.Logf("vmharness run exited %d after %s:\n%s", cmd.ProcessState.ExitCode(), time.Since(start).Round(time.Second), errBuf.String())
	return cmd.ProcessState.ExitCode(), errBuf.String(), string(log)
}

// TestE2ELayer runs `vmharness run --build-dir` on testdata/e2e's build:
// its generator must have run at boot, its unit must start, its files
// must be root's with their modes, and replace the base's.
func TestE2ELayer(t *testing.T) {
	requireE2E(t)
	src, err := filepath.Abs("testdata/e2e")
	require.NoError(t, err)
	build := filepath.Join(t.TempDir(), "build")
	out, err := exec.Command("meson", "setup", "--prefix=/usr", build, src).CombinedOutput()
	require.NoError(t, err, "%s", out)

	code, stderr, console := runVM(t, []string{"--build-dir", build}, filepath.Join(src, "check.service"))
	assert.NotContains(t, stderr, "FAIL")
	if !assert.Equal(t, 0, code, "the check unit must pass") {
		t.Logf("console:\n%s", console)
	}
	// The layer of this fixed tree over this image may be cached from an
	// earlier test run: the key depends on nothing else.
	assert.Regexp(t, `layer [0-9a-f]+ (built|reused): `, stderr)

	// An unchanged build reuses the layer and boots the same.
	code, stderr, console = runVM(t, []string{"--build-dir", build}, filepath.Join(src, "check.service"))
	if !assert.Equal(t, 0, code, "the check unit must pass with the cached layer") {
		t.Logf("console:\n%s", console)
	}
	assert.Contains(t, stderr, " reused: ")
}

// TestE2EBuildDirBadInput: a --build-dir that cannot become a layer is a
// harness error (99) with one line, before any VM starts.
func TestE2EBuildDirBadInput(t *testing.T) {
	requireE2E(t)
	unit := filepath.Join(t.TempDir(), "never.service")
	require.NoError(t, os.WriteFile(unit, []byte("[Service]\nType=oneshot\nExecStart=/bin/true\n"), 0o644))
	failing := filepath.Join(t.TempDir(), "src")
	require.NoError(t, os.MkdirAll(failing, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(failing, "meson.build"),
		[]byte("project('failing')\nmeson.add_install_script('sh', '-c', 'echo install script exploded >&2; exit 3')\n"), 0o644))
	failingBuild := filepath.Join(t.TempDir(), "build")
	out, err := exec.Command("meson", "setup", failingBuild, failing).CombinedOutput()
	require.NoError(t, err, "%s", out)
	// A project that installs a file where the image has a directory.
	clashing := filepath.Join(t.TempDir(), "src")
	require.NoError(t, os.MkdirAll(clashing, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(clashing, "meson.build"),
		[]byte("project('clashing')\ninstall_data('system', install_dir: '/usr/lib/systemd')\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(clashing, "system"), []byte("not a directory\n"), 0o644))
	clashingBuild := filepath.Join(t.TempDir(), "build")
	out, err = exec.Command("meson", "setup", clashingBuild, clashing).CombinedOutput()
	require.NoError(t, err, "%s", out)
	tests := []struct {
		name, dir, want string
	}{
		{"not a build dir", t.TempDir(), "is not a Meson build directory"},
		{"missing", "/nonexistent/build", "/nonexistent/build"},
		{"meson install fails", failingBuild, "install script exploded"},
		{"a file where the image has a directory", clashingBuild, "the install tree has /usr/lib/systemd/system as a regular file, but the base image has a directory there"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(vmharness(t), "run", "--build-dir", tt.dir, unit)
			cmd.Env = append(os.Environ(), "VMHARNESS_RUNTIME_DIR="+filepath.Join(t.TempDir(), "run"))
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			require.ErrorAs(t, err, &ee, "%s", out)
			assert.Equal(t, 99, ee.ExitCode(), "%s", out)
			assert.Contains(t, string(out), tt.want)
			assert.Contains(t, string(out), "vmharness run: --build-dir: ")
			assert.NotContains(t, string(out), "booting", "no VM starts")
		})
	}
}
