package journalremote

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParsePolicy(t *testing.T) {
	tests := []struct {
		in   string
		want Policy
	}{
		{"", KeepOnFailure},
		{"fail", KeepOnFailure},
		{" On-Failure ", KeepOnFailure},
		{"always", KeepAlways},
		{"ALWAYS", KeepAlways},
		{"never", KeepNever},
	}
	for _, tc := range tests {
		p, err := ParsePolicy(tc.in)
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.want, p, tc.in)
		again, err := ParsePolicy(p.String())
		require.NoError(t, err)
		assert.Equal(t, p, again)
	}
	_, err := ParsePolicy("sometimes")
	require.ErrorContains(t, err, `"sometimes"`)
}

func TestPolicyKeep(t *testing.T) {
	tests := []struct {
		policy                 Policy
		pass, skip, failedKeep bool
	}{
		{KeepAlways, true, true, true},
		{KeepOnFailure, false, false, true},
		{KeepNever, false, false, false},
	}
	for _, tc := range tests {
		t.Run(tc.policy.String(), func(t *testing.T) {
			assert.Equal(t, tc.pass, tc.policy.Keep(Passed))
			assert.Equal(t, tc.skip, tc.policy.Keep(Skipped))
			assert.Equal(t, tc.failedKeep, tc.policy.Keep(Failed))
		})
	}
	assert.Equal(t, Passed, OutcomeFromExitCode(0))
	assert.Equal(t, Skipped, OutcomeFromExitCode(77))
	assert.Equal(t, Failed, OutcomeFromExitCode(1))
	assert.Equal(t, Failed, OutcomeFromExitCode(99))
}
