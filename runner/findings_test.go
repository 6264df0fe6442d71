package runner

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/journalremote"
)

// TestRunBadExclusion: a bad --coredump-exclude or --sanitizer-exclude
// ends the run with exit 99 and one line before anything starts.
func TestRunBadExclusion(t *testing.T) {
	good := writeUnit(t, "good.service", "[Service]\nType=oneshot\nExecStart=/bin/true\n")
	tests := []struct {
		name    string
		args    []string
		wantMsg string
	}{
		{"coredump", []string{"--coredump-exclude", "/usr/bin/(sleep", good}, "vmharness run: --coredump-exclude: error parsing regexp: missing closing ): `/usr/bin/(sleep` (Go regular expression syntax)"},
		// Python's lookahead, which upstream's regexes may use, is not RE2.
		{"sanitizer", []string{"--sanitizer-exclude", "==(?!WARNING)", good}, "vmharness run: --sanitizer-exclude: error parsing regexp: invalid or unsupported Perl syntax: `(?!` (Go regular expression syntax)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			vars := map[string]string{
				// A QEMU that does not exist: had the run started, it would
				// have said so instead.
				"VMHARNESS_QEMU":        "/nonexistent/qemu-system-x86_64",
				"VMHARNESS_IMAGE_DIR":   fakeImageDir(t),
				"VMHARNESS_RUNTIME_DIR": filepath.Join(root, "run"),
				"VMHARNESS_STATE_DIR":   filepath.Join(root, "state"),
			}
			var stderr bytes.Buffer
			env := &cliEnv{stdin: strings.NewReader(""), stdout: &bytes.Buffer{}, stderr: &stderr, getenv: func(k string) string { return vars[k] }}
			code := cmdRun(context.Background(), env, tt.args)
			assert.Equal(t, 99, code)
			assert.Equal(t, tt.wantMsg+"\n", stderr.String())
			_, err := os.Stat(filepath.Join(root, "state"))
			assert.ErrorIs(t, err, os.ErrNotExist, "nothing was set up")
		})
	}
}

func TestParseExclusions(t *testing.T) {
	x, err := parseExclusions("", "")
	require.NoError(t, err)
	assert.Nil(t, x.Coredump)
	assert.Nil(t, x.Sanitizer)
	x, err = parseExclusions(`/(bash|python3\.[0-9]+)$`, `^systemd-resolved$`)
	require.NoError(t, err)
	assert.True(t, x.Coredump.MatchString("/usr/bin/python3.13"))
	assert.True(t, x.Sanitizer.MatchString("systemd-resolved"))
}

func TestWriteFindings(t *testing.T) {
	sum := journalremote.Summary{
		JournalFiles: []string{"/j/crash.journal"},
		Coredumps: []journalremote.Coredump{
			{Exe: "/usr/bin/sleep", Comm: "sleep", Signal: "SIGSEGV", PID: "312", Unit: "crash.service", Count: 1},
			{Exe: "/usr/bin/tail", Comm: "tail", Signal: "SIGSEGV", PID: "320", Unit: "crasher.service", Count: 2},
		},
		UntrustedCoredumps: 1,
		SanitizerReports: []journalremote.SanitizerReport{
			{Program: "uaf-demo", PID: "303", Count: 1, Lines: []string{"==42==ERROR: AddressSanitizer: heap-use-after-free", "SUMMARY: AddressSanitizer: heap-use-after-free"}},
			{Program: "other", PID: "4", Count: 2, Lines: []string{"x.c:1:1: runtime error: y"}},
		},
	}
	x, err := parseExclusions(`tail$`, `^other$`)
	require.NoError(t, err)
	var b bytes.Buffer
	writeFindings(&b, sum, x)
	assert.Equal(t, `core dumps in the journal:
  /usr/bin/sleep (sleep, pid 312, SIGSEGV, unit crash.service)
  read them with: coredumpctl --file=/j/crash.journal info /usr/bin/sleep
  list them with: coredumpctl --file=/j/crash.journal list
core dumps of 1 program(s) excluded by --coredump-exclude "tail$"
1 core dump message(s) not sent by systemd-coredump were ignored
sanitizer report from uaf-demo[303]:
  ==42==ERROR: AddressSanitizer: heap-use-after-free
  SUMMARY: AddressSanitizer: heap-use-after-free
sanitizer reports of 1 program(s) excluded by --sanitizer-exclude "^other$"
`, b.String())

	b.Reset()
	writeFindings(&b, journalremote.Summary{JournalFiles: []string{"/j/clean.journal"}}, x)
	assert.Empty(t, b.String(), "a clean journal adds nothing to the summary")
}
