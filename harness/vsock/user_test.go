package vsock

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdlayher/vsock"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/vhostuser/vhostusertest"
	"github.com/vmharness/vmharness/harness/vsockdev"
)

// testGuest is a tiny guest vsock driver over vhostusertest's queues: it
// keeps rx buffers posted, hands every packet the device sends to the test
// through packets, and sends packets on tx. Connection state is the test's
// business; this only moves packets.
type testGuest struct {
	t       *testing.T
	cid     uint64
	rx, tx  *vhostusertest.DriverQueue
	packets chan guestPacket

	txMu   sync.Mutex
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

type guestPacket struct {
	vsockdev.Header
	payload []byte
}

const testRxBuffer = vsockdev.HeaderLen + 4096

func newTestGuest(t *testing.T, d *vhostusertest.Driver, cid uint64) *testGuest {
	ctx, cancel := context.WithCancel(context.Background())
	g := &testGuest{
		t: t, cid: cid, rx: d.Queue(0), tx: d.Queue(1),
		packets: make(chan guestPacket, 256),
		ctx:     ctx, cancel: cancel, done: make(chan struct{}),
	}
	for range 32 {
		_, err := g.rx.Add(nil, []int{testRxBuffer})
		require.NoError(t, err)
	}
	require.NoError(t, g.rx.Kick())
	go g.rxLoop()
	t.Cleanup(func() { g.cancel(); <-g.done })
	return g
}

func (g *testGuest) rxLoop() {
	defer close(g.done)
	for {
		_, data, err := g.rx.Used(g.ctx)
		if err != nil {
			return
		}
		h, err := vsockdev.DecodeHeader(data)
		if assert.NoError(g.t, err) && assert.LessOrEqual(g.t, int(h.Len), len(data)-vsockdev.HeaderLen) {
			g.packets <- guestPacket{Header: h, payload: data[vsockdev.HeaderLen : vsockdev.HeaderLen+int(h.Len)]}
		}
		if _, err := g.rx.Add(nil, []int{testRxBuffer}); assert.NoError(g.t, err) {
			assert.NoError(g.t, g.rx.Kick())
		}
	}
}

// send sends one packet from guest port src to host port dst and waits
// until the device has consumed it.
func (g *testGuest) send(op vsockdev.Op, src, dst uint32, flags uint32, payload []byte) {
	g.t.Helper()
	h := vsockdev.Header{
		SrcCID: g.cid, DstCID: HostCID, SrcPort: src, DstPort: dst,
		Len: uint32(len(payload)), Type: vsockdev.TypeStream, Op: op, Flags: flags,
		BufAlloc: 256 << 10,
	}
	b := make([]byte, vsockdev.HeaderLen)
	h.Encode(b)
	chain := [][]byte{b}
	if len(payload) > 0 {
		chain = append(chain, payload)
	}
	g.txMu.Lock()
	defer g.txMu.Unlock()
	_, err := g.tx.Add(chain, nil)
	require.NoError(g.t, err)
	require.NoError(g.t, g.tx.Kick())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, _, err = g.tx.Used(ctx)
	require.NoError(g.t, err)
}

// expect returns the next packet that is not a credit update, and checks
// its op and ports.
func (g *testGuest) expect(op vsockdev.Op, src, dst uint32) guestPacket {
	g.t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case p := <-g.packets:
			if p.Op == vsockdev.OpCreditUpdate || p.Op == vsockdev.OpCreditRequest {
				continue
			}
			require.Equal(g.t, op, p.Op, "packet %s", &p.Header)
			assert.Equal(g.t, uint64(HostCID), p.SrcCID)
			assert.Equal(g.t, g.cid, p.DstCID)
			if src != 0 {
				assert.Equal(g.t, src, p.SrcPort, "packet %s", &p.Header)
			}
			assert.Equal(g.t, dst, p.DstPort, "packet %s", &p.Header)
			return p
		case <-timeout:
			g.t.Fatalf("guest: no %s packet to port %d within 10s", op, dst)
		}
	}
}

type fixedCID uint32

func (c fixedCID) ReserveCID() (uint32, func(), error) { return uint32(c), func() {}, nil }

// startUser builds the userspace transport and connects a fake QEMU and
// guest to it.
func startUser(t *testing.T, cid uint32) (Transport, *testGuest) {
	dir := privateDir(t)
	tr, err := New(context.Background(), Config{Mode: ModeUser, RuntimeDir: dir, CIDAllocator: fixedCID(cid), Logf: t.Logf})
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, tr.Close()) })
	require.Equal(t, KindUser, tr.Kind())
	require.Equal(t, cid, tr.CID())

	sock := filepath.Join(dir, "vhost-user.sock")
	assert.Equal(t, []string{
		"-chardev", "socket,id=vhostvsock,path=" + sock,
		"-device", "vhost-user-vsock-pci,chardev=vhostvsock",
	}, tr.QEMUArgs())
	assert.Empty(t, tr.ExtraFiles())

	d := vhostusertest.NewDriver(t, sock, vhostusertest.Options{})
	t.Cleanup(d.Close)
	require.Equal(t, uint64(cid), binary.LittleEndian.Uint64(d.Config()), "the device must expose the reserved CID")
	return tr, newTestGuest(t, d, uint64(cid))
}

func TestUserGuestConnectsToHost(t *testing.T) {
	tr, g := startUser(t, 7)
	ln, err := tr.Listen(1234)
	require.NoError(t, err)
	defer ln.Close()
	assert.Equal(t, &vsock.Addr{ContextID: HostCID, Port: 1234}, ln.Addr())

	g.send(vsockdev.OpRequest, 40000, 1234, 0, nil)
	g.expect(vsockdev.OpResponse, 1234, 40000)
	c, err := ln.Accept()
	require.NoError(t, err)
	defer c.Close()

	g.send(vsockdev.OpRW, 40000, 1234, 0, []byte("EXIT_STATUS=0\n"))
	g.send(vsockdev.OpShutdown, 40000, 1234, vsockdev.ShutdownSend, nil)
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.Equal(t, "EXIT_STATUS=0\n", string(got))

	_, err = c.Write([]byte("bye"))
	require.NoError(t, err)
	p := g.expect(vsockdev.OpRW, 1234, 40000)
	assert.Equal(t, "bye", string(p.payload))
}

func TestUserListenPicksFreePort(t *testing.T) {
	tr, g := startUser(t, 3)
	a, err := tr.Listen(0)
	require.NoError(t, err)
	defer a.Close()
	b, err := tr.Listen(0)
	require.NoError(t, err)
	defer b.Close()
	pa, pb := a.Addr().(*vsock.Addr).Port, b.Addr().(*vsock.Addr).Port
	assert.NotEqual(t, pa, pb)
	assert.NotZero(t, pa)

	// The port really is the one listened on.
	g.send(vsockdev.OpRequest, 40001, pb, 0, nil)
	g.expect(vsockdev.OpResponse, pb, 40001)
	c, err := b.Accept()
	require.NoError(t, err)
	c.Close()
}

func TestUserHostDialsGuest(t *testing.T) {
	tr, g := startUser(t, 9)
	type result struct {
		c   net.Conn
		err error
	}
	dialed := make(chan result, 1)
	go func() {
		c, err := tr.Dial(context.Background(), 5000)
		dialed <- result{c, err}
	}()
	req := g.expect(vsockdev.OpRequest, 0, 5000)
	g.send(vsockdev.OpResponse, 5000, req.SrcPort, 0, nil)
	r := <-dialed
	require.NoError(t, r.err)
	defer r.c.Close()

	_, err := r.c.Write([]byte("ping"))
	require.NoError(t, err)
	assert.Equal(t, "ping", string(g.expect(vsockdev.OpRW, req.SrcPort, 5000).payload))
	g.send(vsockdev.OpRW, 5000, req.SrcPort, 0, []byte("pong"))
	buf := make([]byte, 4)
	_, err = io.ReadFull(r.c, buf)
	require.NoError(t, err)
	assert.Equal(t, "pong", string(buf))

	// A port nobody listens on in the guest: RST, and Dial fails.
	go func() {
		c, err := tr.Dial(context.Background(), 5001)
		dialed <- result{c, err}
	}()
	req = g.expect(vsockdev.OpRequest, 0, 5001)
	g.send(vsockdev.OpRST, 5001, req.SrcPort, 0, nil)
	r = <-dialed
	require.Error(t, r.err)
	assert.Contains(t, r.err.Error(), "guest 9 port 5001")
}

func TestUserHybridConnect(t *testing.T) {
	tr, g := startUser(t, 11)
	c, err := net.Dial("unix", tr.HybridSocket())
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))

	_, err = c.Write([]byte("CONNECT 22\n"))
	require.NoError(t, err)
	req := g.expect(vsockdev.OpRequest, 0, 22)
	g.send(vsockdev.OpResponse, 22, req.SrcPort, 0, nil)
	r := bufio.NewReader(c)
	ok, err := r.ReadString('\n')
	require.NoError(t, err)
	assert.Equal(t, "OK "+strconv.FormatUint(uint64(req.SrcPort), 10)+"\n", ok, "the OK line names the host-side port")

	_, err = c.Write([]byte("SSH-2.0-test\r\n"))
	require.NoError(t, err)
	assert.Equal(t, "SSH-2.0-test\r\n", string(g.expect(vsockdev.OpRW, req.SrcPort, 22).payload))
	g.send(vsockdev.OpRW, 22, req.SrcPort, 0, []byte("SSH-2.0-guest\r\n"))
	line, err := r.ReadString('\n')
	require.NoError(t, err)
	assert.Equal(t, "SSH-2.0-guest\r\n", line)

	// The client's half-close reaches the guest as SHUTDOWN(send).
	require.NoError(t, c.(*net.UnixConn).CloseWrite())
	sd := g.expect(vsockdev.OpShutdown, req.SrcPort, 22)
	assert.Equal(t, vsockdev.ShutdownSend, sd.Flags&vsockdev.ShutdownSend)

	// A refused port closes the client without an answer.
	c2, err := net.Dial("unix", tr.HybridSocket())
	require.NoError(t, err)
	defer c2.Close()
	_, err = c2.Write([]byte("CONNECT 23\n"))
	require.NoError(t, err)
	req = g.expect(vsockdev.OpRequest, 0, 23)
	g.send(vsockdev.OpRST, 23, req.SrcPort, 0, nil)
	got, err := io.ReadAll(c2)
	require.NoError(t, err)
	assert.Empty(t, got)
}

func TestUserFallbackToHostSocket(t *testing.T) {
	tr, g := startUser(t, 3)
	ln, err := net.Listen("unix", tr.HybridSocket()+"_7777")
	require.NoError(t, err)
	defer ln.Close()

	g.send(vsockdev.OpRequest, 40002, 7777, 0, nil)
	g.expect(vsockdev.OpResponse, 7777, 40002)
	c, err := ln.Accept()
	require.NoError(t, err)
	defer c.Close()
	g.send(vsockdev.OpRW, 40002, 7777, 0, []byte("journal entry"))
	buf := make([]byte, len("journal entry"))
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)
	assert.Equal(t, "journal entry", string(buf))

	// No listener and no socket: the guest is reset.
	g.send(vsockdev.OpRequest, 40003, 7778, 0, nil)
	g.expect(vsockdev.OpRST, 7778, 40003)
}

func TestUserCloseCleansUp(t *testing.T) {
	dir := privateDir(t)
	released := make(chan struct{})
	alloc := allocFunc(func() (uint32, func(), error) { return 5, func() { close(released) }, nil })
	tr, err := New(context.Background(), Config{Mode: ModeUser, RuntimeDir: dir, CIDAllocator: alloc, Logf: t.Logf})
	require.NoError(t, err)
	d := vhostusertest.NewDriver(t, filepath.Join(dir, "vhost-user.sock"), vhostusertest.Options{})
	defer d.Close()
	ln, err := tr.Listen(1)
	require.NoError(t, err)

	require.NoError(t, tr.Close())
	<-released
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Empty(t, entries, "Close must remove every socket")
	_, err = ln.Accept()
	assert.Error(t, err, "listeners die with the transport")
	require.NoError(t, tr.Close(), "Close is idempotent")
}

type allocFunc func() (uint32, func(), error)

func (f allocFunc) ReserveCID() (uint32, func(), error) { return f() }

// syncLog collects Logf lines from several goroutines.
type syncLog struct {
	t     *testing.T
	mu    sync.Mutex
	lines []string
}

func (l *syncLog) logf(format string, args ...any) {
	l.t.Logf(format, args...)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
}

func (l *syncLog) contains(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.ContainsFunc(l.lines, func(line string) bool { return strings.Contains(line, s) })
}

// TestUserLogsServerErrors checks that a front-end breaking the vhost-user
// protocol is reported through Logf (not the process's default logger) and
// that the transport keeps serving the next front-end.
func TestUserLogsServerErrors(t *testing.T) {
	dir := privateDir(t)
	log := syncLog{t: t}
	tr, err := New(context.Background(), Config{Mode: ModeUser, RuntimeDir: dir, Logf: log.logf})
	require.NoError(t, err)
	defer tr.Close()
	sock := filepath.Join(dir, "vhost-user.sock")

	c, err := net.Dial("unix", sock)
	require.NoError(t, err)
	_, err = c.Write(bytes.Repeat([]byte{0xff}, 64))
	require.NoError(t, err)
	c.Close()
	require.Eventually(t, func() bool { return log.contains("vsock: level=WARN") }, 10*time.Second, 10*time.Millisecond)

	d := vhostusertest.NewDriver(t, sock, vhostusertest.Options{})
	defer d.Close()
	assert.Equal(t, uint64(3), binary.LittleEndian.Uint64(d.Config()))
}

func TestUserQEMUArgsEscapeCommas(t *testing.T) {
	dir := filepath.Join(privateDir(t), "a,b")
	require.NoError(t, os.Mkdir(dir, 0o700))
	tr, err := New(context.Background(), Config{Mode: ModeUser, RuntimeDir: dir})
	require.NoError(t, err)
	defer tr.Close()
	assert.Equal(t, "socket,id=vhostvsock,path="+filepath.Dir(dir)+"/a,,b/vhost-user.sock", tr.QEMUArgs()[1])
}

func TestListenFree(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.Chmod(dir, 0o700))
	tr, err := New(context.Background(), Config{Mode: ModeUser, RuntimeDir: dir})
	require.NoError(t, err)
	defer tr.Close()
	l1, port1, err := ListenFree(tr)
	require.NoError(t, err)
	defer l1.Close()
	l2, port2, err := ListenFree(tr)
	require.NoError(t, err)
	defer l2.Close()
	assert.NotZero(t, port1)
	assert.NotEqual(t, port1, port2, "each call gets its own port")
	assert.Equal(t, port1, l1.Addr().(*vsock.Addr).Port)
}
