package sshproxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// hybridBehavior is how a fake hybrid vsock socket answers CONNECT.
type hybridBehavior int

const (
	answerOK      hybridBehavior = iota // "OK <n>\n", then serve
	answerGarbage                       // "NOPE\n"
	answerSilence                       // never answer
	answerClose                         // close the connection
)

// fakeHybrid is a hybrid vsock Unix socket in a temp dir. After a good
// handshake it hands the connection (with any bytes already buffered) to
// serve.
type fakeHybrid struct {
	Path     string
	behavior hybridBehavior
	serve    func(net.Conn)

	mu       sync.Mutex
	requests []string
}

func startFakeHybrid(t *testing.T, behavior hybridBehavior, serve func(net.Conn)) *fakeHybrid {
	t.Helper()
	// Unix socket paths are limited to 108 bytes; t.TempDir can be longer.
	dir, err := shortTempDir(t)
	require.NoError(t, err)
	f := &fakeHybrid{Path: filepath.Join(dir, "vsock.sock"), behavior: behavior, serve: serve}
	l, err := net.Listen("unix", f.Path)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancel()
		l.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				stop := context.AfterFunc(ctx, func() { c.Close() })
				defer stop()
				defer c.Close()
				f.handle(c)
			}()
		}
	}()
	return f
}

func (f *fakeHybrid) handle(c net.Conn) {
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return
	}
	f.mu.Lock()
	f.requests = append(f.requests, line)
	f.mu.Unlock()
	switch f.behavior {
	case answerOK:
		if _, err := io.WriteString(c, "OK 1073741824\n"); err != nil {
			return
		}
		f.serve(bufferedConn{Conn: c, r: br})
	case answerGarbage:
		io.WriteString(c, "NOPE\n")
	case answerSilence:
		io.Copy(io.Discard, c)
	case answerClose:
	}
}

func (f *fakeHybrid) Requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.requests...)
}

// bufferedConn reads through the bufio.Reader that read the handshake.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// echo is a guest service that greets and then echoes.
func echo(c net.Conn) {
	fmt.Fprint(c, "hello\n")
	io.Copy(c, c)
}
