package runner

import (
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestE2ECoredump: helpers that dump core fail a test whose unit exited 0,
// the failure names the first crashed binary and its signal, and the dumps
// are in the kept journal for coredumpctl; --coredump-exclude lets the
// same test pass.
func TestE2ECoredump(t *testing.T) {
	requireE2E(t)
	t.Run("fails", func(t *testing.T) {
		t.Parallel()
		r := startRun(t, "--timeout", "8m", "--name", "coredump", filepath.Join("testdata", "coredump.service"))
		r.wait(t)
		assert.Equal(t, 1, r.exitCode)
		out := r.stderr.String()
		assert.Contains(t, out, "FAIL: test passed, but /usr/bin/sleep dumped core (signal SIGSEGV), and 1 more core dump (")
		journal := filepath.Join(r.jdir, "coredump.journal")
		assert.Contains(t, out, "read them with: coredumpctl --file="+journal+" info /usr/bin/sleep")
		assert.Contains(t, out, "/usr/bin/tail (tail, pid ")
		assert.Contains(t, out, "SIGSEGV, unit crasher.service)", "the dump of another unit's process still in progress when the test ended")

		// What a person reading the failure does next.
		list := exec.Command("coredumpctl", "--file="+journal, "--no-pager", "list")
		if _, err := exec.LookPath("coredumpctl"); err != nil {
			// coredumpctl comes with Debian's systemd-coredump, which
			// also takes over the host's own core dumps; without it, the
			// same entries through journalctl.
			t.Logf("coredumpctl is not installed; checking the journal with journalctl")
			list = exec.Command("journalctl", "--file="+journal, "--no-pager", "-o", "verbose", "MESSAGE_ID=fc2e22bc6ee647b6b90729ab34a250b1")
		}
		listing, err := list.CombinedOutput()
		require.NoError(t, err, "%s", listing)
		t.Logf("%s:\n%s", list, listing)
		assert.Contains(t, string(listing), "/usr/bin/sleep")
		assert.Contains(t, string(listing), "/usr/bin/tail")
	})
	t.Run("excluded", func(t *testing.T) {
		t.Parallel()
		r := startRun(t, "--timeout", "8m", "--name", "coredump-excluded", "--coredump-exclude", "^/usr/bin/(sleep|tail)$", filepath.Join("testdata", "coredump.service"))
		r.wait(t)
		assert.Equal(t, 0, r.exitCode)
		assert.Contains(t, r.stderr.String(), "coredump-excluded: PASS")
	})
}

// TestE2ESanitizer: a sanitizer report on a test's stderr fails it though
// it exited 0, and the failure shows the report; --sanitizer-exclude lets
// it pass.
func TestE2ESanitizer(t *testing.T) {
	requireE2E(t)
	t.Run("fails", func(t *testing.T) {
		t.Parallel()
		r := startRun(t, "--timeout", "8m", "--name", "sanitizer", filepath.Join("testdata", "sanitizer.service"))
		r.wait(t)
		assert.Equal(t, 1, r.exitCode)
		out := r.stderr.String()
		assert.Contains(t, out, "FAIL: test passed, but uaf-demo[")
		assert.Contains(t, out, "] printed a sanitizer report: ==42==ERROR: AddressSanitizer: heap-use-after-free on address 0x602000000010")
		assert.Regexp(t, `sanitizer report from uaf-demo\[[0-9]+\]:
  ==42==ERROR: AddressSanitizer: heap-use-after-free on address 0x602000000010 .*
  READ of size 4 at 0x602000000010 thread T0
      #0 0x55d0c0a1b2c3 in main /src/uaf.c:7
  SUMMARY: AddressSanitizer: heap-use-after-free /src/uaf.c:7 in main
`, out)
	})
	t.Run("excluded", func(t *testing.T) {
		t.Parallel()
		r := startRun(t, "--timeout", "8m", "--name", "sanitizer-excluded", "--sanitizer-exclude", "^uaf-demo$", filepath.Join("testdata", "sanitizer.service"))
		r.wait(t)
		assert.Equal(t, 0, r.exitCode)
		assert.Contains(t, r.stderr.String(), "sanitizer-excluded: PASS")
	})
}
