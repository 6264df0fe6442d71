package harness

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"github.com/vmharness/vmharness/harness/verdict"
)

// maxNotifyMessage bounds one notify connection. systemd's own messages are
// a few hundred bytes; anything larger is a misbehaving guest.
const maxNotifyMessage = 64 << 10

// notifyReadTimeout bounds how long one notify connection may stay open.
// PID 1 writes a message and closes at once.
const notifyReadTimeout = 30 * time.Second

// parseNotify splits a message into its NAME=VALUE lines. Lines without '='
// are ignored, as systemd does. When the stream broke (complete is false)
// only newline-terminated lines are taken: a cut-off last line could turn
// EXIT_STATUS=123 into EXIT_STATUS=12.
func parseNotify(data []byte, complete bool) verdict.Notify {
	if !complete {
		i := bytes.LastIndexByte(data, '\n')
		data = data[:i+1]
	}
	m := verdict.Notify{}
	for _, line := range bytes.Split(data, []byte("\n")) {
		key, value, ok := bytes.Cut(line, []byte("="))
		if !ok || len(key) == 0 {
			continue
		}
		m[string(key)] = string(value)
	}
	return m
}

// serveNotify accepts notify connections until the listener is closed or
// ctx ends, sending each message to msgs in the order the connections
// were accepted: the guest sends its messages one after the other, each on
// its own connection, and their order matters (a result before or after a
// reboot). Connections are read in parallel, so a stalled one delays the
// later messages by at most notifyReadTimeout. serveNotify closes the
// listener and returns when every connection handler has finished.
func serveNotify(ctx context.Context, l net.Listener, msgs chan<- verdict.Notify, logf func(string, ...any)) {
	var wg sync.WaitGroup
	defer wg.Wait()
	defer l.Close()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	prev := make(chan struct{})
	close(prev)
	for {
		conn, err := l.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) && ctx.Err() == nil {
				logf("notify: accept: %v", err)
			}
			return
		}
		wg.Add(1)
		turn, done := prev, make(chan struct{})
		prev = done
		go func() {
			defer wg.Done()
			defer close(done)
			defer conn.Close()
			conn.SetReadDeadline(time.Now().Add(notifyReadTimeout))
			data, err := io.ReadAll(io.LimitReader(bufio.NewReader(conn), maxNotifyMessage+1))
			if len(data) > maxNotifyMessage {
				logf("notify: dropping a message over %d bytes", maxNotifyMessage)
				return
			}
			if err != nil {
				logf("notify: reading message: %v (keeping its complete lines)", err)
			}
			m := parseNotify(data, err == nil)
			select {
			case <-turn:
			case <-ctx.Done():
				return
			}
			if len(m) == 0 {
				return
			}
			select {
			case msgs <- m:
			case <-ctx.Done():
			}
		}()
	}
}
