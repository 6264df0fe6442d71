package journalremote

import (
	"bytes"
	"regexp"
	"strings"
)

// Coredump is one crashed executable's core dumps, as systemd-coredump
// logged them (MESSAGE_ID coredumpMessageID). The fields are the first
// dump's, made printable and bounded; they come from the guest.
type Coredump struct {
	// Exe is COREDUMP_EXE, the crashed executable's path; Comm is
	// COREDUMP_COMM, its process name.
	Exe, Comm string
	// Signal is COREDUMP_SIGNAL_NAME ("SIGSEGV"), or COREDUMP_SIGNAL's
	// number when the name is missing.
	Signal string
	// PID is COREDUMP_PID, Unit COREDUMP_UNIT (the crashed process's unit).
	PID, Unit string
	// Count is how many dumps of Exe the journal holds.
	Count int
}

// SanitizerReport is one program's sanitizer reports (ASan, UBSan, LSan,
// MSan, TSan) found in the journal's messages.
type SanitizerReport struct {
	// Program and PID name the process that printed the first report, as
	// journalctl does before its message: SYSLOG_IDENTIFIER or _COMM, and
	// SYSLOG_PID or _PID.
	Program, PID string
	// Lines are the first report's lines, printable, at most
	// maxReportLines of them.
	Lines []string
	// Count is how many reports Program printed.
	Count int
}

const (
	// A guest can crash any number of distinct programs or print any
	// number of reports; the summary lists this many and counts the rest.
	maxCoredumpExes       = 32
	maxSanitizerPrograms  = 16
	maxOpenReports        = 32
	maxReportLines        = 40
	maxCoredumpFieldBytes = 256
)

// Sanitizer report boundaries, as systemd's integration-test wrapper
// recognizes them, plus ThreadSanitizer's header (it has no "==PID=="
// prefix):
//
//	==123==ERROR: AddressSanitizer: heap-use-after-free on address ...
//	==123==ERROR: LeakSanitizer: detected memory leaks
//	==123==WARNING: MemorySanitizer: use-of-uninitialized-value
//	==123==LeakSanitizer has encountered a fatal error.
//	WARNING: ThreadSanitizer: data race (pid=123)
//	src/foo.c:12:5: runtime error: signed integer overflow: ...   (UBSan)
//
// A report ends with "SUMMARY: XSanitizer: ..." or, for a sanitizer's own
// fatal error, "==123==HINT: XSanitizer ...".
var (
	sanitizerStart = regexp.MustCompile(`==[0-9]+==.*?\w+Sanitizer|WARNING: ThreadSanitizer:|[0-9]+: runtime error`)
	sanitizerEnd   = regexp.MustCompile(`SUMMARY:\s+\w+Sanitizer|==[0-9]+==HINT:\s+\w+Sanitizer`)
	// LeakSanitizer warns that it may hang when ptrace is blocked; upstream
	// does not count that warning as a report, and neither do we.
	sanitizerPtraceWarning = regexp.MustCompile(`^==[0-9]+==WARNING: ptrace`)
)

// findings collects core dumps and sanitizer reports as entries pass.
// The summarizer's lock guards it.
type findings struct {
	coredumps        []Coredump
	coredumpByExe    map[string]int
	coredumpsOmitted int
	untrusted        int

	reports        []SanitizerReport
	reportByProg   map[string]int
	reportsOmitted int
	// open are the reports still being printed, by "PROGRAM[PID]": their
	// following lines belong to them until the report's end line.
	open map[string]*openReport
}

type openReport struct {
	// index is the report's place in reports when its lines are kept
	// (the program's first report), -1 otherwise.
	index int
}

func newFindings() findings {
	return findings{coredumpByExe: make(map[string]int), reportByProg: make(map[string]int), open: make(map[string]*openReport)}
}

// fromSystemdCoredump says whether journald's own fields, which the
// guest's unprivileged processes cannot set, show systemd-coredump as the
// sender: its socket-activated service instance, or root. (systemd-coredump
// drops to its own user, or to the crashed process's, before it logs, so
// the entry's _UID is rarely 0.)
func fromSystemdCoredump(f *fieldsOfInterest) bool {
	unit := string(f.systemdUnit)
	return strings.HasPrefix(unit, "systemd-coredump@") && strings.HasSuffix(unit, ".service") ||
		string(f.uid) == "0"
}

func (c *findings) noteCoredump(f *fieldsOfInterest) {
	if !fromSystemdCoredump(f) {
		c.untrusted++
		return
	}
	exe := printable(f.coredumpExe, maxCoredumpFieldBytes)
	if i, ok := c.coredumpByExe[exe]; ok {
		c.coredumps[i].Count++
		return
	}
	if len(c.coredumps) >= maxCoredumpExes {
		c.coredumpsOmitted++
		return
	}
	signal := printable(f.coredumpSignalName, 16)
	if signal == "" {
		signal = printable(f.coredumpSignal, 16)
	}
	c.coredumpByExe[exe] = len(c.coredumps)
	c.coredumps = append(c.coredumps, Coredump{
		Exe:    exe,
		Comm:   printable(f.coredumpComm, 64),
		Signal: signal,
		PID:    printable(f.coredumpPID, 16),
		Unit:   printable(f.coredumpUnit, maxCoredumpFieldBytes),
		Count:  1,
	})
}

// scanSanitizer looks for sanitizer reports in one message, line by line.
func (c *findings) scanSanitizer(f *fieldsOfInterest) {
	// journalctl -p info, as upstream reads the journal: debug messages
	// do not count.
	if string(f.priority) == "7" {
		return
	}
	msg := f.message
	marked := bytes.Contains(msg, []byte("Sanitizer")) || bytes.Contains(msg, []byte("runtime error"))
	if !marked && len(c.open) == 0 {
		return // the common case, cheaply
	}
	prog := f.identifier
	if len(prog) == 0 {
		prog = f.comm
	}
	pid := f.syslogPID
	if len(pid) == 0 {
		pid = f.pid
	}
	program, pidText := printable(prog, 64), printable(pid, 16)
	key := program + "[" + pidText + "]"
	if !marked && c.open[key] == nil {
		return
	}
	for len(msg) > 0 {
		line := msg
		if i := bytes.IndexByte(msg, '\n'); i >= 0 {
			line, msg = msg[:i], msg[i+1:]
		} else {
			msg = nil
		}
		c.scanLine(line, key, program, pidText)
	}
}

func (c *findings) scanLine(line []byte, key, program, pid string) {
	open := c.open[key]
	end := sanitizerEnd.Match(line)
	if open != nil && !end && isSanitizerStart(line) {
		// A new report before the last one's end line: the last one is over.
		delete(c.open, key)
		open = nil
	}
	if open == nil {
		if end || !isSanitizerStart(line) {
			return
		}
		open = c.startReport(key, program, pid)
	}
	if open.index >= 0 && len(c.reports[open.index].Lines) < maxReportLines {
		r := &c.reports[open.index]
		r.Lines = append(r.Lines, printable(line, maxLineBytes))
	}
	if end {
		delete(c.open, key)
	}
}

func isSanitizerStart(line []byte) bool {
	return sanitizerStart.Match(line) && !sanitizerPtraceWarning.Match(line)
}

// startReport counts a new report and, if there is room, tracks its lines.
func (c *findings) startReport(key, program, pid string) *openReport {
	open := &openReport{index: -1}
	if i, ok := c.reportByProg[program]; ok {
		c.reports[i].Count++
	} else if len(c.reports) < maxSanitizerPrograms {
		c.reportByProg[program] = len(c.reports)
		open.index = len(c.reports)
		c.reports = append(c.reports, SanitizerReport{Program: program, PID: pid, Count: 1})
	} else {
		c.reportsOmitted++
	}
	if len(c.open) < maxOpenReports {
		c.open[key] = open
	}
	return open
}

// snapshot copies the findings into s.
func (c *findings) snapshot(s *Summary) {
	s.Coredumps = append([]Coredump(nil), c.coredumps...)
	s.CoredumpsOmitted = c.coredumpsOmitted
	s.UntrustedCoredumps = c.untrusted
	s.SanitizerReports = make([]SanitizerReport, len(c.reports))
	for i, r := range c.reports {
		r.Lines = append([]string(nil), r.Lines...)
		s.SanitizerReports[i] = r
	}
	s.SanitizerReportsOmitted = c.reportsOmitted
}

// printable makes guest text safe for a terminal and bounds it.
func printable(b []byte, max int) string {
	return string(appendPrintable(nil, b, max))
}

// CoredumpctlCommand is the coredumpctl command line that reads this
// test's journal files, with args appended (e.g. "info", an executable),
// or "" when there are none.
func (s Summary) CoredumpctlCommand(args ...string) string {
	if len(s.JournalFiles) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("coredumpctl")
	for _, f := range s.JournalFiles {
		b.WriteString(" --file=" + shellQuote(f))
	}
	for _, a := range args {
		b.WriteString(" " + shellQuote(a))
	}
	return b.String()
}
