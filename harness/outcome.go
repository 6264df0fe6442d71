package harness

import "fmt"

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
}

// Passed reports whether the test passed.
func (o Outcome) Passed() bool { return o.ExitCode == ExitPass }

// Skipped reports whether the test skipped.
func (o Outcome) Skipped() bool { return o.ExitCode == ExitSkip }

// OutcomeFromExitStatus maps the guest's EXIT_STATUS (ok is false when none
// arrived) to Meson's convention.
func OutcomeFromExitStatus(status int, ok bool) Outcome {
	switch {
	case !ok || status == 0:
		return Outcome{ExitCode: ExitFail, Reason: "VM stopped without the test's success action (no EXIT_STATUS or EXIT_STATUS=0)"}
	case status == GuestStatusPass:
		return Outcome{ExitCode: ExitPass}
	case status == GuestStatusSkip:
		return Outcome{ExitCode: ExitSkip, Reason: "test skipped (exit status 77)"}
	case status == EmergencyExitStatus:
		return Outcome{ExitCode: ExitFail, Reason: "guest fell into emergency or rescue mode"}
	case status < 0:
		return Outcome{ExitCode: ExitFail, Reason: "guest sent a malformed EXIT_STATUS"}
	default:
		return Outcome{ExitCode: ExitFail, Reason: fmt.Sprintf("test exited with status %d", status)}
	}
}
