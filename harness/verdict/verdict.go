// Package verdict owns the result protocol of one test VM: what is
// installed in the guest so that it reports the test's result, what the
// guest reports back (sd_notify messages from PID 1 and from the test unit
// itself, the unit's result as recorded in its journal, and the core dumps
// and sanitizer reports in that journal), and the decision, from the
// sequence of those events and of the VM's own end (QEMU's exit, timers,
// signals), of what Meson is told.
//
// The decision is a state machine fed by events (Verdict.Handle) with no
// I/O of its own, so every way a test can end is table-tested without a VM.
// The one rule it exists to enforce: nothing but the test unit's own
// success, followed by its success action, is a pass (and not even that
// when the guest dumped core or printed a sanitizer report).
package verdict

import (
	"fmt"
	"strconv"
	"strings"
)

// Meson's exit-code convention, which the runner's exit status follows.
const (
	ExitPass         = 0
	ExitFail         = 1
	ExitSkip         = 77
	ExitHarnessError = 99
)

// Outcome is the result of one test run as Meson should see it.
type Outcome struct {
	// ExitCode is the process exit code for Meson.
	ExitCode int
	// Reason is one line for the user, empty for a plain pass.
	Reason string
	// Retry is set when QEMU itself died before the test had a result
	// (an infrastructure failure, not the test's): running the test once
	// more is safe and its result means something. See retry.go.
	Retry bool `json:"retry,omitempty"`
}

// Passed reports whether the test passed.
func (o Outcome) Passed() bool { return o.ExitCode == ExitPass }

// Skipped reports whether the test skipped.
func (o Outcome) Skipped() bool { return o.ExitCode == ExitSkip }

// Failed reports whether the test failed (not a harness error).
func (o Outcome) Failed() bool { return o.ExitCode == ExitFail }

func pass() Outcome                    { return Outcome{ExitCode: ExitPass} }
func skip(reason string) Outcome       { return Outcome{ExitCode: ExitSkip, Reason: reason} }
func fail(reason string) Outcome       { return Outcome{ExitCode: ExitFail, Reason: reason} }
func harnessErr(reason string) Outcome { return Outcome{ExitCode: ExitHarnessError, Reason: reason} }

// UnitResult is the test unit's own result, as systemd gives it to
// ExecStopPost= ($SERVICE_RESULT, $EXIT_CODE, $EXIT_STATUS) or records it
// in the journal.
type UnitResult struct {
	// Result is systemd's service result: "success", "exit-code",
	// "signal", "core-dump", "timeout", "watchdog", "oom-kill", ...; or
	// ResultCondition / ResultAssert when the unit never ran.
	Result string
	// ExitCode is "exited", "killed" or "dumped" ("" when no process ran).
	ExitCode string
	// ExitStatus is the exit status, or for killed/dumped the signal name
	// without "SIG" (e.g. "KILL"), as systemd formats $EXIT_STATUS.
	ExitStatus string
}

// Results the guest-side condition check reports for a unit that never ran.
const (
	ResultCondition = "condition"
	ResultAssert    = "assert"
	// ResultNotStarted: the unit's start job ended before its conditions
	// were even checked, e.g. a unit it Requires= failed.
	ResultNotStarted = "not-started"
)

// Succeeded reports whether systemd considered the unit successful.
func (u UnitResult) Succeeded() bool { return u.Result == "success" }

// exitStatus returns the numeric exit status of a process that exited.
func (u UnitResult) exitStatus() (int, bool) {
	if u.ExitCode != "exited" {
		return 0, false
	}
	n, err := strconv.Atoi(u.ExitStatus)
	if err != nil || n < 0 || n > 255 {
		return 0, false
	}
	return n, true
}

// signal returns the signal a killed or dumped main process died of, as
// "SIGKILL", or "" when it did not die of one.
func (u UnitResult) signal() string {
	if u.ExitCode != "killed" && u.ExitCode != "dumped" {
		return ""
	}
	s := sanitize(u.ExitStatus, 16)
	if s == "" {
		return "unknown signal"
	}
	if _, err := strconv.Atoi(s); err == nil {
		return "signal " + s
	}
	return "SIG" + strings.TrimPrefix(s, "SIG")
}

// String describes the result for a message, e.g. "exit-code (exited 3)".
func (u UnitResult) String() string {
	s := sanitize(u.Result, 32)
	if u.ExitCode != "" {
		s += fmt.Sprintf(" (%s %s)", sanitize(u.ExitCode, 16), sanitize(u.ExitStatus, 16))
	}
	return s
}

// outcome is what the unit's own result means for the test, with the
// reason naming what happened.
func (u UnitResult) outcome() Outcome {
	switch u.Result {
	case "success":
		return pass()
	case ResultCondition:
		return skip("test skipped: a condition of its unit was not met")
	case ResultAssert:
		return fail("test did not run: an assertion of its unit failed")
	case ResultNotStarted:
		return fail("test did not run: its start job failed before the unit started (a unit it requires failed?)")
	case "timeout":
		return fail("test timed out (its unit's start timeout, TimeoutStartSec=)")
	}
	if status, ok := u.exitStatus(); ok {
		if status == GuestStatusSkip {
			return skip("test skipped (exit status 77)")
		}
		return fail(fmt.Sprintf("test exited with status %d", status))
	}
	if sig := u.signal(); sig != "" {
		reason := "test killed by " + sig
		if !strings.HasPrefix(sig, "signal ") {
			reason = "test killed by signal " + sig
		}
		if u.ExitCode == "dumped" {
			reason += " (core dumped)"
		}
		return fail(reason)
	}
	return fail("test failed: its unit ended with result " + u.String())
}

// sanitize bounds a guest-supplied string for one line of output.
func sanitize(s string, n int) string {
	b := make([]byte, 0, min(len(s), n))
	for i := 0; i < len(s) && len(b) < n; i++ {
		c := s[i]
		if c < 0x20 || c >= 0x7f {
			c = '?'
		}
		b = append(b, c)
	}
	return string(b)
}
