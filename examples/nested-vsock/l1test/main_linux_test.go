package main

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestExpectFallback(t *testing.T) {
	const line = "log: vsock: using userspace vhost-user transport, guest CID 3 (open /dev/vhost-vsock: permission denied)\n"
	tests := []struct {
		name, out, reason, wantErr string
	}{
		{"the fallback", "kind: user\n" + line, "permission denied", ""},
		{"kernel chosen", "kind: kernel\nlog: vsock: using kernel vhost-vsock, guest CID 3\n", "permission denied", `auto chose "kernel"`},
		{"two lines", "kind: user\n" + line + line, "permission denied", "logged 2 lines"},
		{"no line", "kind: user\n", "permission denied", "logged 0 lines"},
		{"other reason", "kind: user\n" + line, "all 4 candidate CIDs are in use", "does not say"},
		{"not the fallback line", "kind: user\nlog: vsock: something else\n", "permission denied", "is not the fallback line"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := expectFallback(tt.out, tt.reason)
			if tt.wantErr == "" {
				require.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
		})
	}
}

func TestSlowSteps(t *testing.T) {
	console := "[    0.000000] Linux version 6.12\n" +
		"[    3.000000] fast step\n" +
		"[   45.500000] after a long pause\n" +
		"l2init: started\n" +
		"[   46.000000] last\n"
	assert.Equal(t, []string{
		"(+42.5s) [   45.500000] after a long pause",
		"l2init: started",
		"last kernel message: [   46.000000] last",
	}, slowSteps(console, 10))
}

func TestSlowStepsQuietKernel(t *testing.T) {
	assert.Equal(t, []string{"l2init: started"}, slowSteps("l2init: started\n", 10))
}
