package sshproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// maxOKLine bounds the hybrid socket's answer; "OK 4294967295\n" is 14 bytes.
const maxOKLine = 64

// Handshake performs the hybrid vsock handshake on conn: it writes
// "CONNECT <port>\n" and reads the "OK <n>\n" answer one byte at a time, so
// that no byte of the guest's stream (sshd's banner may follow at once) is
// consumed. It gives up when ctx is done.
func Handshake(ctx context.Context, conn net.Conn, port uint32) error {
	if d, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(d); err != nil {
			return fmt.Errorf("hybrid vsock handshake: %w", err)
		}
		defer conn.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if _, err := fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
		return handshakeErr(ctx, port, err)
	}
	line := make([]byte, 0, maxOKLine)
	b := make([]byte, 1)
	for {
		n, err := conn.Read(b)
		if n == 1 {
			if b[0] == '\n' {
				break
			}
			if len(line) == maxOKLine {
				return fmt.Errorf("hybrid vsock socket answered CONNECT %d with garbage %q", port, line)
			}
			line = append(line, b[0])
			continue
		}
		if errors.Is(err, io.EOF) {
			if len(line) == 0 {
				return fmt.Errorf("hybrid vsock socket closed the connection on CONNECT %d: nothing listens on port %d in the guest, or the guest's vsock is not up yet", port, port)
			}
			return fmt.Errorf("hybrid vsock socket answered CONNECT %d with %q and closed", port, line)
		}
		if err != nil {
			return handshakeErr(ctx, port, err)
		}
	}
	reply := string(line)
	num, ok := strings.CutPrefix(reply, "OK ")
	if !ok {
		return fmt.Errorf("hybrid vsock socket answered CONNECT %d with %q instead of OK", port, reply)
	}
	if _, err := strconv.ParseUint(num, 10, 32); err != nil {
		return fmt.Errorf("hybrid vsock socket answered CONNECT %d with %q: bad port number", port, reply)
	}
	return nil
}

func handshakeErr(ctx context.Context, port uint32, err error) error {
	var ne net.Error
	if ctx.Err() != nil || (errors.As(err, &ne) && ne.Timeout()) {
		return fmt.Errorf("hybrid vsock socket did not answer CONNECT %d in time (is the guest still booting?)", port)
	}
	return fmt.Errorf("hybrid vsock handshake for port %d: %w", port, err)
}
