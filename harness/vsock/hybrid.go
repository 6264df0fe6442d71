package vsock

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mdlayher/vsock"
)

const (
	// hybridSocketName is the per-VM Unix socket in RuntimeDir that speaks
	// the CONNECT convention.
	hybridSocketName = "vsock.sock"

	// maxConnectLine bounds the "CONNECT <port>\n" line, newline included.
	// The longest valid line, "CONNECT 4294967294\n", is 19 bytes; 32 leaves
	// room for extra blanks and matches Firecracker's buffer.
	maxConnectLine = 32

	// portAny is VMADDR_PORT_ANY; it is no port a client can connect to.
	portAny = 1<<32 - 1
)

// hybridTimeouts bounds the two waits before a hybrid connection is
// established.
type hybridTimeouts struct {
	// handshake bounds how long a client may take to send its CONNECT
	// line, so an idle client cannot pin a goroutine forever.
	handshake time.Duration
	// dial bounds how long the guest may take to accept or refuse.
	dial time.Duration
}

var defaultHybridTimeouts = hybridTimeouts{handshake: 5 * time.Second, dial: 10 * time.Second}

// errBadConnect is wrapped by every error readConnectLine returns for a
// malformed request (as opposed to an I/O failure).
var errBadConnect = errors.New(`want "CONNECT <port>\n"`)

// readConnectLine reads one "CONNECT <port>\n" line from r and returns the
// port. It reads byte by byte so nothing after the newline is consumed: the
// client may pipeline its first payload bytes behind the request.
//
// Like Firecracker's muxer it accepts the verb in any case and any blanks
// around the two words; it rejects lines longer than maxConnectLine, ports
// that do not fit in 32 bits and VMADDR_PORT_ANY.
func readConnectLine(r io.Reader) (uint32, error) {
	var line [maxConnectLine]byte
	n := 0
	for {
		if n == len(line) {
			return 0, fmt.Errorf("request line longer than %d bytes: %w", maxConnectLine, errBadConnect)
		}
		if _, err := io.ReadFull(r, line[n:n+1]); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return 0, fmt.Errorf("reading request line: %w", err)
		}
		n++
		if line[n-1] == '\n' {
			break
		}
	}

	fields := strings.Fields(string(line[:n]))
	if len(fields) != 2 || !strings.EqualFold(fields[0], "CONNECT") {
		return 0, fmt.Errorf("request %q: %w", line[:n], errBadConnect)
	}
	port, err := strconv.ParseUint(fields[1], 10, 32)
	if err != nil || port == portAny {
		return 0, fmt.Errorf("request %q: port must be a number below %d: %w", line[:n], uint64(portAny), errBadConnect)
	}
	return uint32(port), nil
}

// dialFunc connects to a port in the guest.
type dialFunc func(ctx context.Context, port uint32) (net.Conn, error)

// hybridServer serves the per-VM hybrid vsock socket: each client sends
// "CONNECT <port>\n", the server connects to that port in the guest, answers
// "OK <host port>\n" and then relays bytes both ways until both sides are
// done. A request that is malformed, too slow, or that the guest refuses
// gets no answer: the server closes the connection, as Firecracker does.
type hybridServer struct {
	path string
	ln   net.Listener
	dial dialFunc
	logf func(format string, args ...any)

	timeouts hybridTimeouts

	ctx    context.Context // canceled by Close; bounds guest dials
	cancel context.CancelFunc
	wg     sync.WaitGroup // the accept loop and every connection handler

	mu     sync.Mutex
	closed bool
	conns  map[net.Conn]struct{} // open client and guest connections
}

// listenHybrid creates the hybrid socket at path (mode 0600) and starts
// serving it. The caller owns the result and must Close it.
func listenHybrid(path string, dial dialFunc, logf func(string, ...any), timeouts hybridTimeouts) (*hybridServer, error) {
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("creating hybrid vsock socket: %w", err)
	}
	// The runtime directory is already private; the mode is a second fence.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("restricting hybrid vsock socket: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &hybridServer{
		path:     path,
		ln:       ln,
		dial:     dial,
		logf:     logf,
		timeouts: timeouts,
		ctx:      ctx,
		cancel:   cancel,
		conns:    make(map[net.Conn]struct{}),
	}
	s.wg.Add(1)
	go s.acceptLoop()
	return s, nil
}

// Close stops accepting, cuts every relayed connection, waits for all of the
// server's goroutines and removes the socket.
func (s *hybridServer) Close() error {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.cancel()
	err := s.ln.Close() // also unlinks the socket file
	s.wg.Wait()
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("closing hybrid vsock socket: %w", err)
	}
	return nil
}

func (s *hybridServer) acceptLoop() {
	defer s.wg.Done()
	var backoff time.Duration
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of fds or similar: keep serving, but don't spin.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.logf("vsock: hybrid socket %s: accept: %v (retrying in %v)", s.path, err, backoff)
			select {
			case <-time.After(backoff):
			case <-s.ctx.Done():
				return
			}
			continue
		}
		backoff = 0
		if !s.track(c) {
			return
		}
		s.wg.Add(1)
		go s.handle(c)
	}
}

// track registers c so Close can cut it. It reports false (and closes c) if
// the server is already closing.
func (s *hybridServer) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		c.Close()
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *hybridServer) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	c.Close()
}

func (s *hybridServer) handle(client net.Conn) {
	defer s.wg.Done()
	defer s.untrack(client)

	if err := client.SetReadDeadline(time.Now().Add(s.timeouts.handshake)); err != nil {
		return
	}
	port, err := readConnectLine(client)
	if err != nil {
		s.logf("vsock: hybrid socket %s: %v", s.path, err)
		return
	}
	if err := client.SetReadDeadline(time.Time{}); err != nil {
		return
	}

	ctx, cancel := context.WithTimeout(s.ctx, s.timeouts.dial)
	guest, err := s.dial(ctx, port)
	cancel()
	if err != nil {
		s.logf("vsock: hybrid socket %s: connecting to guest port %d: %v", s.path, port, err)
		return
	}
	if !s.track(guest) {
		return
	}
	defer s.untrack(guest)

	if _, err := fmt.Fprintf(client, "OK %d\n", hostPort(guest)); err != nil {
		return
	}
	splice(client, guest)
}

// hostPort is the host-side port of a connection to the guest, which the
// CONNECT convention reports in its "OK" line, or 0 if the connection's
// address does not say. Both backends' addresses print as "...:PORT".
func hostPort(c net.Conn) uint32 {
	a := c.LocalAddr()
	if a, ok := a.(*vsock.Addr); ok {
		return a.Port
	}
	if a == nil {
		return 0
	}
	s := a.String()
	port, err := strconv.ParseUint(s[strings.LastIndexByte(s, ':')+1:], 10, 32)
	if err != nil {
		return 0
	}
	return uint32(port)
}

// closeWriter is a connection whose write side can be shut down on its own
// (*net.UnixConn, *vsock.Conn and the userspace device's connections).
type closeWriter interface {
	CloseWrite() error
}

// splice copies a to b and b to a until both directions are done. When one
// side finishes sending (EOF), the other side's write half is shut down so a
// half-close crosses the relay; an error in either direction tears down
// both connections.
func splice(a, b net.Conn) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); relay(b, a) }()
	go func() { defer wg.Done(); relay(a, b) }()
	wg.Wait()
	a.Close()
	b.Close()
}

func relay(dst, src net.Conn) {
	_, err := io.Copy(dst, src)
	if err == nil {
		if cw, ok := dst.(closeWriter); ok && cw.CloseWrite() == nil {
			return
		}
	}
	dst.Close()
	src.Close()
}

// hostSocketDialer returns the function that connects guest-initiated
// connections to host ports nobody Listen'd on: port P goes to the Unix
// socket "<hybridPath>_P" if one is listening there, and is refused (the
// guest sees a reset) otherwise. This is the Firecracker convention, so a
// host program can serve a guest port without linking the harness.
func hostSocketDialer(hybridPath string) dialFunc {
	return func(ctx context.Context, port uint32) (net.Conn, error) {
		path := hybridPath + "_" + strconv.FormatUint(uint64(port), 10)
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", path)
		if err != nil {
			return nil, fmt.Errorf("no listener for host port %d: %w", port, err)
		}
		return c, nil
	}
}
