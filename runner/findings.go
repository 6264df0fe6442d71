package runner

import (
	"fmt"
	"io"
	"regexp"

	"github.com/vmharness/vmharness/harness/verdict"
	"github.com/vmharness/vmharness/journalremote"
)

// parseExclusions compiles --coredump-exclude and --sanitizer-exclude; an
// empty pattern excludes nothing.
func parseExclusions(coredump, sanitizer string) (verdict.Exclusions, error) {
	var x verdict.Exclusions
	for _, f := range []struct {
		flag, pattern string
		re            **regexp.Regexp
	}{{"--coredump-exclude", coredump, &x.Coredump}, {"--sanitizer-exclude", sanitizer, &x.Sanitizer}} {
		if f.pattern == "" {
			continue
		}
		re, err := regexp.Compile(f.pattern)
		if err != nil {
			return verdict.Exclusions{}, fmt.Errorf("%s: %w (Go regular expression syntax)", f.flag, err)
		}
		*f.re = re
	}
	return x, nil
}

// findings are the core dumps and sanitizer reports in the test's journal
// for the verdict; call it after finish.
func (j *journalRun) findings() verdict.JournalFindings {
	return findingsOf(j.collector.Summary())
}

func findingsOf(s journalremote.Summary) verdict.JournalFindings {
	f := verdict.JournalFindings{CoredumpsUnlisted: s.CoredumpsOmitted, SanitizerReportsUnlisted: s.SanitizerReportsOmitted}
	for _, d := range s.Coredumps {
		f.Coredumps = append(f.Coredumps, verdict.Coredump{Exe: d.Exe, Comm: d.Comm, Signal: d.Signal, PID: d.PID, Unit: d.Unit, Count: d.Count})
	}
	for _, r := range s.SanitizerReports {
		f.SanitizerReports = append(f.SanitizerReports, verdict.SanitizerReport{Program: r.Program, PID: r.PID, Lines: r.Lines, Count: r.Count})
	}
	return f
}

// writeFindings prints, for a failed test, the core dumps and sanitizer
// reports that count against it, how to read them, and how many the
// exclusions left out.
func (j *journalRun) writeFindings(w io.Writer, x verdict.Exclusions) {
	writeFindings(w, j.collector.Summary(), x)
}

func writeFindings(w io.Writer, s journalremote.Summary, x verdict.Exclusions) {
	all := findingsOf(s)
	counted := all.Counted(x)
	if n := len(counted.Coredumps) + counted.CoredumpsUnlisted; n > 0 {
		fmt.Fprintf(w, "core dumps in the journal:\n")
		for _, d := range counted.Coredumps {
			fmt.Fprintf(w, "  %s\n", d)
		}
		if counted.CoredumpsUnlisted > 0 {
			fmt.Fprintf(w, "  ... and %d more of programs not listed\n", counted.CoredumpsUnlisted)
		}
		if cmd := s.CoredumpctlCommand("info"); cmd != "" {
			if len(counted.Coredumps) > 0 && counted.Coredumps[0].Exe != "" {
				cmd = s.CoredumpctlCommand("info", counted.Coredumps[0].Name())
			}
			// The core files themselves stayed in the guest; the journal
			// holds each dump's metadata and, with libdw in the image, its
			// stack trace.
			fmt.Fprintf(w, "  read them with: %s\n", cmd)
			fmt.Fprintf(w, "  list them with: %s\n", s.CoredumpctlCommand("list"))
		}
	}
	if excluded := len(all.Coredumps) - len(counted.Coredumps); excluded > 0 {
		fmt.Fprintf(w, "core dumps of %d program(s) excluded by --coredump-exclude %q\n", excluded, x.Coredump)
	}
	if s.UntrustedCoredumps > 0 {
		fmt.Fprintf(w, "%d core dump message(s) not sent by systemd-coredump were ignored\n", s.UntrustedCoredumps)
	}
	if len(counted.SanitizerReports) > 0 {
		r := counted.SanitizerReports[0]
		fmt.Fprintf(w, "sanitizer report from %s:\n", r.Source())
		for _, l := range r.Text() {
			fmt.Fprintf(w, "  %s\n", l)
		}
		for _, r := range counted.SanitizerReports[1:] {
			fmt.Fprintf(w, "  also %d report(s) from %s\n", r.Count, r.Source())
		}
	}
	if counted.SanitizerReportsUnlisted > 0 {
		fmt.Fprintf(w, "  also %d report(s) of programs not listed\n", counted.SanitizerReportsUnlisted)
	}
	if excluded := len(all.SanitizerReports) - len(counted.SanitizerReports); excluded > 0 {
		fmt.Fprintf(w, "sanitizer reports of %d program(s) excluded by --sanitizer-exclude %q\n", excluded, x.Sanitizer)
	}
}
