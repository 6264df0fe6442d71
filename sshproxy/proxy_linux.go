package sshproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// ExitFailure is the exit code of a failed proxy: ssh reports 255 for its
// own connection failures, so scripts see one code for "could not connect".
const ExitFailure = 255

// Proxy serves one ssh connection attempt.
type Proxy struct {
	Dialer Dialer
	// Stdin and Stdout are the proxy's stdio as ssh set them up. If Stdout
	// is a Unix socket (ProxyUseFdpass yes) the connection's fd is passed
	// over it; otherwise bytes are copied.
	Stdin  io.Reader
	Stdout io.Writer
}

// Run connects to host (an ssh host name such as "vsock/3") at port and
// hands the connection to ssh. Errors name the host and are meant for one
// line on stderr.
func (p *Proxy) Run(ctx context.Context, host string, port uint32) error {
	addr, err := ParseAddress(host)
	if err != nil {
		return err
	}
	conn, err := p.Dialer.Dial(ctx, addr, port)
	if err != nil {
		return fmt.Errorf("%s: %w", host, err)
	}
	defer conn.Close()

	if out, ok := p.Stdout.(*os.File); ok && isUnixSocket(out) {
		if err := SendConn(out, conn); err != nil {
			return fmt.Errorf("%s: %w", host, err)
		}
		return nil
	}
	if err := splice(ctx, conn, p.Stdin, p.Stdout); err != nil {
		return fmt.Errorf("%s: %w", host, err)
	}
	return nil
}

// isUnixSocket reports whether f is an AF_UNIX socket, which is what ssh
// gives a ProxyCommand as stdout with ProxyUseFdpass.
func isUnixSocket(f *os.File) bool {
	rc, err := f.SyscallConn()
	if err != nil {
		return false
	}
	var domain int
	var serr error
	if err := rc.Control(func(fd uintptr) {
		domain, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN)
	}); err != nil {
		return false
	}
	return serr == nil && domain == unix.AF_UNIX
}

// SendConn passes conn's socket to the peer of the Unix socket out as
// SCM_RIGHTS ancillary data with one data byte, which is what OpenSSH's
// ProxyUseFdpass expects. conn may be closed afterwards: the peer holds its
// own reference.
func SendConn(out *os.File, conn net.Conn) error {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return fmt.Errorf("pass connection to ssh: %T has no file descriptor", conn)
	}
	connRaw, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("pass connection to ssh: %w", err)
	}
	outRaw, err := out.SyscallConn()
	if err != nil {
		return fmt.Errorf("pass connection to ssh: %w", err)
	}
	var sendErr error
	cerr := connRaw.Control(func(connFD uintptr) {
		rights := unix.UnixRights(int(connFD))
		werr := outRaw.Write(func(outFD uintptr) bool {
			sendErr = unix.Sendmsg(int(outFD), []byte{0}, rights, nil, 0)
			return !errors.Is(sendErr, unix.EAGAIN)
		})
		if sendErr == nil {
			sendErr = werr
		}
	})
	if err := errors.Join(cerr, sendErr); err != nil {
		return fmt.Errorf("pass connection to ssh over stdout: %w", err)
	}
	return nil
}

// splice copies bytes both ways until the remote side closes: the fallback
// for ssh without ProxyUseFdpass.
func splice(ctx context.Context, conn net.Conn, stdin io.Reader, stdout io.Writer) error {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	go func() {
		// stdin reaches EOF when ssh is done sending; a read error on it
		// (ssh gone) ends the session the same way.
		io.Copy(conn, stdin)
		if hc, ok := conn.(interface{ CloseWrite() error }); ok {
			hc.CloseWrite()
		}
	}()
	_, err := io.Copy(stdout, conn)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("copy from VM: %w", err)
	}
	return nil
}
