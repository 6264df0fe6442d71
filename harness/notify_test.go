package harness

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/verdict"
)

func TestParseNotify(t *testing.T) {
	tests := []struct {
		name     string
		data     string
		complete bool
		want     verdict.Notify
	}{
		{"assignments", "READY=1\nSTATUS=a=b\nno-equals\n=empty-key\nEXIT_STATUS=3", true,
			verdict.Notify{"READY": "1", "STATUS": "a=b", "EXIT_STATUS": "3"}},
		{"a broken stream keeps only complete lines", "EXIT_STATUS=123\nX_SYSTEMD_SHUTDOWN=powe", false,
			verdict.Notify{"EXIT_STATUS": "123"}},
		{"a broken stream never yields a cut-off status", "EXIT_STATUS=12", false, verdict.Notify{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, parseNotify([]byte(tt.data), tt.complete))
		})
	}
}

// TestServeNotify drives the listener with real connections: one message
// per connection, read to EOF; an oversized message is dropped, not
// delivered.
func TestServeNotify(t *testing.T) {
	l, err := net.Listen("unix", t.TempDir()+"/notify.sock")
	require.NoError(t, err)
	msgs := make(chan verdict.Notify, 8)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { serveNotify(ctx, l, msgs, t.Logf); close(done) }()

	send := func(msg string) {
		c, err := net.Dial("unix", l.Addr().String())
		require.NoError(t, err)
		_, err = c.Write([]byte(msg))
		require.NoError(t, err)
		require.NoError(t, c.Close())
	}
	receive := func() verdict.Notify {
		select {
		case m := <-msgs:
			return m
		case <-time.After(5 * time.Second):
			t.Fatal("no message delivered")
			return nil
		}
	}
	send("EXIT_STATUS=7\n" + strings.Repeat("X=y\n", maxNotifyMessage/4+1))
	send("READY=1\n")
	assert.Equal(t, verdict.Notify{"READY": "1"}, receive(), "an oversized message must be dropped whole")
	send("EXIT_STATUS=123")
	assert.Equal(t, verdict.Notify{"EXIT_STATUS": "123"}, receive())

	// Messages come out in the order their connections were accepted,
	// even when a later one is complete first.
	slow, err := net.Dial("unix", l.Addr().String())
	require.NoError(t, err)
	_, err = slow.Write([]byte("X_SYSTEMD_SHUTDOWN=reboot\n"))
	require.NoError(t, err)
	send("X_SYSTEMD_UNIT_ACTIVE=basic.target")
	select {
	case m := <-msgs:
		t.Fatalf("%v delivered before the connection accepted earlier", m)
	case <-time.After(300 * time.Millisecond):
	}
	require.NoError(t, slow.Close())
	assert.Equal(t, verdict.Notify{"X_SYSTEMD_SHUTDOWN": "reboot"}, receive())
	assert.Equal(t, verdict.Notify{"X_SYSTEMD_UNIT_ACTIVE": "basic.target"}, receive())

	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("serveNotify did not return after cancel")
	}
	_, err = net.Dial("unix", l.Addr().String())
	assert.Error(t, err, "serveNotify closes its listener")
}
