package harness

import "github.com/vmharness/vmharness/harness/verdict"

// Meson's exit-code convention, which the runner's exit status follows.
const (
	ExitPass         = verdict.ExitPass
	ExitFail         = verdict.ExitFail
	ExitSkip         = verdict.ExitSkip
	ExitHarnessError = verdict.ExitHarnessError
)

// Outcome is the result of one test run as Meson should see it; the verdict
// package decides it.
type Outcome = verdict.Outcome
