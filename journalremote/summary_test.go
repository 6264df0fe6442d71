package journalremote

import (
	"bytes"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// feed passes entries given as field lists through the same path the
// Collector uses.
func feed(s *summarizer, entries ...[]string) {
	for i, fields := range entries {
		var e Entry
		for _, f := range fields {
			name, value, _ := strings.Cut(f, "=")
			must(e.Add(name, []byte(value)))
		}
		_, info := appendForJournalRemote(nil, &e, "", time.UnixMicro(int64(baseRealtime)+int64(i)))
		s.observe(&e, info)
	}
}

func TestSummaryUnitLinesMatchJournalctlU(t *testing.T) {
	s := newSummarizer("foo.service", 30)
	feed(s,
		[]string{"_SYSTEMD_UNIT=foo.service", "SYSLOG_IDENTIFIER=foo", "_PID=7", "MESSAGE=own output"},
		[]string{"_PID=1", "SYSLOG_IDENTIFIER=systemd", "UNIT=foo.service", "MESSAGE=Starting foo.service - Foo..."},
		[]string{"_UID=0", "_PID=300", "_COMM=systemd-coredump", "MESSAGE_ID=" + coredumpMessageID, "COREDUMP_UNIT=foo.service", "MESSAGE=Process 7 (foo) dumped core."},
		[]string{"_UID=0", "_PID=301", "_COMM=resolved", "OBJECT_SYSTEMD_UNIT=foo.service", "MESSAGE=about foo"},
		// Not about foo.service:
		[]string{"_SYSTEMD_UNIT=bar.service", "MESSAGE=other unit"},
		[]string{"_PID=2", "UNIT=foo.service", "MESSAGE=UNIT= from someone other than PID 1"},
		[]string{"_UID=1000", "OBJECT_SYSTEMD_UNIT=foo.service", "MESSAGE=unprivileged"},
		[]string{"_SYSTEMD_UNIT=foo.service", "NO_MESSAGE=1"},
	)
	sum := s.snapshot()
	assert.Equal(t, int64(8), sum.Entries)
	assert.Equal(t, int64(4), sum.UnitLinesTotal)
	assert.Equal(t, []string{
		"foo[7]: own output",
		"systemd[1]: Starting foo.service - Foo...",
		"systemd-coredump[300]: Process 7 (foo) dumped core.",
		"resolved[301]: about foo",
	}, stripTime(sum.UnitLines))
}

// stripTime drops the leading time.StampMilli.
func stripTime(ls []string) []string {
	out := make([]string, len(ls))
	for i, l := range ls {
		out[i] = l[len(time.StampMilli)+1:]
	}
	return out
}

func TestSummaryKeepsLastLines(t *testing.T) {
	s := newSummarizer("foo.service", 3)
	for i := range 10 {
		feed(s, []string{"_SYSTEMD_UNIT=foo.service", "_COMM=foo", "MESSAGE=n" + string(rune('0'+i))})
	}
	sum := s.snapshot()
	assert.Equal(t, int64(10), sum.UnitLinesTotal)
	assert.Equal(t, []string{"foo: n7", "foo: n8", "foo: n9"}, stripTime(sum.UnitLines))
}

func TestSummaryProblems(t *testing.T) {
	tests := []struct {
		name    string
		fields  []string
		problem bool
	}{
		{"kernel BUG", []string{"_TRANSPORT=kernel", "MESSAGE=BUG: kernel NULL pointer dereference, address: 0000000000000000"}, true},
		{"kernel oops", []string{"_TRANSPORT=kernel", "MESSAGE=Oops: general protection fault, probably for non-canonical address"}, true},
		{"kernel panic", []string{"_TRANSPORT=kernel", "MESSAGE=Kernel panic - not syncing: Attempted to kill init!"}, true},
		{"kernel warning", []string{"_TRANSPORT=kernel", "MESSAGE=WARNING: CPU: 1 PID: 1 at kernel/foo.c:12 bar+0x1/0x2"}, true},
		{"ordinary kernel line", []string{"_TRANSPORT=kernel", "MESSAGE=virtio_net virtio0 enp0s1: renamed from eth0"}, false},
		{"start job failed", []string{"_PID=1", "MESSAGE_ID=be02cf6855d2428ba40df7e9d022f03d", "MESSAGE=Failed to start foo.service - Foo."}, true},
		{"unit failed", []string{"_PID=1", "MESSAGE_ID=d9b373ed55a64feb8242e02dbe79a49c", "MESSAGE=foo.service: Failed with result 'exit-code'."}, true},
		{"failed start by text from PID 1", []string{"_PID=1", "MESSAGE=Dependency failed for bar.service - Bar."}, true},
		{"failed start text from a test", []string{"_PID=42", "MESSAGE=Failed to start the thing (expected)"}, false},
		{"core dump", []string{"MESSAGE_ID=" + coredumpMessageID, "MESSAGE=Process 7 (foo) of user 0 dumped core."}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newSummarizer("foo.service", 30)
			feed(s, tc.fields)
			assert.Equal(t, tc.problem, len(s.snapshot().Problems) == 1)
		})
	}
}

func TestSummaryProblemsDedupedAndCapped(t *testing.T) {
	s := newSummarizer("", 30)
	for range 3 {
		feed(s, []string{"_TRANSPORT=kernel", "MESSAGE=BUG: same thing"})
	}
	for i := range maxProblems + 5 {
		feed(s, []string{"_TRANSPORT=kernel", "MESSAGE=BUG: distinct " + strings.Repeat("x", i)})
	}
	feed(s, []string{"_TRANSPORT=kernel", "MESSAGE=BUG: distinct "}) // seen, over the cap
	sum := s.snapshot()
	require.Len(t, sum.Problems, maxProblems)
	assert.Equal(t, 3, sum.Problems[0].Count)
	assert.Equal(t, 2, sum.Problems[1].Count)
	assert.Equal(t, 6, sum.ProblemsOmitted)
	assert.True(t, strings.HasSuffix(sum.Problems[0].Line, " kernel: BUG: same thing"), sum.Problems[0].Line)
}

func TestAppendPrintable(t *testing.T) {
	tests := []struct{ in, want string }{
		{"plain", "plain"},
		{"tab\there", "tab here"},
		{"two\nlines", `two\nlines`},
		{"\x1b[31mred\x1b[0m", `\x1b[31mred\x1b[0m`},
		{"bad \xff utf8", `bad \xff utf8`},
		{"ünïcödé ✓", "ünïcödé ✓"},
		{"c1 \u009b", `c1 \xc2\x9b`},
	}
	for _, tc := range tests {
		assert.Equal(t, tc.want, string(appendPrintable(nil, []byte(tc.in), 100)), tc.in)
	}
	assert.Equal(t, "abcd…", string(appendPrintable(nil, []byte("abcdefgh"), 4)))
}

func TestWriteSummary(t *testing.T) {
	s := Summary{
		TestUnit:         "foo.service",
		JournalFiles:     []string{"/out/my test.journal"},
		Connections:      2,
		Entries:          1234,
		Boots:            []string{bootA, bootB},
		UnitLines:        []string{"Nov 22 01:00:00.000 foo[7]: hello", "Nov 22 01:00:01.000 foo[7]: bye"},
		UnitLinesTotal:   99,
		Problems:         []Problem{{Line: "Nov 22 01:00:02.000 kernel: BUG: oh no", Count: 2}},
		ProblemsOmitted:  1,
		StreamErrors:     []string{"connection 1 ended inside an entry"},
		TruncatedEntries: 1,
	}
	var b bytes.Buffer
	require.NoError(t, WriteSummary(&b, s))
	assert.Equal(t, `journal: 1234 entries over 2 connection(s), 2 boots
  journalctl --file='/out/my test.journal' -u foo.service
  (several boots: add -b 0 for the last, -b -1 for the one before, or --list-boots)
  stream: connection 1 ended inside an entry
  1 entries arrived incomplete and are marked VMHARNESS_TRUNCATED
problems in the journal:
  Nov 22 01:00:02.000 kernel: BUG: oh no  (x2)
  ... and 1 more
last 2 of 99 lines of foo.service:
  Nov 22 01:00:00.000 foo[7]: hello
  Nov 22 01:00:01.000 foo[7]: bye
`, b.String())
}

func TestShellQuote(t *testing.T) {
	assert.Equal(t, "/a/b.journal", shellQuote("/a/b.journal"))
	assert.Equal(t, "'/a b/c'", shellQuote("/a b/c"))
	assert.Equal(t, `'it'\''s'`, shellQuote("it's"))
	assert.Equal(t, "''", shellQuote(""))
}

func TestSummaryBootMarkers(t *testing.T) {
	s := newSummarizer("foo.service", 3)
	feed(s,
		[]string{"_BOOT_ID=" + bootA, "_SYSTEMD_UNIT=foo.service", "_COMM=foo", "MESSAGE=a1"},
		[]string{"_BOOT_ID=" + bootA, "_SYSTEMD_UNIT=foo.service", "_COMM=foo", "MESSAGE=a2"},
		[]string{"_BOOT_ID=" + strings.ToUpper(bootB), "_SYSTEMD_UNIT=foo.service", "_COMM=foo", "MESSAGE=b1"},
	)
	sum := s.snapshot()
	assert.Equal(t, []string{bootA, bootB}, sum.Boots)
	require.Len(t, sum.UnitLines, 5)
	assert.Equal(t, "-- boot "+bootA+" --", sum.UnitLines[0])
	assert.Equal(t, "-- boot "+bootB+" --", sum.UnitLines[3])
	assert.Equal(t, []string{"foo: a1", "foo: a2"}, stripTime(sum.UnitLines[1:3]))
	assert.Equal(t, int64(3), sum.UnitLinesShown())
}

func TestSummaryUnitResult(t *testing.T) {
	pid1 := func(boot string, fields ...string) []string {
		return append([]string{"_BOOT_ID=" + boot, "_PID=1", "UNIT=foo.service", "MESSAGE=m"}, fields...)
	}
	exited := func(boot, code, status, command string) []string {
		return pid1(boot, "MESSAGE_ID="+unitProcessExitMessageID, "EXIT_CODE="+code, "EXIT_STATUS="+status, "COMMAND="+command)
	}
	failed := func(boot, result string) []string {
		return pid1(boot, "MESSAGE_ID="+unitFailureResultMessageID, "UNIT_RESULT="+result)
	}
	succeeded := func(boot string) []string { return pid1(boot, "MESSAGE_ID="+unitSuccessMessageID) }
	tests := []struct {
		name    string
		entries [][]string
		want    UnitResult
	}{
		{"nothing about the unit", [][]string{{"_BOOT_ID=" + bootA, "_PID=1", "UNIT=bar.service", "MESSAGE_ID=" + unitSuccessMessageID, "MESSAGE=m"}}, UnitResult{}},
		{"success", [][]string{succeeded(bootA)}, UnitResult{Found: true, Result: "success"}},
		{"failed with a status", [][]string{exited(bootA, "exited", "123", "ExecStart"), failed(bootA, "exit-code")},
			UnitResult{Found: true, Result: "exit-code", ExitCode: "exited", ExitStatus: "123"}},
		{"killed, journal ends before the result line", [][]string{exited(bootA, "killed", "9", "ExecStart")},
			UnitResult{Found: true, ExitCode: "killed", ExitStatus: "9"}},
		{"ExecStopPost= is not the test's process", [][]string{exited(bootA, "exited", "1", "ExecStopPost"), succeeded(bootA)},
			UnitResult{Found: true, Result: "success"}},
		{"only PID 1 speaks for the unit", [][]string{{"_BOOT_ID=" + bootA, "_PID=7", "UNIT=foo.service", "MESSAGE_ID=" + unitSuccessMessageID, "MESSAGE=m"}}, UnitResult{}},
		{"the last boot counts", [][]string{succeeded(bootA), exited(bootB, "exited", "2", "ExecStart"), failed(bootB, "exit-code")},
			UnitResult{Found: true, Result: "exit-code", ExitCode: "exited", ExitStatus: "2"}},
		{"a last boot without a result has none", [][]string{succeeded(bootA), {"_BOOT_ID=" + bootB, "_PID=1", "MESSAGE=booting"}}, UnitResult{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newSummarizer("foo.service", 3)
			feed(s, tt.entries...)
			assert.Equal(t, tt.want, s.snapshot().UnitResult)
		})
	}
}

func TestSummaryMarkers(t *testing.T) {
	s := newSummarizer("foo.service", 3)
	s.markerID = "vmharness-journal-marker"
	feed(s,
		[]string{"_UID=0", "SYSLOG_IDENTIFIER=vmharness-journal-marker", "MESSAGE=abc123\n"},
		[]string{"_UID=1000", "SYSLOG_IDENTIFIER=vmharness-journal-marker", "MESSAGE=forged"},
		// Written to /dev/kmsg by root: no _UID.
		[]string{"_TRANSPORT=kernel", "PRIORITY=7", "SYSLOG_FACILITY=1", "SYSLOG_IDENTIFIER=vmharness-journal-marker", "MESSAGE=kmsg1"},
		[]string{"_TRANSPORT=stdout", "SYSLOG_IDENTIFIER=vmharness-journal-marker", "MESSAGE=nouid"},
		[]string{"_UID=0", "SYSLOG_IDENTIFIER=other", "MESSAGE=def456"},
	)
	assert.True(t, s.hasMarker("abc123"))
	assert.False(t, s.hasMarker("forged"), "only root logs markers")
	assert.True(t, s.hasMarker("kmsg1"), "the kernel log is root's")
	assert.False(t, s.hasMarker("nouid"), "an entry without _UID is trusted only from the kernel log")
	assert.False(t, s.hasMarker("def456"), "only the marker identifier counts")
	for i := range 2 * maxMarkers {
		feed(s, []string{"_UID=0", "SYSLOG_IDENTIFIER=vmharness-journal-marker", "MESSAGE=m" + strconv.Itoa(i)})
	}
	assert.True(t, s.hasMarker("m"+strconv.Itoa(2*maxMarkers-1)))
	assert.False(t, s.hasMarker("abc123"), "markers are bounded")
}
