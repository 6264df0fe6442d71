package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
)

// Server is a vhost-user back-end listening on a Unix socket. It serves one
// front-end connection at a time.
type Server struct {
	// Logger receives connection errors and ignored requests; nil means
	// slog.Default(). Set it before Serve.
	Logger *slog.Logger

	ln   *net.UnixListener
	path string

	mu     sync.Mutex
	conn   *net.UnixConn // the connection being served, if any
	closed bool
}

// Listen creates the Unix socket at path (which must not exist), readable
// and writable only by its owner, and returns a Server listening on it. The socket file is removed
// by Close. Create it in a directory only the harness can write to: the
// mode is set right after bind.
func Listen(path string) (*Server, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("vhost-user: listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("vhost-user: restrict socket %s: %w", path, err)
	}
	return &Server{ln: ln, path: path}, nil
}

// Path is the socket path (for QEMU's -chardev socket,path=).
func (s *Server) Path() string { return s.path }

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

// Serve accepts front-end connections one at a time and serves dev on each
// until it disconnects or breaks the protocol, then accepts the next. It
// returns ctx.Err() when ctx is cancelled (which closes the Server), nil
// after Close, or the accept error. The connection being served is torn down (device stopped, fds
// closed, memory unmapped) before Serve returns.
func (s *Server) Serve(ctx context.Context, dev Device) error {
	stop := context.AfterFunc(ctx, func() { _ = s.Close() })
	defer stop()
	for {
		uc, err := s.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if s.isClosed() {
				return nil
			}
			return fmt.Errorf("vhost-user: accept on %s: %w", s.path, err)
		}
		if !s.track(uc) {
			uc.Close()
			continue
		}
		err = s.ServeConn(uc, dev)
		s.untrack()
		if err != nil && !s.isClosed() {
			s.logger().Warn("vhost-user connection ended", "socket", s.path, "err", err)
		}
	}
}

func (s *Server) track(uc *net.UnixConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conn = uc
	return true
}

func (s *Server) untrack() {
	s.mu.Lock()
	s.conn = nil
	s.mu.Unlock()
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Close stops accepting, disconnects the current front-end and removes the
// socket. Serve returns once the connection is torn down.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	conn := s.conn
	s.mu.Unlock()
	if conn != nil {
		_ = conn.Close()
	}
	if err := s.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("vhost-user: close %s: %w", s.path, err)
	}
	return nil
}

// ServeConn serves dev on one already-connected front-end (for example one
// end of a socketpair whose other end QEMU inherited) until it disconnects
// or breaks the protocol. It closes uc and releases everything the
// connection held before returning. A clean disconnect returns nil. It only
// uses the Server's Logger, so a zero Server (&Server{}) may serve a
// connection that did not come from Listen.
func (s *Server) ServeConn(uc *net.UnixConn, dev Device) error {
	c := newConn(uc, dev, s.logger())
	return c.serve()
}
