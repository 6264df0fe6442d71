package sshproxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vmharness/vmharness/harness/registry"
)

// fakeResolver is a registry of VMs in memory.
type fakeResolver []registry.Entry

func (r fakeResolver) List() ([]registry.Entry, error) { return r, nil }

func (r fakeResolver) Lookup(name string) (registry.Entry, error) {
	for _, e := range r {
		if e.Name == name {
			return e, nil
		}
	}
	return registry.Entry{}, fmt.Errorf("name %q: %w", name, registry.ErrNotFound)
}

func (r fakeResolver) LookupCID(cid uint32) (registry.Entry, error) {
	for _, e := range r {
		if e.CID == cid {
			return e, nil
		}
	}
	return registry.Entry{}, fmt.Errorf("CID %d: %w", cid, registry.ErrNotFound)
}

// socketpair returns the two ends of a Unix stream socketpair, as ssh sets
// up a ProxyCommand's stdout with ProxyUseFdpass.
func socketpair(t *testing.T) (proxySide, sshSide *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	a, b := os.NewFile(uintptr(fds[0]), "proxy-stdout"), os.NewFile(uintptr(fds[1]), "ssh-side")
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// receiveFD receives one fd sent with SCM_RIGHTS, as OpenSSH's
// mm_receive_fd does, and checks the single data byte.
func receiveFD(t *testing.T, sock *os.File) *os.File {
	t.Helper()
	buf := make([]byte, 1)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := unix.Recvmsg(int(sock.Fd()), buf, oob, unix.MSG_CMSG_CLOEXEC)
	require.NoError(t, err)
	require.Equal(t, 1, n, "one data byte")
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	require.NoError(t, err)
	require.Len(t, msgs, 1)
	fds, err := unix.ParseUnixRights(&msgs[0])
	require.NoError(t, err)
	require.Len(t, fds, 1)
	f := os.NewFile(uintptr(fds[0]), "received")
	t.Cleanup(func() { f.Close() })
	return f
}

func TestProxyPassesConnectedSocket(t *testing.T) {
	srv := startFakeHybrid(t, answerOK, echo)
	tests := []struct {
		name     string
		host     string
		resolver fakeResolver
	}{
		{"vsock-mux", "vsock-mux" + srv.Path, nil},
		{"vsock CID", "vsock/7", fakeResolver{{Name: "vm", CID: 7, HybridSocket: srv.Path}}},
		{"machine name", "machine/TEST-01", fakeResolver{{Name: "TEST-01", CID: 7, HybridSocket: srv.Path}}},
		{"machine name lowercased by ssh", "machine/test-01", fakeResolver{{Name: "TEST-01", CID: 7, HybridSocket: srv.Path}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, sshSide := socketpair(t)
			p := Proxy{Dialer: Dialer{Resolver: tt.resolver, Timeout: 5 * time.Second}, Stdin: strings.NewReader(""), Stdout: stdout}
			require.NoError(t, p.Run(context.Background(), tt.host, 2222))
			assert.Equal(t, "CONNECT 2222\n", srv.Requests()[len(srv.Requests())-1])

			// The proxy has exited (Run returned and closed its copy); the
			// received socket alone talks to the guest service.
			conn, err := net.FileConn(receiveFD(t, sshSide))
			require.NoError(t, err)
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			br := bufio.NewReader(conn)
			line, err := br.ReadString('\n')
			require.NoError(t, err)
			assert.Equal(t, "hello\n", line)
			_, err = io.WriteString(conn, "ping\n")
			require.NoError(t, err)
			line, err = br.ReadString('\n')
			require.NoError(t, err)
			assert.Equal(t, "ping\n", line)
		})
	}
}

func TestProxyPassesPlainUnixSocket(t *testing.T) {
	dir, err := shortTempDir(t)
	require.NoError(t, err)
	path := filepath.Join(dir, "sshd.sock")
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			io.WriteString(c, "SSH-2.0-fake\r\n")
			c.Close()
		}
	}()

	stdout, sshSide := socketpair(t)
	p := Proxy{Stdin: strings.NewReader(""), Stdout: stdout}
	require.NoError(t, p.Run(context.Background(), "unix"+path, 22))
	got, err := io.ReadAll(receiveFD(t, sshSide))
	require.NoError(t, err)
	assert.Equal(t, "SSH-2.0-fake\r\n", string(got))
}

func TestProxyCopiesWithoutFdpass(t *testing.T) {
	srv := startFakeHybrid(t, answerOK, func(c net.Conn) {
		io.WriteString(c, "hello\n")
		// Echo until the client half-closes, then close: the proxy must
		// pass the EOF on and finish.
		io.Copy(c, c)
	})
	var out bytes.Buffer
	p := Proxy{Stdin: strings.NewReader("one\ntwo\n"), Stdout: &out}
	done := make(chan error, 1)
	go func() { done <- p.Run(context.Background(), "vsock-mux"+srv.Path, 22) }()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("copying proxy did not finish after both sides closed")
	}
	assert.Equal(t, "hello\none\ntwo\n", out.String())
}

func TestProxyErrorsAreQuickAndClear(t *testing.T) {
	silent := startFakeHybrid(t, answerSilence, nil)
	garbage := startFakeHybrid(t, answerGarbage, nil)
	closing := startFakeHybrid(t, answerClose, nil)
	dir, err := shortTempDir(t)
	require.NoError(t, err)
	notASocket := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(notASocket, nil, 0o600))

	tests := []struct {
		name     string
		host     string
		resolver Resolver
		timeout  time.Duration
		maxTime  time.Duration
		wantErr  string
	}{
		{"unknown CID", "vsock/17", fakeResolver{{Name: "vm", CID: 3}}, 0, 100 * time.Millisecond,
			"vsock/17: no running harness VM has CID 17 (see vmharness ps)"},
		{"unknown machine", "machine/nope", fakeResolver{}, 0, 100 * time.Millisecond,
			`machine/nope: no running harness VM is called "nope" (see vmharness ps)`},
		{"no registry", "vsock/3", nil, 0, 100 * time.Millisecond, "no VM registry"},
		{"bad address", "vsock/x", nil, 0, 100 * time.Millisecond, "not a number"},
		{"missing socket", "vsock-mux" + dir + "/missing", nil, 0, 100 * time.Millisecond, "no such file or directory"},
		{"not a socket", "unix" + notASocket, nil, 0, 100 * time.Millisecond, "connection refused"},
		{"garbage answer", "vsock-mux" + garbage.Path, nil, 0, time.Second, "instead of OK"},
		{"closed", "vsock-mux" + closing.Path, nil, 0, time.Second, "closed the connection"},
		{"silence", "vsock-mux" + silent.Path, nil, 500 * time.Millisecond, 3 * time.Second, "did not answer CONNECT 22 in time"},
		// Kernel AF_VSOCK to a CID nobody has: the kernel's connect timeout
		// (2 s) or ours ends it; without /dev/vsock it fails at once.
		{"kernel transport, nothing there", "vsock/4000", fakeResolver{{Name: "k", CID: 4000, Transport: registry.TransportKernel}}, 3 * time.Second, 5 * time.Second,
			"vsock/4000: connect to vsock CID 4000 port 22 of VM \"k\""},
		{"VM with a dead hybrid socket", "machine/vm", fakeResolver{{Name: "vm", CID: 5, HybridSocket: dir + "/gone"}}, 0, 100 * time.Millisecond, "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, _ := socketpair(t)
			p := Proxy{Dialer: Dialer{Resolver: tt.resolver, Timeout: tt.timeout}, Stdin: strings.NewReader(""), Stdout: stdout}
			start := time.Now()
			err := p.Run(context.Background(), tt.host, 22)
			elapsed := time.Since(start)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.NotContains(t, err.Error(), "\n")
			assert.Less(t, elapsed, tt.maxTime)
		})
	}
}

func TestProxyDefaultTimeoutBoundsSilence(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the default timeout")
	}
	silent := startFakeHybrid(t, answerSilence, nil)
	stdout, _ := socketpair(t)
	p := Proxy{Stdin: strings.NewReader(""), Stdout: stdout}
	start := time.Now()
	err := p.Run(context.Background(), "vsock-mux"+silent.Path, 22)
	require.ErrorContains(t, err, "in time")
	assert.Less(t, time.Since(start), 15*time.Second)
	assert.GreaterOrEqual(t, time.Since(start), DefaultTimeout-time.Second)
}

func TestProxyHonoursCancel(t *testing.T) {
	silent := startFakeHybrid(t, answerSilence, nil)
	stdout, _ := socketpair(t)
	p := Proxy{Stdin: strings.NewReader(""), Stdout: stdout}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(200*time.Millisecond, cancel)
	start := time.Now()
	err := p.Run(ctx, "vsock-mux"+silent.Path, 22)
	require.Error(t, err)
	assert.Less(t, time.Since(start), 3*time.Second)
	assert.False(t, errors.Is(err, context.DeadlineExceeded))
}

// A VM served by the kernel transport also has a hybrid socket (the
// runner registers it), but the proxy must hand ssh a real AF_VSOCK
// socket: the working hybrid socket here must not be touched, and the
// AF_VSOCK connect to a CID nobody has fails.
func TestProxyKernelTransportDialsAFVsock(t *testing.T) {
	hybrid := startFakeHybrid(t, answerOK, func(c net.Conn) { io.WriteString(c, "SSH-2.0-fake\r\n") })
	stdout, _ := socketpair(t)
	resolver := fakeResolver{{Name: "k", CID: 4001, Transport: registry.TransportKernel, HybridSocket: hybrid.Path}}
	p := Proxy{Dialer: Dialer{Resolver: resolver, Timeout: 3 * time.Second}, Stdin: strings.NewReader(""), Stdout: stdout}
	err := p.Run(context.Background(), "vsock/4001", 22)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "connect to vsock CID 4001 port 22")
	assert.Empty(t, hybrid.Requests(), "the kernel transport's VM was reached through its hybrid socket")

	// The same entry with the userspace transport goes through the hybrid
	// socket.
	resolver[0].Transport = registry.TransportUser
	p.Dialer.Resolver = resolver
	require.NoError(t, p.Run(context.Background(), "vsock/4001", 22))
	assert.Equal(t, []string{"CONNECT 22\n"}, hybrid.Requests())
}
