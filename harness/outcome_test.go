package harness

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestOutcomeFromExitStatus(t *testing.T) {
	tests := []struct {
		name       string
		status     int
		ok         bool
		wantCode   int
		wantReason string
	}{
		{"pass", 123, true, 0, ""},
		{"skip", 77, true, 77, "test skipped (exit status 77)"},
		{"missing", 0, false, 1, "VM stopped without the test's success action (no EXIT_STATUS or EXIT_STATUS=0)"},
		{"plain poweroff", 0, true, 1, "VM stopped without the test's success action (no EXIT_STATUS or EXIT_STATUS=0)"},
		{"failure", 3, true, 1, "test exited with status 3"},
		{"emergency", 124, true, 1, "guest fell into emergency or rescue mode"},
		{"malformed", -1, true, 1, "guest sent a malformed EXIT_STATUS"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := OutcomeFromExitStatus(tt.status, tt.ok)
			assert.Equal(t, tt.wantCode, got.ExitCode)
			assert.Equal(t, tt.wantReason, got.Reason)
		})
	}
}
