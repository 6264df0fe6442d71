package harness

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseNotify(t *testing.T) {
	m := parseNotify([]byte("READY=1\nSTATUS=a=b\nno-equals\n=empty-key\nEXIT_STATUS=3"))
	assert.Equal(t, NotifyMessage{"READY": "1", "STATUS": "a=b", "EXIT_STATUS": "3"}, m)
}

func TestNotifyStateExitStatus(t *testing.T) {
	tests := []struct {
		name     string
		messages []string
		want     int
		wantOK   bool
	}{
		{"none", []string{"READY=1"}, 0, false},
		{"status", []string{"READY=1", "X_SYSTEMD_SHUTDOWN=exit", "EXIT_STATUS=123"}, 123, true},
		{"malformed", []string{"EXIT_STATUS=abc"}, -1, true},
		{"out of range", []string{"EXIT_STATUS=256"}, -1, true},
		{"reboot ignores status", []string{"X_SYSTEMD_SHUTDOWN=reboot", "EXIT_STATUS=0"}, 0, false},
		{"status then reboot clears it", []string{"EXIT_STATUS=0", "X_SYSTEMD_SHUTDOWN=reboot"}, 0, false},
		{"new boot after reboot counts again", []string{"X_SYSTEMD_SHUTDOWN=reboot", "X_SYSTEMD_UNIT_ACTIVE=basic.target", "EXIT_STATUS=123"}, 123, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newNotifyState()
			for _, m := range tt.messages {
				s.apply(parseNotify([]byte(m)))
			}
			got, ok := s.ExitStatus()
			assert.Equal(t, tt.wantOK, ok)
			assert.Equal(t, tt.want, got)
		})
	}
}

// TestServeNotify drives the listener with real connections: one message
// per connection, read to EOF; an oversized message is dropped, not applied.
func TestServeNotify(t *testing.T) {
	l, err := net.Listen("unix", t.TempDir()+"/notify.sock")
	require.NoError(t, err)
	s := newNotifyState()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { serveNotify(ctx, l, s, t.Logf); close(done) }()

	send := func(msg string) {
		c, err := net.Dial("unix", l.Addr().String())
		require.NoError(t, err)
		_, err = c.Write([]byte(msg))
		require.NoError(t, err)
		require.NoError(t, c.Close())
	}
	send("EXIT_STATUS=7\n" + strings.Repeat("X=y\n", maxNotifyMessage/4+1))
	send("READY=1\n")
	require.Eventually(t, s.Ready, 5*time.Second, 10*time.Millisecond)
	_, ok := s.ExitStatus()
	assert.False(t, ok, "an oversized message must be dropped whole")
	send("EXIT_STATUS=123\n")
	require.Eventually(t, func() bool { st, ok := s.ExitStatus(); return ok && st == 123 }, 5*time.Second, 10*time.Millisecond)

	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("serveNotify did not return after cancel")
	}
}
