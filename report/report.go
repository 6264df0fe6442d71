// Package report writes the directory CI keeps of one `vmharness run`:
// DIR/NAME/ with report.json (the verdict, its reason, the exit code Meson
// saw, timings and every attempt) and the run's journal and console log
// files, hard-linked (or copied) from the journal directory.
//
// report.json, format 1:
//
//	{
//	  "format": 1,
//	  "name": "boot",                  // the VM's name (--name, uniquified)
//	  "unit": "boot.service",
//	  "result": "pass",                // pass, skip, fail or error, from exit_code
//	  "exit_code": 0,                  // what Meson saw (after --expect-failure)
//	  "verdict": {"exit_code": 0, "reason": ""},  // the test's own outcome
//	  "expect_failure": "^regex$",     // --expect-failure, if given
//	  "start": "2026-12-01T10:00:00Z", "end": "...", "elapsed_seconds": 63.2,
//	  "attempts": [
//	    {"attempt": 1, "name": "boot", "start": "...", "end": "...",
//	     "wait_seconds": 0.0,          // waiting for a VM slot (admission)
//	     "qemu_seconds": 12.1,         // QEMU start to exit
//	     "elapsed_seconds": 13.0,
//	     "exit_code": 99, "reason": "QEMU was killed by signal killed",
//	     "retried": true,
//	     "files": ["boot.try1.journal", "boot.try1.console.log"]},
//	    {"attempt": 2, ...}
//	  ],
//	  "files": ["boot.journal", "boot.console.log", ...]  // in this directory
//	}
//
// Times are RFC 3339 with nanoseconds; durations are seconds. Files are
// listed only if they were kept (--keep-journal).
package report

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Format is the report.json format version; it changes only when a field
// changes meaning or goes away.
const Format = 1

// FileName is the report's name inside its directory.
const FileName = "report.json"

// Report is report.json.
type Report struct {
	Format         int       `json:"format"`
	Name           string    `json:"name"`
	Unit           string    `json:"unit,omitempty"`
	Result         string    `json:"result"`
	ExitCode       int       `json:"exit_code"`
	Verdict        Verdict   `json:"verdict"`
	ExpectFailure  string    `json:"expect_failure,omitempty"`
	Start          time.Time `json:"start"`
	End            time.Time `json:"end"`
	ElapsedSeconds float64   `json:"elapsed_seconds"`
	Attempts       []Attempt `json:"attempts"`
	Files          []string  `json:"files"`
}

// Verdict is the test's outcome as harness/verdict decided it.
type Verdict struct {
	ExitCode int    `json:"exit_code"`
	Reason   string `json:"reason"`
}

// Attempt is one boot of the test's VM; a run has a second one only when
// the first was retried.
type Attempt struct {
	Attempt        int       `json:"attempt"`
	Name           string    `json:"name,omitempty"`
	Start          time.Time `json:"start"`
	End            time.Time `json:"end"`
	WaitSeconds    float64   `json:"wait_seconds"`
	QEMUSeconds    float64   `json:"qemu_seconds"`
	ElapsedSeconds float64   `json:"elapsed_seconds"`
	ExitCode       int       `json:"exit_code"`
	Reason         string    `json:"reason"`
	Retried        bool      `json:"retried"`
	// Files are this attempt's journal and console files, by their names
	// in the report directory.
	Files []string `json:"files"`
}

// Result names an exit code the way Meson reports it.
func Result(exitCode int) string {
	switch exitCode {
	case 0:
		return "pass"
	case 77:
		return "skip"
	case 99:
		return "error"
	}
	return "fail"
}

// Write creates DIR/NAME (replacing what an earlier run of that name left
// there), links or copies files into it under their base names, writes
// report.json and returns the directory. r.Files is set to the files'
// names.
func Write(dir string, r Report, files []string) (string, error) {
	if r.Name == "" || r.Name != filepath.Base(r.Name) || strings.HasPrefix(r.Name, ".") {
		return "", fmt.Errorf("report: invalid name %q", r.Name)
	}
	out := filepath.Join(dir, r.Name)
	if err := os.RemoveAll(out); err != nil {
		return "", fmt.Errorf("report: removing the previous report %s: %w", out, err)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return "", fmt.Errorf("report directory: %w", err)
	}
	r.Format = Format
	r.Files = []string{}
	var errs []error
	for _, f := range files {
		name := filepath.Base(f)
		if err := linkOrCopy(f, filepath.Join(out, name)); err != nil {
			errs = append(errs, err)
			continue
		}
		r.Files = append(r.Files, name)
	}
	if r.Attempts == nil {
		r.Attempts = []Attempt{}
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", err
	}
	tmp := filepath.Join(out, "."+FileName+".tmp")
	if err := os.WriteFile(tmp, append(data, '\n'), 0o644); err != nil {
		return "", fmt.Errorf("report: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(out, FileName)); err != nil {
		return "", fmt.Errorf("report: %w", err)
	}
	if len(errs) > 0 {
		return out, fmt.Errorf("report %s is missing files: %w", out, errors.Join(errs...))
	}
	return out, nil
}

// Read reads a report.json.
func Read(path string) (Report, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Report{}, err
	}
	var r Report
	if err := json.Unmarshal(data, &r); err != nil {
		return Report{}, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

// linkOrCopy hard-links src to dst, or copies it when they are on
// different file systems.
func linkOrCopy(src, dst string) error {
	err := os.Link(src, dst)
	if err == nil {
		return nil
	}
	if !errors.Is(err, syscall.EXDEV) && !errors.Is(err, syscall.EPERM) {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
