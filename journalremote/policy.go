package journalremote

import (
	"fmt"
	"strings"
)

// Policy says which tests keep their journal files. The zero value is
// KeepOnFailure.
type Policy int

const (
	// KeepOnFailure keeps the journal of failed tests only ("fail").
	KeepOnFailure Policy = iota
	// KeepAlways keeps every journal ("always").
	KeepAlways
	// KeepNever deletes every journal ("never").
	KeepNever
)

// ParsePolicy parses the value of --keep-journal or VMHARNESS_KEEP_JOURNAL:
// "always", "fail" (also "failure", "on-failure") or "never", in any case.
// An empty string is the default, KeepOnFailure.
func ParsePolicy(s string) (Policy, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "fail", "failure", "on-failure", "failed":
		return KeepOnFailure, nil
	case "always", "yes", "true":
		return KeepAlways, nil
	case "never", "no", "false":
		return KeepNever, nil
	}
	return 0, fmt.Errorf("invalid journal keep policy %q: use always, fail or never", s)
}

// String returns the policy's canonical name, as ParsePolicy accepts it.
func (p Policy) String() string {
	switch p {
	case KeepOnFailure:
		return "fail"
	case KeepAlways:
		return "always"
	case KeepNever:
		return "never"
	}
	return fmt.Sprintf("Policy(%d)", int(p))
}

// Outcome is a test's result as far as keeping its journal is concerned.
type Outcome int

const (
	Passed Outcome = iota
	Skipped
	Failed // any failure, including a harness error
)

// OutcomeFromExitCode maps Meson's exit-code convention: 0 pass, 77 skip,
// anything else (failures and 99 harness errors) fail.
func OutcomeFromExitCode(code int) Outcome {
	switch code {
	case 0:
		return Passed
	case 77:
		return Skipped
	}
	return Failed
}

// Keep reports whether a test with this outcome keeps its journal. When it
// does not, call Collector.Remove after Collector.Close.
func (p Policy) Keep(o Outcome) bool {
	switch p {
	case KeepAlways:
		return true
	case KeepNever:
		return false
	}
	return o == Failed
}
