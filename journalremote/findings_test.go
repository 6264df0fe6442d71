package journalremote

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// coredumpEntry is systemd-coredump's entry as a Debian trixie guest
// (systemd 257) sends it, trimmed: it logs as its own user (997 there)
// from its socket-activated service instance.
func coredumpEntry(extra ...string) []string {
	return append([]string{
		"_TRANSPORT=journal", "SYSLOG_IDENTIFIER=systemd-coredump", "_COMM=systemd-coredum",
		"COREDUMP_PID=305", "COREDUMP_UID=0", "COREDUMP_SIGNAL=11", "COREDUMP_SIGNAL_NAME=SIGSEGV",
		"COREDUMP_COMM=sh", "COREDUMP_EXE=/usr/bin/dash", "COREDUMP_UNIT=crash.service",
		"MESSAGE_ID=" + coredumpMessageID, "PRIORITY=2",
		"MESSAGE=Process 305 (sh) of user 0 dumped core.",
		"_PID=307", "_UID=997", "_SYSTEMD_UNIT=systemd-coredump@0-306-0.service",
	}, extra...)
}

// with replaces or adds fields of an entry.
func with(entry []string, fields ...string) []string {
	out := append([]string(nil), entry...)
	for _, f := range fields {
		name, _, _ := strings.Cut(f, "=")
		replaced := false
		for i, g := range out {
			if strings.HasPrefix(g, name+"=") {
				out[i], replaced = f, true
			}
		}
		if !replaced {
			out = append(out, f)
		}
	}
	return out
}

func TestSummaryCoredumps(t *testing.T) {
	tests := []struct {
		name          string
		entries       [][]string
		want          []Coredump
		wantOmitted   int
		wantUntrusted int
	}{
		{
			name:    "systemd-coredump's entry",
			entries: [][]string{coredumpEntry()},
			want:    []Coredump{{Exe: "/usr/bin/dash", Comm: "sh", Signal: "SIGSEGV", PID: "305", Unit: "crash.service", Count: 1}},
		},
		{
			name:    "dumps of one executable are counted, the first one's fields kept",
			entries: [][]string{coredumpEntry(), with(coredumpEntry(), "COREDUMP_PID=400", "COREDUMP_SIGNAL_NAME=SIGABRT")},
			want:    []Coredump{{Exe: "/usr/bin/dash", Comm: "sh", Signal: "SIGSEGV", PID: "305", Unit: "crash.service", Count: 2}},
		},
		{
			name:    "the signal's number when its name is missing",
			entries: [][]string{with(coredumpEntry(), "COREDUMP_SIGNAL_NAME=")},
			want:    []Coredump{{Exe: "/usr/bin/dash", Comm: "sh", Signal: "11", PID: "305", Unit: "crash.service", Count: 1}},
		},
		{
			name:    "root is trusted (systemd-coredump without its own user)",
			entries: [][]string{with(coredumpEntry(), "_UID=0", "_SYSTEMD_UNIT=")},
			want:    []Coredump{{Exe: "/usr/bin/dash", Comm: "sh", Signal: "SIGSEGV", PID: "305", Unit: "crash.service", Count: 1}},
		},
		{
			name: "anyone else's entry with the MESSAGE_ID is ignored",
			entries: [][]string{
				with(coredumpEntry(), "_UID=1000", "_SYSTEMD_UNIT=user@1000.service"),
				with(coredumpEntry(), "_UID=1000", "_SYSTEMD_UNIT=systemd-coredump@x.socket"),
				with(coredumpEntry(), "_UID=", "_SYSTEMD_UNIT="),
			},
			wantUntrusted: 3,
		},
		{
			name: "hostile field values are made printable and bounded",
			entries: [][]string{with(coredumpEntry(),
				"COREDUMP_EXE=/usr/bin/\x1b[2Jevil\nline"+strings.Repeat("x", 1000),
				"COREDUMP_SIGNAL_NAME=SIG\x07"+strings.Repeat("Y", 100))},
			want: []Coredump{{
				Exe:    "/usr/bin/\\x1b[2Jevil\\nline" + strings.Repeat("x", maxCoredumpFieldBytes-len("/usr/bin/\\x1b[2Jevil\\nline")) + "…",
				Comm:   "sh",
				Signal: "SIG\\x07YYYYYYYYY…",
				PID:    "305", Unit: "crash.service", Count: 1,
			}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newSummarizer("crash.service", 10)
			feed(s, tt.entries...)
			sum := s.snapshot()
			assert.Equal(t, tt.want, sum.Coredumps)
			assert.Equal(t, tt.wantOmitted, sum.CoredumpsOmitted)
			assert.Equal(t, tt.wantUntrusted, sum.UntrustedCoredumps)
		})
	}
}

func TestSummaryCoredumpsBounded(t *testing.T) {
	s := newSummarizer("crash.service", 10)
	for i := range maxCoredumpExes + 5 {
		feed(s, with(coredumpEntry(), fmt.Sprintf("COREDUMP_EXE=/usr/bin/prog%d", i)))
	}
	sum := s.snapshot()
	assert.Len(t, sum.Coredumps, maxCoredumpExes)
	assert.Equal(t, 5, sum.CoredumpsOmitted)
}

// stderr is a line a service printed on stderr, as journald records it.
func stderr(prog, pid, msg string) []string {
	return []string{"_TRANSPORT=stdout", "SYSLOG_IDENTIFIER=" + prog, "_PID=" + pid, "PRIORITY=6", "MESSAGE=" + msg}
}

var asanReport = []string{
	"=================================================================",
	"==303==ERROR: AddressSanitizer: heap-use-after-free on address 0x602000000010 at pc 0x55d0 bp 0x7ffc sp 0x7ffc",
	"READ of size 4 at 0x602000000010 thread T0",
	"    #0 0x55d0 in main /src/uaf.c:7",
	"SUMMARY: AddressSanitizer: heap-use-after-free /src/uaf.c:7 in main",
	"==303==ABORTING",
}

func TestSummarySanitizerReports(t *testing.T) {
	lines := func(prog, pid string, msgs ...string) [][]string {
		var out [][]string
		for _, m := range msgs {
			out = append(out, stderr(prog, pid, m))
		}
		return out
	}
	asan := asanReport[1:5] // from the header line to SUMMARY
	tests := []struct {
		name        string
		entries     [][]string
		want        []SanitizerReport
		wantOmitted int
	}{
		{
			name:    "an ASan report, from its header to its SUMMARY line",
			entries: lines("uaf", "303", asanReport...),
			want:    []SanitizerReport{{Program: "uaf", PID: "303", Lines: asan, Count: 1}},
		},
		{
			name: "other processes' lines in between are not part of it",
			entries: append(append(lines("uaf", "303", asanReport[:3]...),
				stderr("other", "9", "unrelated"), stderr("uaf", "304", "same program, other process")),
				lines("uaf", "303", asanReport[3:]...)...),
			want: []SanitizerReport{{Program: "uaf", PID: "303", Lines: asan, Count: 1}},
		},
		{
			name:    "one message holding the whole report",
			entries: [][]string{stderr("uaf", "303", strings.Join(asanReport, "\n"))},
			want:    []SanitizerReport{{Program: "uaf", PID: "303", Lines: asan, Count: 1}},
		},
		{
			name: "UBSan, LSan, MSan and TSan",
			entries: append(append(append(
				lines("ub", "1", "src/foo.c:12:5: runtime error: signed integer overflow: 2147483647 + 1", "SUMMARY: UndefinedBehaviorSanitizer: undefined-behavior src/foo.c:12:5"),
				lines("leak", "2", "==2==ERROR: LeakSanitizer: detected memory leaks", "Direct leak of 4 byte(s)", "SUMMARY: AddressSanitizer: 4 byte(s) leaked in 1 allocation(s).")...),
				lines("msan", "3", "==3==WARNING: MemorySanitizer: use-of-uninitialized-value", "SUMMARY: MemorySanitizer: use-of-uninitialized-value")...),
				lines("tsan", "4", "WARNING: ThreadSanitizer: data race (pid=4)", "SUMMARY: ThreadSanitizer: data race")...),
			want: []SanitizerReport{
				{Program: "ub", PID: "1", Lines: []string{"src/foo.c:12:5: runtime error: signed integer overflow: 2147483647 + 1", "SUMMARY: UndefinedBehaviorSanitizer: undefined-behavior src/foo.c:12:5"}, Count: 1},
				{Program: "leak", PID: "2", Lines: []string{"==2==ERROR: LeakSanitizer: detected memory leaks", "Direct leak of 4 byte(s)", "SUMMARY: AddressSanitizer: 4 byte(s) leaked in 1 allocation(s)."}, Count: 1},
				{Program: "msan", PID: "3", Lines: []string{"==3==WARNING: MemorySanitizer: use-of-uninitialized-value", "SUMMARY: MemorySanitizer: use-of-uninitialized-value"}, Count: 1},
				{Program: "tsan", PID: "4", Lines: []string{"WARNING: ThreadSanitizer: data race (pid=4)", "SUMMARY: ThreadSanitizer: data race"}, Count: 1},
			},
		},
		{
			name: "a sanitizer's own fatal error ends at its HINT line",
			entries: lines("lsan", "5", "==5==LeakSanitizer has encountered a fatal error.",
				"==5==HINT: For debugging, try setting environment variable LSAN_OPTIONS=verbosity=1:log_threads=1",
				"==5==HINT: LeakSanitizer does not work under ptrace (strace, gdb, etc)",
				"after the report"),
			want: []SanitizerReport{{Program: "lsan", PID: "5", Lines: []string{"==5==LeakSanitizer has encountered a fatal error.",
				"==5==HINT: For debugging, try setting environment variable LSAN_OPTIONS=verbosity=1:log_threads=1",
				"==5==HINT: LeakSanitizer does not work under ptrace (strace, gdb, etc)"}, Count: 1}},
		},
		{
			name: "reports of one program are counted, the first one's lines kept",
			entries: append(lines("uaf", "303", asanReport...),
				lines("uaf", "310", "==310==ERROR: AddressSanitizer: SEGV on unknown address", "SUMMARY: AddressSanitizer: SEGV")...),
			want: []SanitizerReport{{Program: "uaf", PID: "303", Lines: asan, Count: 2}},
		},
		{
			name: "a new report before the last one's end starts over",
			entries: lines("ub", "1", "a.c:1:1: runtime error: first", "a.c:2:1: runtime error: second",
				"SUMMARY: UndefinedBehaviorSanitizer: undefined-behavior a.c:2:1"),
			want: []SanitizerReport{{Program: "ub", PID: "1", Lines: []string{"a.c:1:1: runtime error: first"}, Count: 2}},
		},
		{
			name: "not reports: the ptrace warning, debug messages, the words alone",
			entries: [][]string{
				stderr("oomd", "93", "==93==WARNING: ptrace appears to be blocked (is seccomp enabled?). LeakSanitizer may hang."),
				with(stderr("dbg", "7", "==7==ERROR: AddressSanitizer: in a debug message"), "PRIORITY=7"),
				stderr("doc", "8", "built with AddressSanitizer support"),
				stderr("doc", "8", "SUMMARY: AddressSanitizer: an end line without a report"),
			},
		},
		{
			name: "hostile lines are made printable",
			entries: lines("e\x1bvil", "1", "==1==ERROR: AddressSanitizer: \x1b[2J\x07boom",
				"SUMMARY: AddressSanitizer: x"),
			want: []SanitizerReport{{Program: "e\\x1bvil", PID: "1", Lines: []string{"==1==ERROR: AddressSanitizer: \\x1b[2J\\x07boom", "SUMMARY: AddressSanitizer: x"}, Count: 1}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newSummarizer("x.service", 10)
			feed(s, tt.entries...)
			sum := s.snapshot()
			if tt.want == nil {
				tt.want = []SanitizerReport{}
			}
			assert.Equal(t, tt.want, sum.SanitizerReports)
			assert.Equal(t, tt.wantOmitted, sum.SanitizerReportsOmitted)
		})
	}
}

func TestSummarySanitizerReportsBounded(t *testing.T) {
	s := newSummarizer("x.service", 10)
	for i := range maxSanitizerPrograms + 3 {
		prog := fmt.Sprintf("p%d", i)
		feed(s, stderr(prog, "1", "==1==ERROR: AddressSanitizer: x"))
		for j := range maxReportLines + 10 {
			feed(s, stderr(prog, "1", fmt.Sprintf("    #%d frame", j)))
		}
	}
	sum := s.snapshot()
	require.Len(t, sum.SanitizerReports, maxSanitizerPrograms)
	assert.Equal(t, 3, sum.SanitizerReportsOmitted)
	for _, r := range sum.SanitizerReports {
		assert.Len(t, r.Lines, maxReportLines)
	}
	assert.LessOrEqual(t, len(s.found.open), maxOpenReports, "reports without an end line stay bounded")
}

func TestCoredumpctlCommand(t *testing.T) {
	assert.Equal(t, "", Summary{}.CoredumpctlCommand("list"))
	s := Summary{JournalFiles: []string{"/j/a.journal", "/j/my test.journal"}}
	assert.Equal(t, "coredumpctl --file=/j/a.journal --file='/j/my test.journal' info /usr/bin/dash", s.CoredumpctlCommand("info", "/usr/bin/dash"))
}
