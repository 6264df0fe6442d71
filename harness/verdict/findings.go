package verdict

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// JournalFindings are the core dumps and sanitizer reports in the test's
// complete journal, from every boot. As in systemd's own integration-test
// wrapper, any of them that is not excluded fails a test that would
// otherwise have passed or skipped: a crash or a memory error somewhere in
// the guest is a bug the test found, whatever its exit status says.
type JournalFindings struct {
	Coredumps []Coredump
	// CoredumpsUnlisted counts dumps the journal summary had no room to
	// list. They cannot be checked against an exclusion, so they count.
	CoredumpsUnlisted int
	SanitizerReports  []SanitizerReport
	// SanitizerReportsUnlisted counts reports the summary had no room for.
	SanitizerReportsUnlisted int
}

// Coredump is one crashed executable's core dumps as systemd-coredump
// logged them. Every field comes from the guest.
type Coredump struct {
	Exe, Comm string // COREDUMP_EXE, COREDUMP_COMM
	// Signal is a signal name ("SIGSEGV") or number ("11").
	Signal    string
	PID, Unit string // COREDUMP_PID, COREDUMP_UNIT
	Count     int    // dumps of this executable
}

// SanitizerReport is one program's sanitizer reports. Every field comes
// from the guest.
type SanitizerReport struct {
	// Program and PID name the process that printed the first report as
	// the journal does (its syslog identifier or process name).
	Program, PID string
	Lines        []string // the first report's lines
	Count        int      // reports by Program
}

// Exclusions are the expected findings: --coredump-exclude matches a
// dump's executable path (its process name when it has none), as
// upstream's coredump-exclude-regex does; --sanitizer-exclude matches the
// program that printed a report. Nil excludes nothing.
type Exclusions struct {
	Coredump, Sanitizer *regexp.Regexp
}

func (JournalFindings) event() {}

// Counted returns the findings that fail a test: those x does not exclude.
func (f JournalFindings) Counted(x Exclusions) JournalFindings {
	out := JournalFindings{CoredumpsUnlisted: f.CoredumpsUnlisted, SanitizerReportsUnlisted: f.SanitizerReportsUnlisted}
	for _, d := range f.Coredumps {
		if x.Coredump == nil || !x.Coredump.MatchString(d.excludeKey()) {
			out.Coredumps = append(out.Coredumps, d)
		}
	}
	for _, r := range f.SanitizerReports {
		if x.Sanitizer == nil || !x.Sanitizer.MatchString(r.Program) {
			out.SanitizerReports = append(out.SanitizerReports, r)
		}
	}
	return out
}

// Empty reports whether there is nothing to fail a test for.
func (f JournalFindings) Empty() bool {
	return f.coredumpCount() == 0 && f.sanitizerCount() == 0
}

func (f JournalFindings) coredumpCount() int {
	n := f.CoredumpsUnlisted
	for _, d := range f.Coredumps {
		n += max(d.Count, 1)
	}
	return n
}

func (f JournalFindings) sanitizerCount() int {
	n := f.SanitizerReportsUnlisted
	for _, r := range f.SanitizerReports {
		n += max(r.Count, 1)
	}
	return n
}

// describe says in one line what the findings are, naming the first core
// dump and the first sanitizer report; "" when there are none.
func (f JournalFindings) describe() string {
	var parts []string
	if n := f.coredumpCount(); n > 0 {
		s := fmt.Sprintf("%d core dumps of programs the journal summary could not list", n)
		if len(f.Coredumps) > 0 {
			d := f.Coredumps[0]
			s = fmt.Sprintf("%s dumped core (signal %s)", d.Name(), d.SignalName())
			if n > 1 {
				s += fmt.Sprintf(", and %d more core dump%s", n-1, plural(n-1))
			}
		}
		parts = append(parts, s)
	}
	if n := f.sanitizerCount(); n > 0 {
		s := fmt.Sprintf("%d sanitizer reports of programs the journal summary could not list", n)
		if len(f.SanitizerReports) > 0 {
			r := f.SanitizerReports[0]
			s = fmt.Sprintf("%s printed a sanitizer report: %s", r.Source(), r.headline())
			if n > 1 {
				s += fmt.Sprintf(" (and %d more report%s)", n-1, plural(n-1))
			}
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, "; also ")
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}

// excludeKey is what --coredump-exclude is matched against.
func (d Coredump) excludeKey() string {
	if d.Exe != "" {
		return d.Exe
	}
	return d.Comm
}

// Name is the crashed program for a message: its path, else its process
// name.
func (d Coredump) Name() string {
	if d.Exe != "" {
		return sanitize(d.Exe, 200)
	}
	if d.Comm != "" {
		return sanitize(d.Comm, 64)
	}
	return "an unknown program"
}

// SignalName is the signal the program died of, as "SIGSEGV", or its
// number when the guest gave no name this table has.
func (d Coredump) SignalName() string {
	s := sanitize(d.Signal, 16)
	if n, err := strconv.Atoi(s); err == nil {
		if name, ok := coreSignals[n]; ok {
			return name
		}
		return s
	}
	if s == "" || !strings.HasPrefix(s, "SIG") {
		return "unknown"
	}
	return s
}

// coreSignals are the signals whose default action dumps core, by their
// x86-64 Linux numbers (COREDUMP_SIGNAL when COREDUMP_SIGNAL_NAME is
// missing).
var coreSignals = map[int]string{
	3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE",
	11: "SIGSEGV", 24: "SIGXCPU", 25: "SIGXFSZ", 31: "SIGSYS",
}

// String describes the dump in one line, e.g.
// "/usr/bin/dash (sh, pid 305, SIGSEGV, unit crash.service)".
func (d Coredump) String() string {
	s := d.Name() + " (" + sanitize(d.Comm, 64)
	if d.PID != "" {
		s += ", pid " + sanitize(d.PID, 16)
	}
	s += ", " + d.SignalName()
	if d.Unit != "" {
		s += ", unit " + sanitize(d.Unit, 128)
	}
	if d.Count > 1 {
		s += fmt.Sprintf(", %d dumps", d.Count)
	}
	return s + ")"
}

// Source names the process that printed the report, as "sh[303]".
func (r SanitizerReport) Source() string {
	s := sanitize(r.Program, 64)
	if s == "" {
		s = "an unknown program"
	}
	if r.PID != "" {
		s += "[" + sanitize(r.PID, 16) + "]"
	}
	return s
}

// headline is the report's first line, shortened for a one-line reason.
func (r SanitizerReport) headline() string {
	if len(r.Lines) == 0 {
		return "(no lines)"
	}
	return sanitize(strings.TrimSpace(r.Lines[0]), 160)
}

// Text is the report's lines, each made safe for a terminal.
func (r SanitizerReport) Text() []string {
	out := make([]string, len(r.Lines))
	for i, l := range r.Lines {
		out[i] = sanitize(l, 400)
	}
	return out
}

// withFindings fails a test that passed or skipped when its journal holds
// findings x does not exclude. A failure keeps its own reason (a test that
// crashed with a core dump fails for its crash), and a harness error or a
// shell-mode run stays what it is.
func (v *Verdict) withFindings(o Outcome) Outcome {
	if v.findings == nil || v.cfg.TestNotStarted || !o.Passed() && !o.Skipped() {
		return o
	}
	what := v.findings.Counted(v.cfg.Exclude).describe()
	if what == "" {
		return o
	}
	before := "test passed"
	if o.Skipped() {
		before = o.Reason
	}
	return fail(before + ", but " + what)
}
