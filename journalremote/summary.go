package journalremote

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// Summary is what a test's journal says at a glance.
type Summary struct {
	// TestUnit is Config.TestUnit.
	TestUnit string
	// JournalFiles are the journal files of this test, the main one first
	// (more than one only if systemd-journal-remote rotated).
	JournalFiles []string
	// RawExport is the raw export file when systemd-journal-remote was
	// missing or died; convert it with ConvertCommand.
	RawExport string
	// Degraded is Collector.Degraded's message, empty when all is well.
	Degraded string

	Connections int   // journal connections the guest made
	Entries     int64 // entries received (complete ones plus kept partial ones)
	Bytes       int64 // export-format bytes received
	// Boots are the distinct _BOOT_IDs in the order they first appeared
	// (at most 100).
	Boots []string

	// UnitLines are the last lines logged by or about TestUnit (what
	// `journalctl -u` shows), oldest first, formatted like journalctl's
	// short output, with a "-- boot ID --" line before each boot's lines
	// when the guest booted more than once; UnitLinesTotal counts all
	// lines.
	UnitLines      []string
	UnitLinesTotal int64
	// Problems are kernel oopses/panics/BUGs, unit failures, failed
	// starts and core dumps from anywhere in the journal, deduplicated,
	// with how often each was seen; ProblemsOmitted counts the lines that
	// did not fit.
	Problems        []Problem
	ProblemsOmitted int

	// StreamErrors describe connections that did not end cleanly.
	StreamErrors []string
	// TruncatedEntries were kept incomplete and carry VMHARNESS_TRUNCATED.
	TruncatedEntries int64
	// SynthesizedTimestamps counts entries that came without a usable
	// __REALTIME_TIMESTAMP and got the host's receive time.
	SynthesizedTimestamps int64
	// DroppedBootIDs counts malformed or repeated _BOOT_ID fields dropped.
	DroppedBootIDs int64

	// UnitResult is TestUnit's result as PID 1 logged it in the last boot.
	UnitResult UnitResult

	// Coredumps are the core dumps systemd-coredump logged, in all boots,
	// one per crashed executable in the order first seen (findings.go);
	// CoredumpsOmitted counts the dumps of executables past the first
	// maxCoredumpExes. UntrustedCoredumps counts entries with the core
	// dump MESSAGE_ID that systemd-coredump did not send; they are
	// ignored.
	Coredumps          []Coredump
	CoredumpsOmitted   int
	UntrustedCoredumps int
	// SanitizerReports are the sanitizer reports in the journal's
	// messages, one per program; SanitizerReportsOmitted counts the
	// reports of programs past the first maxSanitizerPrograms.
	SanitizerReports        []SanitizerReport
	SanitizerReportsOmitted int
}

// UnitResult is a unit's result from PID 1's structured log messages:
// "Main process exited, code=..., status=..." (EXIT_CODE, EXIT_STATUS)
// and "Deactivated successfully" or "Failed with result '...'"
// (UNIT_RESULT).
type UnitResult struct {
	// Found is set when the boot holds any of those messages.
	Found bool
	// Result is "success" or the UNIT_RESULT of a failure; "" when the
	// journal ends before the unit's final message.
	Result string
	// ExitCode and ExitStatus are of the unit's last ExecStart= process:
	// "exited" and its status, or "killed"/"dumped" and the signal number.
	ExitCode, ExitStatus string
}

// UnitLinesShown is how many of UnitLines are log lines (not boot markers).
func (s Summary) UnitLinesShown() int64 {
	n := int64(0)
	for _, l := range s.UnitLines {
		if !strings.HasPrefix(l, "-- boot ") {
			n++
		}
	}
	return n
}

// Problem is one distinct alarming line.
type Problem struct {
	Line  string // the first occurrence, formatted like UnitLines
	Count int
}

// JournalctlCommand is the command that shows the unit's log from this
// test's journal files, or "" when there are none.
func (s Summary) JournalctlCommand() string {
	if len(s.JournalFiles) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("journalctl")
	for _, f := range s.JournalFiles {
		b.WriteString(" --file=" + shellQuote(f))
	}
	if s.TestUnit != "" {
		b.WriteString(" -u " + shellQuote(s.TestUnit))
	}
	return b.String()
}

// ConvertCommand turns RawExport into a journal file, or "" when there is
// no raw export. journalctl itself cannot import the export format.
func (s Summary) ConvertCommand() string {
	if s.RawExport == "" {
		return ""
	}
	out := strings.TrimSuffix(s.RawExport, ".export") + ".journal"
	if len(s.JournalFiles) > 0 {
		out = strings.TrimSuffix(s.RawExport, ".export") + "-rest.journal"
	}
	return fmt.Sprintf("%s --output=%s %s", journalRemoteCandidates[1], shellQuote(out), shellQuote(s.RawExport))
}

// WriteSummary prints s for a person reading a failed test's output: how to
// open the journal, the problems seen, and the unit's last lines.
func WriteSummary(w io.Writer, s Summary) error {
	var b bytes.Buffer
	boots := ""
	if len(s.Boots) != 1 {
		boots = fmt.Sprintf(", %d boots", len(s.Boots))
	}
	fmt.Fprintf(&b, "journal: %d entries over %d connection(s)%s\n", s.Entries, s.Connections, boots)
	if cmd := s.JournalctlCommand(); cmd != "" {
		fmt.Fprintf(&b, "  %s\n", cmd)
		if len(s.Boots) > 1 {
			fmt.Fprintf(&b, "  (several boots: add -b 0 for the last, -b -1 for the one before, or --list-boots)\n")
		}
	}
	if s.RawExport != "" {
		fmt.Fprintf(&b, "  raw journal export: %s\n  convert with: %s\n", s.RawExport, s.ConvertCommand())
	}
	for _, e := range s.StreamErrors {
		fmt.Fprintf(&b, "  stream: %s\n", e)
	}
	if s.TruncatedEntries > 0 {
		fmt.Fprintf(&b, "  %d entries arrived incomplete and are marked VMHARNESS_TRUNCATED\n", s.TruncatedEntries)
	}
	if len(s.Problems) > 0 {
		fmt.Fprintf(&b, "problems in the journal:\n")
		for _, p := range s.Problems {
			if p.Count > 1 {
				fmt.Fprintf(&b, "  %s  (x%d)\n", p.Line, p.Count)
			} else {
				fmt.Fprintf(&b, "  %s\n", p.Line)
			}
		}
		if s.ProblemsOmitted > 0 {
			fmt.Fprintf(&b, "  ... and %d more\n", s.ProblemsOmitted)
		}
	}
	if s.TestUnit != "" {
		switch {
		case s.UnitLinesTotal == 0:
			fmt.Fprintf(&b, "no journal lines from %s\n", s.TestUnit)
		case s.UnitLinesShown() < s.UnitLinesTotal:
			fmt.Fprintf(&b, "last %d of %d lines of %s:\n", s.UnitLinesShown(), s.UnitLinesTotal, s.TestUnit)
		default:
			fmt.Fprintf(&b, "journal of %s:\n", s.TestUnit)
		}
		for _, l := range s.UnitLines {
			fmt.Fprintf(&b, "  %s\n", l)
		}
	}
	_, err := w.Write(b.Bytes())
	return err
}

// Message IDs (sd-messages.h) that mark a problem wherever they appear.
var problemMessageIDs = map[string]bool{
	"be02cf6855d2428ba40df7e9d022f03d": true, // start job failed ("Failed to start ...")
	"d9b373ed55a64feb8242e02dbe79a49c": true, // unit failed ("Failed with result ...")
	"641257651c1b4ec9a8624d7a40a9e1e7": true, // spawning a unit's process failed
	"fc2e22bc6ee647b6b90729ab34a250b1": true, // core dump
}

// PID 1's messages about a unit's result (sd-messages.h).
const (
	unitProcessExitMessageID   = "98e322203f7a4ed290d09fe03c09fe15"
	unitSuccessMessageID       = "7ad2d189f7e94e70a38c781354912448"
	unitFailureResultMessageID = "d9b373ed55a64feb8242e02dbe79a49c"
)

// coredumpMessageID is also how `journalctl -u` finds a unit's core dumps.
const coredumpMessageID = "fc2e22bc6ee647b6b90729ab34a250b1"

// kernelProblems are the headlines of kernel splats.
var kernelProblems = [][]byte{
	[]byte("Kernel panic"), []byte("Oops"), []byte("BUG:"), []byte("kernel BUG at"),
	[]byte("WARNING: CPU:"), []byte("general protection fault"), []byte("Unable to handle kernel"),
	[]byte("segfault at"), []byte("Out of memory:"), []byte("blocked for more than"),
}

// systemdProblems catch the same failures by text, for entries without a
// MESSAGE_ID.
var systemdProblems = [][]byte{
	[]byte("Failed to start "), []byte("Dependency failed for "), []byte("emergency mode"),
}

const (
	maxProblems     = 20
	maxStreamErrors = 10
	maxBoots        = 100
	maxLineBytes    = 400
)

// entryInfo is what appendForJournalRemote learned about an entry.
type entryInfo struct {
	realtime        uint64
	bootID          []byte // valid until the entry is reused
	synthesizedTime bool
	truncated       bool
	droppedBootID   bool
}

// summarizer builds a Summary from the entries as they pass.
type summarizer struct {
	mu       sync.Mutex
	unit     string
	sum      Summary
	lastBoot string
	ring     []unitLine // last unit lines, formatted only by snapshot
	next     int
	filled   int
	problems map[string]int // line without time -> index in sum.Problems
	scratch  []byte
	// unitResults holds the unit's result per canonical boot ID (at most
	// maxBoots); the last boot's is the one that counts.
	unitResults map[string]*UnitResult
	// markerID is the SYSLOG_IDENTIFIER of marker entries, from root or
	// the kernel log; markers holds the last few markers' texts.
	markerID string
	markers  []string
	// found are the core dumps and sanitizer reports (findings.go).
	found findings
}

// maxMarkers bounds the markers remembered; the guest logs one per test
// unit run.
const maxMarkers = 16

func (s *summarizer) hasMarker(text string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range s.markers {
		if m == text {
			return true
		}
	}
	return false
}

func newSummarizer(unit string, lines int) *summarizer {
	return &summarizer{unit: unit, ring: make([]unitLine, lines), problems: make(map[string]int), unitResults: make(map[string]*UnitResult), found: newFindings()}
}

func (s *summarizer) connection() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sum.Connections++
	return s.sum.Connections
}

// unitLine is a copy of what a unit line shows, in reused buffers.
type unitLine struct {
	boot                                      string // canonical _BOOT_ID
	realtime                                  uint64
	transport, identifier, comm, pid, message []byte
}

func (l *unitLine) set(f *fieldsOfInterest, realtime uint64) {
	l.realtime = realtime
	l.transport = append(l.transport[:0], f.transport...)
	l.identifier = append(l.identifier[:0], f.identifier...)
	l.comm = append(l.comm[:0], f.comm...)
	pid := f.syslogPID
	if len(pid) == 0 {
		pid = f.pid
	}
	l.pid = append(l.pid[:0], pid...)
	l.message = append(l.message[:0], clip(f.message, maxLineBytes*4)...)
}

func (l *unitLine) format() string {
	f := fieldsOfInterest{transport: l.transport, identifier: l.identifier, comm: l.comm, pid: l.pid, message: l.message}
	return string(appendLine(nil, &f, l.realtime))
}

// fieldsOfInterest are the fields observe looks at, found in one pass.
type fieldsOfInterest struct {
	systemdUnit, unit, objectUnit, coredumpUnit, pid, uid, messageID,
	message, transport, identifier, comm, syslogPID []byte
	exitCode, exitStatus, command, unitResult []byte
	coredumpExe, coredumpComm, coredumpPID,
	coredumpSignal, coredumpSignalName, priority []byte
	haveMessage bool
}

func (s *summarizer) observe(e *Entry, info entryInfo) {
	var f fieldsOfInterest
	for i := range e.Len() {
		name, value := e.Field(i)
		switch string(name) {
		case "_SYSTEMD_UNIT":
			f.systemdUnit = value
		case "UNIT":
			f.unit = value
		case "OBJECT_SYSTEMD_UNIT":
			f.objectUnit = value
		case "COREDUMP_UNIT":
			f.coredumpUnit = value
		case "_PID":
			f.pid = value
		case "_UID":
			f.uid = value
		case "MESSAGE_ID":
			f.messageID = value
		case "MESSAGE":
			f.message, f.haveMessage = value, true
		case "_TRANSPORT":
			f.transport = value
		case "SYSLOG_IDENTIFIER":
			f.identifier = value
		case "_COMM":
			f.comm = value
		case "SYSLOG_PID":
			f.syslogPID = value
		case "EXIT_CODE":
			f.exitCode = value
		case "EXIT_STATUS":
			f.exitStatus = value
		case "COMMAND":
			f.command = value
		case "UNIT_RESULT":
			f.unitResult = value
		case "COREDUMP_EXE":
			f.coredumpExe = value
		case "COREDUMP_COMM":
			f.coredumpComm = value
		case "COREDUMP_PID":
			f.coredumpPID = value
		case "COREDUMP_SIGNAL":
			f.coredumpSignal = value
		case "COREDUMP_SIGNAL_NAME":
			f.coredumpSignalName = value
		case "PRIORITY":
			f.priority = value
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	s.sum.Entries++
	if info.truncated {
		s.sum.TruncatedEntries++
	}
	if info.synthesizedTime {
		s.sum.SynthesizedTimestamps++
	}
	if info.droppedBootID {
		s.sum.DroppedBootIDs++
	}
	if info.bootID != nil {
		s.noteBoot(info.bootID)
	}
	if string(f.messageID) == coredumpMessageID {
		s.found.noteCoredump(&f)
	}
	if !f.haveMessage {
		return
	}
	s.found.scanSanitizer(&f)
	if s.unit != "" && string(f.pid) == "1" && string(f.unit) == s.unit {
		s.noteUnitResult(&f)
	}
	// Only root logs as uid 0 or writes the kernel log (/dev/kmsg): a
	// test's unprivileged processes cannot forge a marker.
	if s.markerID != "" && string(f.identifier) == s.markerID && (string(f.uid) == "0" || string(f.transport) == "kernel") {
		if len(s.markers) == maxMarkers {
			s.markers = s.markers[1:]
		}
		s.markers = append(s.markers, string(clip(bytes.TrimSpace(f.message), 64)))
	}
	if s.unit != "" && s.aboutUnit(&f) {
		s.sum.UnitLinesTotal++
		s.ring[s.next].set(&f, info.realtime)
		s.ring[s.next].boot = s.lastBoot
		s.next = (s.next + 1) % len(s.ring)
		s.filled = min(s.filled+1, len(s.ring))
	}
	if isProblem(&f) {
		s.scratch = appendLine(s.scratch[:0], &f, 0)
		key := string(s.scratch)
		if i, ok := s.problems[key]; ok {
			s.sum.Problems[i].Count++
		} else if len(s.sum.Problems) < maxProblems {
			s.problems[key] = len(s.sum.Problems)
			s.sum.Problems = append(s.sum.Problems, Problem{Line: string(appendLine(nil, &f, info.realtime)), Count: 1})
		} else {
			// Not remembered: a hostile guest could send endless
			// distinct lines.
			s.sum.ProblemsOmitted++
		}
	}
}

// noteUnitResult records what PID 1 says about the test unit's result in
// the current boot.
func (s *summarizer) noteUnitResult(f *fieldsOfInterest) {
	var r UnitResult
	switch string(f.messageID) {
	case unitProcessExitMessageID:
		if string(f.command) != "ExecStart" {
			return // ExecStartPre=, ExecStopPost=, ... are not the test
		}
		r.ExitCode, r.ExitStatus = string(clip(f.exitCode, 16)), string(clip(f.exitStatus, 16))
	case unitSuccessMessageID:
		r.Result = "success"
	case unitFailureResultMessageID:
		r.Result = string(clip(f.unitResult, 32))
	default:
		return
	}
	cur := s.unitResults[s.lastBoot]
	if cur == nil {
		if len(s.unitResults) >= maxBoots {
			return
		}
		cur = &UnitResult{}
		s.unitResults[s.lastBoot] = cur
	}
	cur.Found = true
	if r.Result != "" {
		cur.Result = r.Result
	}
	if r.ExitCode != "" {
		cur.ExitCode, cur.ExitStatus = r.ExitCode, r.ExitStatus
		// A new process exit starts a new run of the unit in this boot.
		if r.Result == "" {
			cur.Result = ""
		}
	}
}

// noteBoot records a boot ID in canonical form (32 lowercase hex digits).
func (s *summarizer) noteBoot(id []byte) {
	var buf [32]byte
	n := 0
	for _, c := range id {
		if c == '-' {
			continue
		}
		if c >= 'A' && c <= 'F' {
			c += 'a' - 'A'
		}
		buf[n] = c
		n++
	}
	if string(buf[:n]) == s.lastBoot {
		return
	}
	s.lastBoot = string(buf[:n])
	for _, b := range s.sum.Boots {
		if b == s.lastBoot {
			return
		}
	}
	if len(s.sum.Boots) < maxBoots {
		s.sum.Boots = append(s.sum.Boots, s.lastBoot)
	}
}

// aboutUnit mirrors `journalctl -u UNIT`: the unit's own output, its core
// dumps, PID 1's messages about it and privileged daemons' messages about it.
func (s *summarizer) aboutUnit(f *fieldsOfInterest) bool {
	u := s.unit
	return string(f.systemdUnit) == u ||
		string(f.messageID) == coredumpMessageID && string(f.uid) == "0" && string(f.coredumpUnit) == u ||
		string(f.pid) == "1" && string(f.unit) == u ||
		string(f.uid) == "0" && string(f.objectUnit) == u
}

func isProblem(f *fieldsOfInterest) bool {
	if problemMessageIDs[string(f.messageID)] {
		return true
	}
	if string(f.transport) == "kernel" {
		for _, p := range kernelProblems {
			if bytes.Contains(f.message, p) {
				return true
			}
		}
		return false
	}
	if string(f.pid) == "1" {
		for _, p := range systemdProblems {
			if bytes.Contains(f.message, p) {
				return true
			}
		}
	}
	return false
}

// appendLine formats an entry like journalctl's short output; realtime 0
// leaves the time out.
func appendLine(dst []byte, f *fieldsOfInterest, realtime uint64) []byte {
	if realtime != 0 {
		dst = time.UnixMicro(int64(realtime)).AppendFormat(dst, time.StampMilli)
		dst = append(dst, ' ')
	}
	switch {
	case string(f.transport) == "kernel":
		dst = append(dst, "kernel"...)
	case len(f.identifier) > 0:
		dst = appendPrintable(dst, f.identifier, 64)
	case len(f.comm) > 0:
		dst = appendPrintable(dst, f.comm, 64)
	default:
		dst = append(dst, "unknown"...)
	}
	pid := f.syslogPID
	if len(pid) == 0 {
		pid = f.pid
	}
	if len(pid) > 0 && string(f.transport) != "kernel" {
		dst = append(dst, '[')
		dst = appendPrintable(dst, pid, 16)
		dst = append(dst, ']')
	}
	dst = append(dst, ": "...)
	return appendPrintable(dst, f.message, maxLineBytes)
}

// appendPrintable copies guest text for a terminal: control characters and
// invalid UTF-8 become \xNN (newlines \n), and it is cut at max bytes.
func appendPrintable(dst, b []byte, max int) []byte {
	start := len(dst)
	for len(b) > 0 {
		if len(dst)-start >= max {
			return append(dst, "…"...)
		}
		r, size := utf8.DecodeRune(b)
		switch {
		case r == '\n':
			dst = append(dst, `\n`...)
		case r == '\t':
			dst = append(dst, ' ')
		case r == utf8.RuneError && size <= 1, r < ' ', r == 0x7f, r >= 0x80 && r < 0xa0:
			for _, c := range b[:size] {
				dst = append(dst, `\x`...)
				dst = append(dst, "0123456789abcdef"[c>>4], "0123456789abcdef"[c&15])
			}
		default:
			dst = append(dst, b[:size]...)
		}
		b = b[size:]
	}
	return dst
}

// refused records a connection turned away for being one too many.
func (s *summarizer) refused() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.sum.StreamErrors) < maxStreamErrors {
		s.sum.StreamErrors = append(s.sum.StreamErrors, fmt.Sprintf("refused a connection: already %d open", maxConcurrentConns))
	}
}

// streamEnded records how connection n ended after consuming bytes.
func (s *summarizer) streamEnded(n int, bytes int64, kept int, err error, cutByClose bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sum.Bytes += bytes
	var msg string
	switch {
	case errors.Is(err, io.EOF):
		return
	case cutByClose && errors.Is(err, net.ErrClosed):
		msg = fmt.Sprintf("connection %d was still open after the VM stopped; cut it after %d bytes", n, bytes)
	case errors.Is(err, net.ErrClosed):
		// The VM stopped (or was stopped once the test's outcome was
		// decided) while journald still had its connection open.
		msg = fmt.Sprintf("connection %d was still open when the VM stopped; cut it after %d bytes", n, bytes)
	case errors.Is(err, ErrTruncated):
		msg = fmt.Sprintf("connection %d ended inside an entry", n)
	default:
		msg = fmt.Sprintf("connection %d: %v", n, err)
	}
	if kept > 0 {
		msg += fmt.Sprintf("; kept the unfinished entry's %d complete fields", kept)
	}
	if len(s.sum.StreamErrors) < maxStreamErrors {
		s.sum.StreamErrors = append(s.sum.StreamErrors, msg)
	}
}

func (s *summarizer) snapshot() Summary {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.sum
	out.Boots = append([]string(nil), s.sum.Boots...)
	out.Problems = append([]Problem(nil), s.sum.Problems...)
	out.StreamErrors = append([]string(nil), s.sum.StreamErrors...)
	s.found.snapshot(&out)
	if n := len(s.sum.Boots); n > 0 {
		if r := s.unitResults[s.sum.Boots[n-1]]; r != nil {
			out.UnitResult = *r
		}
	}
	out.UnitLines = make([]string, 0, s.filled)
	prevBoot := ""
	for i := range s.filled {
		l := &s.ring[(s.next-s.filled+i+len(s.ring))%len(s.ring)]
		if len(s.sum.Boots) > 1 && l.boot != prevBoot {
			out.UnitLines = append(out.UnitLines, "-- boot "+l.boot+" --")
			prevBoot = l.boot
		}
		out.UnitLines = append(out.UnitLines, l.format())
	}
	return out
}

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("@%+=:,./_-", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
