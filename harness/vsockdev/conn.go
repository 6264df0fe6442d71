package vsockdev

import (
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/vmharness/vmharness/harness/virtq"
)

const network = "vsock"

// Addr is a vsock address.
type Addr struct {
	CID  uint64
	Port uint32
}

// Network returns "vsock".
func (a Addr) Network() string { return network }

func (a Addr) String() string { return fmt.Sprintf("%d:%d", a.CID, a.Port) }

type connState int

const (
	stateConnecting  connState = iota // Dial sent (or will send) REQUEST
	stateAccepting                    // guest REQUEST waits for the Fallback
	stateEstablished                  // RESPONSE sent or received
)

// Conn is one stream connection between a host port and a guest port. It is
// a net.Conn; Read and Write may be used concurrently by one reader and one
// writer.
type Conn struct {
	dev *Device
	key connKey

	// Closed when the connection was established (Dial waits on it).
	connected chan struct{}
	// Closed when no further data can arrive or leave, whatever the
	// reason: local Close, a reset either way, device stop.
	dead chan struct{}
	// Tokens: data or a state change for a waiting reader / writer.
	readable, writable chan struct{}
	rdl, wdl           deadline

	// inCtrl, inData: c is on the device's ctrlq / dataq. Guarded by
	// dev.mu, not mu.
	inCtrl, inData bool

	// mu guards everything below. Lock order: mu before dev.mu.
	mu         sync.Mutex
	state      connState
	removed    bool  // gone from dev.conns; the wire is done with it
	err        error // terminal error for Read (after buffered data) and Write
	closed     bool  // Close was called
	deadClosed bool
	closeTimer *time.Timer

	// Guest→host.
	rbuf        ring
	bufAlloc    uint32 // advertised receive buffer
	rxCnt       uint32 // bytes received, wrapping
	fwdCnt      uint32 // bytes consumed by the reader, wrapping
	lastFwdSent uint32 // fwdCnt in the last packet sent to the guest
	// The most data the guest has had in flight (sent, not announced
	// as consumed): a lower bound of its sending window.
	peakInflight uint32
	peerShut     uint32 // shutdown flags the guest sent
	peerReset    bool

	// Host→guest.
	sbuf            ring
	txCnt           uint32 // bytes sent, wrapping
	peerBufAlloc    uint32
	peerFwdCnt      uint32
	creditRequested bool // CREDIT_REQUEST sent, no credit since
	writeShut       bool // CloseWrite was called
	shutWant        uint32
	shutSent        uint32

	// Control packets owed to the guest.
	needRequest, needResponse, needRST, needCreditUpdate bool
}

var _ net.Conn = (*Conn)(nil)

// LocalAddr returns the host end: CID 2 and the host port.
func (c *Conn) LocalAddr() net.Addr { return Addr{CID: HostCID, Port: c.key.host} }

// RemoteAddr returns the guest end.
func (c *Conn) RemoteAddr() net.Addr { return Addr{CID: c.dev.cfg.GuestCID, Port: c.key.guest} }

func (c *Conn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: network, Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// Read reads data the guest sent. Buffered data is always returned first.
// Then Read returns io.EOF if the guest shut down its sending side, closed
// or reset the connection (as Linux reports a peer's RST), and otherwise
// the connection's error: ErrDeviceStopped, ErrDeviceClosed, or
// ECONNRESET when the host reset it (for example because the guest sent
// beyond its credit).
func (c *Conn) Read(p []byte) (int, error) {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return 0, c.opError("read", net.ErrClosed)
		}
		if c.rbuf.len() > 0 {
			if len(p) == 0 {
				c.mu.Unlock()
				return 0, nil
			}
			n := c.rbuf.read(p)
			c.fwdCnt += uint32(n)
			c.maybeCreditUpdate()
			c.mu.Unlock()
			return n, nil
		}
		if c.peerShut&ShutdownSend != 0 {
			c.mu.Unlock()
			return 0, io.EOF
		}
		if c.err != nil {
			err := c.err
			c.mu.Unlock()
			return 0, c.opError("read", err)
		}
		c.mu.Unlock()
		if len(p) == 0 {
			return 0, nil
		}
		select {
		case <-c.readable:
		case <-c.dead:
		case <-c.rdl.wait():
			// Data that raced with the deadline still wins.
			c.mu.Lock()
			ready := c.rbuf.len() > 0 || c.peerShut&ShutdownSend != 0 || c.err != nil || c.closed
			c.mu.Unlock()
			if !ready {
				return 0, c.opError("read", os.ErrDeadlineExceeded)
			}
		}
	}
}

// Write queues p for the guest, blocking while the guest's credit and the
// send buffer are exhausted. Write after CloseWrite or after the guest shut
// down its receiving side fails with EPIPE.
func (c *Conn) Write(p []byte) (int, error) {
	n := 0
	for {
		c.mu.Lock()
		if err := c.writeErrLocked(); err != nil {
			c.mu.Unlock()
			return n, c.opError("write", err)
		}
		if c.sbuf.avail() > 0 && n < len(p) {
			n += c.sbuf.write(p[n:])
			c.schedule(false)
		}
		c.mu.Unlock()
		if n == len(p) {
			return n, nil
		}
		select {
		case <-c.writable:
		case <-c.dead:
		case <-c.wdl.wait():
			c.mu.Lock()
			room := c.sbuf.avail() > 0 || c.writeErrLocked() != nil
			c.mu.Unlock()
			if !room {
				return n, c.opError("write", os.ErrDeadlineExceeded)
			}
		}
	}
}

func (c *Conn) writeErrLocked() error {
	switch {
	case c.closed:
		return net.ErrClosed
	case c.err != nil:
		return c.err
	case c.peerReset:
		return syscall.ECONNRESET
	case c.writeShut, c.peerShut&ShutdownRcv != 0:
		return syscall.EPIPE
	}
	return nil
}

// CloseWrite shuts down the sending side: the guest reads EOF once the data
// written so far is delivered.
func (c *Conn) CloseWrite() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return c.opError("close", net.ErrClosed)
	}
	if c.writeShut {
		return nil
	}
	c.writeShut = true
	c.sbufWake()
	if !c.removed && !c.needRST {
		c.shutWant |= ShutdownSend
		c.schedule(false)
	}
	return nil
}

// Close closes the connection. Data already written is still delivered, then
// the guest is told the connection is shut down both ways; if it does not
// acknowledge with an RST within Config.CloseTimeout, the device resets it.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return c.opError("close", net.ErrClosed)
	}
	c.closed = true
	// Unread data is dropped but counts as consumed, so later packets
	// the guest had credit for are not taken as a credit violation.
	c.fwdCnt += uint32(c.rbuf.len())
	c.rbuf.free()
	c.markDead()
	switch {
	case c.removed || c.needRST:
	case c.state == stateEstablished && c.err == nil:
		c.shutWant = shutdownBoth
		c.schedule(false)
		c.closeTimer = time.AfterFunc(c.dev.cfg.CloseTimeout, func() {
			c.mu.Lock()
			c.resetLocked(nil)
			c.mu.Unlock()
		})
	default:
		c.resetLocked(nil)
	}
	return nil
}

// SetDeadline sets the read and write deadlines.
func (c *Conn) SetDeadline(t time.Time) error {
	c.rdl.set(t)
	c.wdl.set(t)
	return nil
}

// SetReadDeadline sets the read deadline.
func (c *Conn) SetReadDeadline(t time.Time) error { c.rdl.set(t); return nil }

// SetWriteDeadline sets the write deadline.
func (c *Conn) SetWriteDeadline(t time.Time) error { c.wdl.set(t); return nil }

// schedule queues c for the worker; c.mu is held.
func (c *Conn) schedule(ctrl bool) {
	c.dev.mu.Lock()
	c.dev.scheduleLocked(c, ctrl)
	c.dev.mu.Unlock()
}

func (c *Conn) markDead() {
	if !c.deadClosed {
		c.deadClosed = true
		close(c.dead)
	}
	if c.closeTimer != nil {
		// The timer stays armed after a local Close until the wire is
		// done; stopping it here would leave the guest unreset.
		if c.removed {
			c.closeTimer.Stop()
			c.closeTimer = nil
		}
	}
}

func (c *Conn) rbufWake() {
	select {
	case c.readable <- struct{}{}:
	default:
	}
}

func (c *Conn) sbufWake() {
	select {
	case c.writable <- struct{}{}:
	default:
	}
}

// removeLocked forgets the connection on the device side; c.mu is held.
func (c *Conn) removeLocked() {
	if c.removed {
		return
	}
	c.removed = true
	c.dev.mu.Lock()
	if c.dev.conns[c.key] == c {
		delete(c.dev.conns, c.key)
	}
	c.dev.mu.Unlock()
	c.markDead()
}

// resetLocked ends the connection from the host side with an RST; err (if
// not nil) becomes the error Read and Write report. c.mu is held.
func (c *Conn) resetLocked(err error) {
	if err != nil && c.err == nil {
		c.err = err
	}
	if c.err == nil && c.peerShut != shutdownBoth {
		c.err = errReset
	}
	c.sbuf.free()
	c.rbufWake()
	c.sbufWake()
	if c.removed || c.needRST {
		c.markDead()
		return
	}
	if c.state == stateConnecting && c.needRequest {
		// The guest never heard of it.
		c.needRequest = false
		c.removeLocked()
		return
	}
	c.needRST = true
	c.markDead()
	c.schedule(true)
}

// fail ends the connection without telling the guest (it is gone).
func (c *Conn) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
	c.removed = true
	c.needRST = false
	c.sbuf.free()
	c.markDead()
	c.rbufWake()
	c.sbufWake()
}

// handle processes a packet the guest sent on this connection; c.mu is
// held. Everything in h was copied out of guest memory and checked by
// checkTx; p still lies in guest memory.
func (c *Conn) handle(h *Header, p payload) {
	if c.removed || c.needRST {
		return // an RST is on its way or was sent
	}
	c.updateCredit(h)
	switch h.Op {
	case OpRequest:
		c.dev.logPacket(*h, "reset", "REQUEST on an open connection")
		c.resetLocked(errReset)
	case OpResponse:
		if c.state != stateConnecting {
			c.dev.logPacket(*h, "reset", "unexpected RESPONSE")
			c.resetLocked(errReset)
			return
		}
		c.state = stateEstablished
		close(c.connected)
	case OpRST:
		if c.state == stateConnecting {
			c.err = syscall.ECONNREFUSED
		} else if c.state == stateAccepting {
			c.err = errReset
		}
		c.peerReset = true
		c.peerShut = shutdownBoth
		c.sbuf.free()
		c.removeLocked()
		c.rbufWake()
		c.sbufWake()
	case OpShutdown:
		if c.state != stateEstablished {
			c.dev.logPacket(*h, "reset", "SHUTDOWN before the connection was established")
			c.resetLocked(errReset)
			return
		}
		c.peerShut |= h.Flags & shutdownBoth
		if c.peerShut&ShutdownRcv != 0 {
			c.sbuf.free()
			c.sbufWake()
		}
		c.rbufWake()
		if c.peerShut == shutdownBoth {
			// The guest is done both ways; acknowledge with the RST
			// it waits for. Buffered data stays readable.
			c.resetLocked(nil)
		}
	case OpRW:
		c.receive(h, p)
	case OpCreditUpdate:
		// updateCredit did the work.
	case OpCreditRequest:
		c.needCreditUpdate = true
		c.schedule(true)
	}
}

// receive stores the payload of an RW packet.
func (c *Conn) receive(h *Header, p payload) {
	n := int(h.Len)
	switch {
	case c.state != stateEstablished:
		c.dev.logPacket(*h, "reset", "data before the connection was established")
		c.resetLocked(errReset)
		return
	case c.peerShut&ShutdownSend != 0:
		c.dev.logPacket(*h, "reset", "data after the guest shut down sending")
		c.resetLocked(errReset)
		return
	case n > int(c.bufAlloc-(c.rxCnt-c.fwdCnt)):
		c.dev.logPacket(*h, "reset", "%d bytes exceed the credit granted (%d buffered of %d)",
			n, c.rxCnt-c.fwdCnt, c.bufAlloc)
		c.resetLocked(fmt.Errorf("guest sent beyond its credit: %w", syscall.ECONNRESET))
		return
	}
	c.rxCnt += uint32(n)
	c.peakInflight = max(c.peakInflight, c.rxCnt-c.lastFwdSent)
	if c.closed {
		c.fwdCnt += uint32(n) // nobody reads any more
		return
	}
	c.rbuf.write(p.first)
	for _, b := range p.rest {
		c.rbuf.write(b)
	}
	c.rbufWake()
}

// updateCredit records the guest's receive buffer state from any packet.
func (c *Conn) updateCredit(h *Header) {
	before := c.credit()
	c.peerBufAlloc, c.peerFwdCnt = h.BufAlloc, h.FwdCnt
	if c.credit() > before {
		c.creditRequested = false
		if c.sbuf.len() > 0 {
			c.schedule(false)
		}
	}
}

// credit is how many bytes the guest can take now.
func (c *Conn) credit() int {
	inflight := c.txCnt - c.peerFwdCnt
	if inflight >= c.peerBufAlloc {
		return 0
	}
	return int(c.peerBufAlloc - inflight)
}

// maybeCreditUpdate tells the guest about consumed data once the space it
// believes it has falls below half the buffer, or once the reader has
// drained the buffer after at least half of the most the guest ever had in
// flight. The second case matters because a sender may stall well before
// using half of our buffer (Linux caps its credit at its own socket buffer
// size, which can be smaller than ours); at such a stall the data in
// flight is the sender's limit, which is at least the peak seen. c.mu is
// held.
func (c *Conn) maybeCreditUpdate() {
	if c.fwdCnt == c.lastFwdSent || c.removed || c.needRST || c.state != stateEstablished {
		return
	}
	inflight := c.rxCnt - c.lastFwdSent // as the guest sees it
	drained := c.rbuf.len() == 0 && inflight >= c.peakInflight/2
	if (c.bufAlloc-inflight < c.bufAlloc/2 || drained) && !c.needCreditUpdate {
		c.needCreditUpdate = true
		c.schedule(true)
	}
}

// plan returns the next packet c owes the guest, or OpInvalid. With
// ctrlOnly it considers only control packets. c.mu is held.
func (c *Conn) plan(ctrlOnly bool) Op {
	switch {
	case c.removed:
		return OpInvalid
	case c.needRST:
		return OpRST
	case c.needRequest:
		return OpRequest
	case c.needResponse:
		return OpResponse
	case c.needCreditUpdate:
		return OpCreditUpdate
	case ctrlOnly || c.state != stateEstablished:
		return OpInvalid
	case c.sbuf.len() > 0:
		if c.credit() > 0 {
			return OpRW
		}
		if !c.creditRequested {
			return OpCreditRequest
		}
		return OpInvalid
	case c.shutWant&^c.shutSent != 0:
		return OpShutdown
	}
	return OpInvalid
}

// emit writes packet op into the rx chain and returns the bytes written;
// c.mu is held.
func (c *Conn) emit(op Op, ch *virtq.Chain) uint32 {
	h := Header{
		SrcCID: HostCID, DstCID: c.dev.cfg.GuestCID,
		SrcPort: c.key.host, DstPort: c.key.guest,
		Type: TypeStream, Op: op,
		BufAlloc: c.bufAlloc, FwdCnt: c.fwdCnt,
	}
	c.lastFwdSent = c.fwdCnt
	c.needCreditUpdate = false
	switch op {
	case OpRST:
		c.needRST = false
		c.removeLocked()
	case OpRequest:
		c.needRequest = false
	case OpResponse:
		c.needResponse = false
	case OpCreditRequest:
		c.creditRequested = true
	case OpShutdown:
		h.Flags = c.shutWant
		c.shutSent = c.shutWant
	case OpRW:
		n := min(c.sbuf.len(), c.credit(), ch.WritableLen()-HeaderLen, MaxPayload)
		if n <= 0 {
			// A buffer with no room for data: spend it on a
			// credit update rather than hand it back.
			h.Op = OpCreditUpdate
			break
		}
		h.Len = uint32(n)
		a, b := c.sbuf.peek(n)
		written := writePacket(ch, &h, a, b)
		c.sbuf.discard(n)
		c.txCnt += uint32(n)
		c.sbufWake()
		return written
	}
	return writePacket(ch, &h, nil, nil)
}

// listener accepts guest connections to one host port.
type listener struct {
	dev    *Device
	addr   Addr
	accept chan *Conn
	done   chan struct{}
	once   sync.Once
}

func (l *listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.accept:
		return c, nil
	case <-l.done:
		return nil, &net.OpError{Op: "accept", Net: network, Addr: l.addr, Err: net.ErrClosed}
	}
}

func (l *listener) Close() error {
	d := l.dev
	d.mu.Lock()
	if d.listeners[l.addr.Port] == l {
		delete(d.listeners, l.addr.Port)
	}
	d.mu.Unlock()
	if !l.shut() {
		return &net.OpError{Op: "close", Net: network, Addr: l.addr, Err: net.ErrClosed}
	}
	return nil
}

// shut closes the listener after it left dev.listeners, resetting the
// connections nobody accepted. It reports whether it did anything.
func (l *listener) shut() bool {
	first := false
	l.once.Do(func() {
		first = true
		close(l.done)
		for {
			select {
			case c := <-l.accept:
				c.mu.Lock()
				c.resetLocked(errReset)
				c.mu.Unlock()
			default:
				return
			}
		}
	})
	return first
}

func (l *listener) Addr() net.Addr { return l.addr }

// deadline is a settable point in time with a channel that is closed once
// it has passed.
type deadline struct {
	mu    sync.Mutex
	timer *time.Timer
	ch    chan struct{}
}

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil && !d.timer.Stop() {
		<-d.ch // the timer fired and closes ch (or already did)
	}
	d.timer = nil
	expired := false
	select {
	case <-d.ch:
		expired = true
	default:
	}
	if t.IsZero() {
		if expired {
			d.ch = make(chan struct{})
		}
		return
	}
	if dur := time.Until(t); dur > 0 {
		if expired {
			d.ch = make(chan struct{})
		}
		ch := d.ch
		d.timer = time.AfterFunc(dur, func() { close(ch) })
		return
	}
	if !expired {
		close(d.ch)
	}
}

func (d *deadline) wait() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ch
}
