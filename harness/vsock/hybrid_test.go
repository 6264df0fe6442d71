package vsock

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdlayher/vsock"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestReadConnectLine(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    uint32
		wantErr error // errBadConnect for malformed requests
	}{
		{name: "plain", in: "CONNECT 1234\n", want: 1234},
		{name: "lower case", in: "connect 22\n", want: 22},
		{name: "extra blanks and CRLF", in: "  CONNECT   52 \r\n", want: 52},
		{name: "port zero", in: "CONNECT 0\n", want: 0},
		{name: "largest port", in: "CONNECT 4294967294\n", want: 4294967294},
		{name: "VMADDR_PORT_ANY", in: "CONNECT 4294967295\n", wantErr: errBadConnect},
		{name: "port out of range", in: "CONNECT 4294967296\n", wantErr: errBadConnect},
		{name: "negative port", in: "CONNECT -1\n", wantErr: errBadConnect},
		{name: "signed port", in: "CONNECT +1\n", wantErr: errBadConnect},
		{name: "hex port", in: "CONNECT 0x16\n", wantErr: errBadConnect},
		{name: "no port", in: "CONNECT\n", wantErr: errBadConnect},
		{name: "extra word", in: "CONNECT 1 2\n", wantErr: errBadConnect},
		{name: "wrong verb", in: "OPEN 22\n", wantErr: errBadConnect},
		{name: "garbage", in: "GET / HTTP/1.1\n", wantErr: errBadConnect},
		{name: "binary", in: "\x00\xff\x13\n", wantErr: errBadConnect},
		{name: "empty line", in: "\n", wantErr: errBadConnect},
		{name: "overlong line", in: "CONNECT " + strings.Repeat("0", 40) + "1\n", wantErr: errBadConnect},
		{name: "overlong without newline", in: strings.Repeat("A", 1000), wantErr: errBadConnect},
		{name: "no newline", in: "CONNECT 1234", wantErr: io.ErrUnexpectedEOF},
		{name: "nothing", in: "", wantErr: io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := readConnectLine(strings.NewReader(tt.in))
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestReadConnectLineLeavesPayload(t *testing.T) {
	r := strings.NewReader("CONNECT 7\nSSH-2.0-client\r\n")
	port, err := readConnectLine(r)
	require.NoError(t, err)
	assert.Equal(t, uint32(7), port)
	rest, err := io.ReadAll(r)
	require.NoError(t, err)
	assert.Equal(t, "SSH-2.0-client\r\n", string(rest), "bytes after the newline belong to the guest")
}

// unixPair returns the two ends of a connected stream socket pair; unlike
// net.Pipe they support CloseWrite, as vsock connections do.
func unixPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		require.NoError(t, err)
		return c.(*net.UnixConn)
	}
	a, b := conn(fds[0]), conn(fds[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// vsockConn is the host end of a fake guest connection, addressed the way
// a real one is.
type vsockConn struct {
	*net.UnixConn
	local *vsock.Addr
}

func (c vsockConn) LocalAddr() net.Addr { return c.local }

// fakeGuest is a dialFunc whose guest runs service on each connection to
// an open port and refuses the others.
type fakeGuest struct {
	t       *testing.T
	open    map[uint32]func(guest *net.UnixConn)
	wg      sync.WaitGroup
	mu      sync.Mutex
	dialled []uint32
}

func (g *fakeGuest) dial(ctx context.Context, port uint32) (net.Conn, error) {
	g.mu.Lock()
	g.dialled = append(g.dialled, port)
	g.mu.Unlock()
	service, ok := g.open[port]
	if !ok {
		return nil, errors.New("connection reset by guest")
	}
	host, guest := unixPair(g.t)
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		defer guest.Close()
		service(guest)
	}()
	return vsockConn{UnixConn: host, local: &vsock.Addr{ContextID: HostCID, Port: 1 << 30}}, nil
}

func (g *fakeGuest) ports() []uint32 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]uint32(nil), g.dialled...)
}

func startHybrid(t *testing.T, dial dialFunc, timeouts hybridTimeouts) *hybridServer {
	t.Helper()
	s, err := listenHybrid(filepath.Join(privateDir(t), hybridSocketName), dial, t.Logf, timeouts)
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

func connectHybrid(t *testing.T, s *hybridServer) *net.UnixConn {
	t.Helper()
	c, err := net.Dial("unix", s.path)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
	return c.(*net.UnixConn)
}

func TestHybridClientHalfClose(t *testing.T) {
	guest := &fakeGuest{t: t, open: map[uint32]func(*net.UnixConn){
		// Answers only after the client has finished sending, which
		// works only if the client's half-close reaches the guest.
		1234: func(c *net.UnixConn) {
			in, err := io.ReadAll(c)
			assert.NoError(t, err)
			_, err = c.Write([]byte(strings.ToUpper(string(in))))
			assert.NoError(t, err)
		},
	}}
	s := startHybrid(t, guest.dial, defaultHybridTimeouts)
	c := connectHybrid(t, s)

	// The payload is pipelined behind the request.
	_, err := c.Write([]byte("CONNECT 1234\nhello, "))
	require.NoError(t, err)
	_, err = c.Write([]byte("guest"))
	require.NoError(t, err)
	require.NoError(t, c.CloseWrite())

	got, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.Equal(t, "OK 1073741824\nHELLO, GUEST", string(got))
	guest.wg.Wait()
	assert.Equal(t, []uint32{1234}, guest.ports())
}

func TestHybridGuestHalfClose(t *testing.T) {
	guest := &fakeGuest{t: t, open: map[uint32]func(*net.UnixConn){
		// Sends a banner and half-closes, then still reads the answer.
		22: func(c *net.UnixConn) {
			_, err := c.Write([]byte("banner"))
			assert.NoError(t, err)
			assert.NoError(t, c.CloseWrite())
			in, err := io.ReadAll(c)
			assert.NoError(t, err)
			assert.Equal(t, "reply", string(in))
		},
	}}
	s := startHybrid(t, guest.dial, defaultHybridTimeouts)
	c := connectHybrid(t, s)

	_, err := c.Write([]byte("CONNECT 22\n"))
	require.NoError(t, err)
	r := bufio.NewReader(c)
	ok, err := r.ReadString('\n')
	require.NoError(t, err)
	assert.Equal(t, "OK 1073741824\n", ok)
	banner, err := io.ReadAll(r)
	require.NoError(t, err, "the guest's half-close must arrive as EOF")
	assert.Equal(t, "banner", string(banner))

	// The other direction is still open.
	_, err = c.Write([]byte("reply"))
	require.NoError(t, err)
	require.NoError(t, c.CloseWrite())
	guest.wg.Wait()
}

// TestHybridWithoutHalfClose relays to a guest connection that cannot
// half-close (net.Pipe): the client's EOF then ends the whole connection.
func TestHybridWithoutHalfClose(t *testing.T) {
	var wg sync.WaitGroup
	dial := func(ctx context.Context, port uint32) (net.Conn, error) {
		host, guest := net.Pipe()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer guest.Close()
			in, err := io.ReadAll(guest)
			assert.NoError(t, err)
			assert.Equal(t, "ping", string(in))
		}()
		return host, nil
	}
	s := startHybrid(t, dial, defaultHybridTimeouts)
	c := connectHybrid(t, s)
	_, err := c.Write([]byte("CONNECT 5\nping"))
	require.NoError(t, err)
	require.NoError(t, c.CloseWrite())
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.Equal(t, "OK 0\n", string(got), "a connection without a vsock address reports host port 0")
	wg.Wait()
}

// TestHybridRejects covers requests that get no answer: the server closes
// the connection without writing anything, as Firecracker does.
func TestHybridRejects(t *testing.T) {
	timeouts := hybridTimeouts{handshake: 200 * time.Millisecond, dial: time.Second}
	tests := []struct {
		name       string
		send       string
		wantDialed []uint32
		slow       bool // the server must wait out the handshake timeout
	}{
		{name: "garbage", send: "GET / HTTP/1.1\r\n"},
		{name: "overlong line", send: strings.Repeat("CONNECT ", 10) + "\n"},
		{name: "port out of range", send: "CONNECT 99999999999\n"},
		{name: "no newline", send: "CONNECT 1234", slow: true},
		{name: "silent client", send: "", slow: true},
		{name: "guest refuses", send: "CONNECT 4321\n", wantDialed: []uint32{4321}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			guest := &fakeGuest{t: t}
			s := startHybrid(t, guest.dial, timeouts)
			start := time.Now() // the server's deadline starts at accept
			c := connectHybrid(t, s)
			_, err := c.Write([]byte(tt.send))
			require.NoError(t, err)
			got, err := io.ReadAll(c)
			if err != nil {
				// Closing a Unix socket with unread input resets it.
				require.ErrorIs(t, err, unix.ECONNRESET)
			}
			assert.Empty(t, string(got), "a rejected request gets no reply")
			if tt.slow {
				assert.GreaterOrEqual(t, time.Since(start), timeouts.handshake)
			}
			assert.Equal(t, tt.wantDialed, guest.ports())
		})
	}
}

// TestHybridCloseCutsConnections checks that Close ends relayed
// connections, waits for its goroutines and removes the socket.
func TestHybridCloseCutsConnections(t *testing.T) {
	guestSawEOF := make(chan struct{})
	guest := &fakeGuest{t: t, open: map[uint32]func(*net.UnixConn){
		1: func(c *net.UnixConn) {
			_, err := io.ReadAll(c)
			assert.NoError(t, err)
			close(guestSawEOF)
		},
	}}
	s := startHybrid(t, guest.dial, defaultHybridTimeouts)
	c := connectHybrid(t, s)
	_, err := c.Write([]byte("CONNECT 1\n"))
	require.NoError(t, err)
	ok, err := bufio.NewReader(c).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "OK 1073741824\n", ok)

	require.NoError(t, s.Close())
	<-guestSawEOF
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.Empty(t, got)
	_, err = os.Stat(s.path)
	assert.ErrorIs(t, err, os.ErrNotExist)
	_, err = net.Dial("unix", s.path)
	assert.Error(t, err)
}

func TestHostSocketDialer(t *testing.T) {
	hybrid := filepath.Join(privateDir(t), hybridSocketName)
	ln, err := net.Listen("unix", hybrid+"_1234")
	require.NoError(t, err)
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if !assert.NoError(t, err) {
			return
		}
		defer c.Close()
		_, err = c.Write([]byte("from the host"))
		assert.NoError(t, err)
	}()

	dial := hostSocketDialer(hybrid)
	c, err := dial(context.Background(), 1234)
	require.NoError(t, err)
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.Equal(t, "from the host", string(got))
	c.Close()

	_, err = dial(context.Background(), 1235)
	require.ErrorIs(t, err, os.ErrNotExist)
	assert.ErrorContains(t, err, "no listener for host port 1235")
}
