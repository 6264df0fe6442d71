package sshproxy

import (
	"bufio"
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestHandshake(t *testing.T) {
	tests := []struct {
		name     string
		behavior hybridBehavior
		wantErr  string
	}{
		{"ok", answerOK, ""},
		{"garbage", answerGarbage, `"NOPE" instead of OK`},
		{"silence", answerSilence, "did not answer CONNECT 22 in time"},
		{"close", answerClose, "closed the connection"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := startFakeHybrid(t, tt.behavior, echo)
			c, err := net.Dial("unix", srv.Path)
			require.NoError(t, err)
			defer c.Close()

			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			start := time.Now()
			err = Handshake(ctx, c, 22)
			assert.Less(t, time.Since(start), 5*time.Second)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, []string{"CONNECT 22\n"}, srv.Requests())
			// The guest's first bytes follow OK at once; the handshake
			// must not have eaten them, and no deadline may linger.
			time.Sleep(400 * time.Millisecond)
			br := bufio.NewReader(c)
			line, err := br.ReadString('\n')
			require.NoError(t, err)
			assert.Equal(t, "hello\n", line)
		})
	}
}

// An answer that never ends in a newline is cut off, not buffered forever.
func TestHandshakeRejectsLongAnswer(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	go func() {
		buf := make([]byte, 64)
		server.Read(buf)
		for {
			if _, err := server.Write([]byte("OKOKOKOKOK")); err != nil {
				return
			}
		}
	}()
	defer server.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := Handshake(ctx, client, 22)
	require.ErrorContains(t, err, "garbage")
}

func TestHandshakeRejectsBadOK(t *testing.T) {
	for _, answer := range []string{"OK\n", "OK x\n", "ok 1\n", "OK 99999999999\n"} {
		client, server := net.Pipe()
		go func() {
			buf := make([]byte, 64)
			server.Read(buf)
			server.Write([]byte(answer))
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := Handshake(ctx, client, 22)
		assert.Error(t, err, "answer %q", answer)
		cancel()
		client.Close()
		server.Close()
	}
}
