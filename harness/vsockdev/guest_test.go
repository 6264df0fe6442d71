package vsockdev

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmharness/vmharness/harness/vhostuser/vhostusertest"
)

// driverQueue is the guest driver's side of a virtqueue, as
// vhostusertest.DriverQueue and fakeQueue provide it.
type driverQueue interface {
	Add(readable [][]byte, writableLens []int) (uint16, error)
	Kick() error
	Used(ctx context.Context) (uint16, []byte, error)
}

// guestOptions shape the test guest's behaviour.
type guestOptions struct {
	cid      uint64
	bufAlloc uint32 // receive buffer per socket
	// rxLayouts are the writable buffer lengths of the rx buffers the
	// guest posts, cycled.
	rxLayouts [][]int
	// rxBuffers is how many rx buffers to keep posted (bounded by the
	// queue's descriptors).
	rxBuffers int
	// lazyCredit: send CREDIT_UPDATE only in reply to CREDIT_REQUEST.
	lazyCredit bool
	// capCredit: never have more than bufAlloc in flight, whatever the
	// host advertises (as Linux does since it caps peer credit at its
	// own buffer size).
	capCredit bool
	// txSlots bounds the tx chains in flight. Set it above the ring's
	// capacity to have senders wait for the device to return
	// descriptors once the ring is full, as Linux's tx worker does.
	txSlots int
	// maxBuffer is the largest single buffer the queue takes.
	maxBuffer int
}

func (o *guestOptions) defaults() {
	if o.cid == 0 {
		o.cid = 3
	}
	if o.bufAlloc == 0 {
		o.bufAlloc = 256 << 10
	}
	if len(o.rxLayouts) == 0 {
		// Old Linux drivers: header and payload descriptors; new
		// ones: one buffer; plus an awkward split.
		o.rxLayouts = [][]int{{HeaderLen, 4096}, {HeaderLen + 4096}, {10, 40, 4090}}
	}
	if o.rxBuffers == 0 {
		o.rxBuffers = 48
	}
	if o.txSlots == 0 {
		o.txSlots = 40
	}
	if o.maxBuffer == 0 {
		o.maxBuffer = 64 << 10
	}
}

// guest is a minimal vsock stack playing the guest kernel over a device's
// rx and tx queues. It checks every packet the device sends and records
// protocol violations, which fail the test at cleanup.
type guest struct {
	t    testing.TB
	opts guestOptions
	rx   driverQueue
	tx   driverQueue

	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	goMu    sync.Mutex
	stopped bool

	txSlots chan struct{}
	txFreed chan struct{} // capacity 1: the device returned a tx chain
	txFull  atomic.Int64  // times a sender found the tx ring full
	txMu    sync.Mutex
	txSeq   atomic.Uint64

	rxMu      sync.Mutex
	rxLayout  map[uint16][]int
	rxNext    int
	opsSeen   [8]atomic.Int64
	rstsTo    sync.Map // guest port → *atomic.Int64: RSTs received
	bytesSeen atomic.Int64

	mu         sync.Mutex
	socks      map[gkey]*gsock
	listeners  map[uint32]chan *gsock
	nextPort   uint32
	violations []string
}

type gkey struct{ local, remote uint32 }

func newGuest(t testing.TB, rx, tx driverQueue, opts guestOptions) *guest {
	opts.defaults()
	ctx, cancel := context.WithCancel(context.Background())
	g := &guest{
		t: t, opts: opts, rx: rx, tx: tx, ctx: ctx, cancel: cancel,
		txSlots:   make(chan struct{}, opts.txSlots),
		txFreed:   make(chan struct{}, 1),
		rxLayout:  make(map[uint16][]int),
		socks:     make(map[gkey]*gsock),
		listeners: make(map[uint32]chan *gsock),
		nextPort:  1024,
	}
	for range opts.rxBuffers {
		if err := g.postRx(); err != nil {
			break
		}
	}
	if err := rx.Kick(); err != nil {
		t.Fatalf("guest: kick rx: %v", err)
	}
	g.wg.Add(2)
	go g.rxLoop()
	go g.txReaper()
	t.Cleanup(func() {
		g.stop()
		if v := g.violationList(); len(v) > 0 {
			t.Errorf("device protocol violations seen by the guest:\n%v", v)
		}
	})
	return g
}

// goAsync runs f in a goroutine that stop waits for.
func (g *guest) goAsync(f func()) {
	g.goMu.Lock()
	defer g.goMu.Unlock()
	if g.stopped {
		return
	}
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		f()
	}()
}

// stop ends the guest's goroutines.
func (g *guest) stop() {
	g.goMu.Lock()
	g.stopped = true
	g.goMu.Unlock()
	g.cancel()
	g.mu.Lock()
	for _, s := range g.socks {
		s.broadcast()
	}
	g.mu.Unlock()
	g.wg.Wait()
}

func (g *guest) violation(format string, args ...any) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.violations = append(g.violations, fmt.Sprintf(format, args...))
}

func (g *guest) violationList() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]string(nil), g.violations...)
}

func (g *guest) seen(op Op) int64 { return g.opsSeen[op].Load() }

// rstsSeen counts the RSTs the device sent to guest port.
func (g *guest) rstsSeen(port uint32) int64 {
	if n, ok := g.rstsTo.Load(port); ok {
		return n.(*atomic.Int64).Load()
	}
	return 0
}

func (g *guest) postRx() error {
	g.rxMu.Lock()
	defer g.rxMu.Unlock()
	layout := g.opts.rxLayouts[g.rxNext%len(g.opts.rxLayouts)]
	head, err := g.rx.Add(nil, layout)
	if err != nil {
		return err
	}
	g.rxNext++
	g.rxLayout[head] = layout
	return nil
}

func (g *guest) rxLoop() {
	defer g.wg.Done()
	for {
		head, data, err := g.rx.Used(g.ctx)
		if err != nil {
			if g.ctx.Err() == nil {
				g.violation("rx used ring: %v", err)
			}
			return
		}
		g.rxMu.Lock()
		layout := g.rxLayout[head]
		delete(g.rxLayout, head)
		g.rxMu.Unlock()
		if data != nil || layout != nil {
			g.receive(data)
		}
		g.rxMu.Lock()
		if layout == nil {
			layout = g.opts.rxLayouts[0]
		}
		if h, err := g.rx.Add(nil, layout); err == nil {
			g.rxLayout[h] = layout
		}
		g.rxMu.Unlock()
		g.rx.Kick()
	}
}

func (g *guest) txReaper() {
	defer g.wg.Done()
	for {
		if _, _, err := g.tx.Used(g.ctx); err != nil {
			if g.ctx.Err() == nil {
				g.violation("tx used ring: %v", err)
			}
			return
		}
		select {
		case <-g.txSlots:
		default:
			g.violation("tx chain completed twice")
		}
		select {
		case g.txFreed <- struct{}{}:
		default:
		}
	}
}

// sendRaw puts one packet on the tx queue, laid out in one of several ways
// so the device sees every split of header and payload.
func (g *guest) sendRaw(h Header, payload []byte) error {
	var hdr [HeaderLen]byte
	h.Encode(hdr[:])
	var bufs [][]byte
	switch seq := g.txSeq.Add(1); {
	case len(payload) == 0:
		bufs = [][]byte{hdr[:]}
	case seq%3 == 1 && HeaderLen+len(payload) <= g.opts.maxBuffer:
		bufs = [][]byte{append(hdr[:], payload...)}
	case seq%3 == 2 && len(payload) > 1:
		k := len(payload) / 2
		bufs = [][]byte{hdr[:10], append(hdr[10:], payload[:k]...), payload[k:]}
	default:
		bufs = [][]byte{hdr[:], payload}
	}
	return g.sendChain(bufs)
}

// sendChain puts one chain of readable buffers on the tx queue.
func (g *guest) sendChain(bufs [][]byte) error {
	// Callers may be the test's own goroutines: stop waits for sends in
	// progress so the queues outlive them.
	g.goMu.Lock()
	if g.stopped {
		g.goMu.Unlock()
		return context.Canceled
	}
	g.wg.Add(1)
	g.goMu.Unlock()
	defer g.wg.Done()
	select {
	case g.txSlots <- struct{}{}:
	case <-g.ctx.Done():
		return g.ctx.Err()
	}
	g.txMu.Lock()
	defer g.txMu.Unlock()
	for {
		if err := g.ctx.Err(); err != nil {
			<-g.txSlots
			return err
		}
		_, err := g.tx.Add(bufs, nil)
		if err == nil {
			return g.tx.Kick()
		}
		if !errors.Is(err, vhostusertest.ErrQueueFull) {
			<-g.txSlots
			return fmt.Errorf("guest: add tx chain: %w", err)
		}
		// The ring is full: wait for the device to return a chain
		// (its interrupt), as Linux's tx worker does.
		g.txFull.Add(1)
		select {
		case <-g.txFreed:
		case <-g.ctx.Done():
		}
	}
}

func (g *guest) reply(h *Header, op Op) {
	r := Header{
		SrcCID: g.opts.cid, DstCID: HostCID, SrcPort: h.DstPort, DstPort: h.SrcPort,
		Type: TypeStream, Op: op, BufAlloc: g.opts.bufAlloc,
	}
	g.sendRaw(r, nil)
}

// receive checks and dispatches one packet from the device.
func (g *guest) receive(data []byte) {
	h, err := DecodeHeader(data)
	if err != nil {
		g.violation("rx packet of %d bytes: %v", len(data), err)
		return
	}
	switch {
	case h.SrcCID != HostCID || h.DstCID != g.opts.cid:
		g.violation("%v: wrong CIDs", &h)
	case h.Type != TypeStream:
		g.violation("%v: wrong type", &h)
	case !h.Op.Valid():
		g.violation("%v: invalid op", &h)
	case int(h.Len) != len(data)-HeaderLen:
		g.violation("%v: len does not match the %d bytes written", &h, len(data)-HeaderLen)
	case h.Op == OpRW && h.Len == 0, h.Op != OpRW && h.Len != 0:
		g.violation("%v: bad payload length for the op", &h)
	case h.Op == OpShutdown && (h.Flags == 0 || h.Flags&^shutdownBoth != 0):
		g.violation("%v: bad shutdown flags", &h)
	default:
		g.opsSeen[h.Op].Add(1)
		if h.Op == OpRST {
			n, _ := g.rstsTo.LoadOrStore(h.DstPort, new(atomic.Int64))
			n.(*atomic.Int64).Add(1)
		}
		g.dispatch(&h, data[HeaderLen:])
		return
	}
}

func (g *guest) dispatch(h *Header, payload []byte) {
	key := gkey{local: h.DstPort, remote: h.SrcPort}
	g.mu.Lock()
	s := g.socks[key]
	if s == nil {
		lc := g.listeners[h.DstPort]
		if h.Op == OpRequest && lc != nil {
			s = g.newSockLocked(key)
			s.state = gEstablished
			s.peerBufAlloc, s.peerFwdCnt = h.BufAlloc, h.FwdCnt
			select {
			case lc <- s:
				g.mu.Unlock()
				s.sendCtrl(OpResponse, 0)
			default:
				delete(g.socks, key)
				g.mu.Unlock()
				g.reply(h, OpRST)
			}
			return
		}
		g.mu.Unlock()
		if h.Op != OpRST {
			g.reply(h, OpRST)
		}
		return
	}
	g.mu.Unlock()
	s.handle(h, payload)
}

type gstate int

const (
	gConnecting gstate = iota
	gEstablished
	gClosed
)

// gsock is one guest-side stream socket.
type gsock struct {
	g             *guest
	local, remote uint32

	mu              sync.Mutex
	cond            *sync.Cond
	state           gstate
	refused         bool
	reset           bool
	peerShut        uint32
	rbuf            []byte
	rxCnt, fwdCnt   uint32
	lastFwdSent     uint32
	peerBufAlloc    uint32
	peerFwdCnt      uint32
	txCnt           uint32
	creditRequested bool
	creditWaits     int
	creditRequests  int
	creditOwed      bool // lazyCredit: a CREDIT_REQUEST awaits freed space
}

func (g *guest) newSockLocked(key gkey) *gsock {
	s := &gsock{g: g, local: key.local, remote: key.remote}
	s.cond = sync.NewCond(&s.mu)
	g.socks[key] = s
	return s
}

func (s *gsock) broadcast() {
	s.mu.Lock()
	s.cond.Broadcast()
	s.mu.Unlock()
}

func (s *gsock) forget() {
	s.g.mu.Lock()
	if s.g.socks[gkey{s.local, s.remote}] == s {
		delete(s.g.socks, gkey{s.local, s.remote})
	}
	s.g.mu.Unlock()
}

// header builds a packet header for s; s.mu is held.
func (s *gsock) header(op Op, flags uint32) Header {
	s.lastFwdSent = s.fwdCnt
	return Header{
		SrcCID: s.g.opts.cid, DstCID: HostCID, SrcPort: s.local, DstPort: s.remote,
		Type: TypeStream, Op: op, Flags: flags, BufAlloc: s.g.opts.bufAlloc, FwdCnt: s.fwdCnt,
	}
}

func (s *gsock) sendCtrl(op Op, flags uint32) error {
	s.mu.Lock()
	h := s.header(op, flags)
	s.mu.Unlock()
	return s.g.sendRaw(h, nil)
}

func (s *gsock) handle(h *Header, payload []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.cond.Broadcast()
	s.peerBufAlloc, s.peerFwdCnt = h.BufAlloc, h.FwdCnt
	switch h.Op {
	case OpResponse:
		if s.state != gConnecting {
			s.g.violation("%v: RESPONSE on an established socket", h)
		}
		s.state = gEstablished
	case OpRST:
		if s.state == gConnecting {
			s.refused = true
		}
		s.reset = true
		s.state = gClosed
		s.g.goAsync(s.forget)
	case OpShutdown:
		s.peerShut |= h.Flags
		if s.peerShut == shutdownBoth {
			hdr := s.header(OpRST, 0)
			s.state = gClosed
			s.g.goAsync(func() {
				s.forget()
				s.g.sendRaw(hdr, nil)
			})
		}
	case OpRW:
		if s.state != gEstablished {
			s.g.violation("%v: data on a socket that is not established", h)
		}
		if s.peerShut&ShutdownSend != 0 {
			s.g.violation("%v: data after SHUTDOWN(SEND)", h)
		}
		if len(s.rbuf)+len(payload) > int(s.g.opts.bufAlloc) {
			s.g.violation("%v: device exceeded the guest's credit: %d buffered of %d", h, len(s.rbuf), s.g.opts.bufAlloc)
		}
		s.rbuf = append(s.rbuf, payload...)
		s.rxCnt += uint32(len(payload))
		s.g.bytesSeen.Add(int64(len(payload)))
	case OpCreditRequest:
		s.creditRequests++
		s.creditOwed = true
		hdr := s.header(OpCreditUpdate, 0)
		s.g.goAsync(func() { s.g.sendRaw(hdr, nil) })
	case OpCreditUpdate:
	case OpRequest:
		s.g.violation("%v: REQUEST on an open socket", h)
	}
}

func (s *gsock) credit() int {
	limit := s.peerBufAlloc
	if s.g.opts.capCredit {
		limit = min(limit, s.g.opts.bufAlloc)
	}
	inflight := s.txCnt - s.peerFwdCnt
	if inflight >= limit {
		return 0
	}
	return int(limit - inflight)
}

var errGuestReset = errors.New("guest socket: connection reset")

// wait blocks on the socket's condition; it fails once the guest stops.
func (s *gsock) wait() error {
	if err := s.g.ctx.Err(); err != nil {
		return err
	}
	s.cond.Wait()
	return nil
}

// Write sends p as RW packets within the host's credit.
func (s *gsock) Write(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		s.mu.Lock()
		for s.credit() == 0 && !s.reset && s.peerShut&ShutdownRcv == 0 {
			s.creditWaits++
			if err := s.wait(); err != nil {
				s.mu.Unlock()
				return n, err
			}
		}
		if s.reset || s.peerShut&ShutdownRcv != 0 {
			s.mu.Unlock()
			return n, errGuestReset
		}
		k := min(len(p)-n, s.credit(), MaxPayload)
		h := s.header(OpRW, 0)
		h.Len = uint32(k)
		s.txCnt += uint32(k)
		s.mu.Unlock()
		if err := s.g.sendRaw(h, p[n:n+k]); err != nil {
			return n, err
		}
		n += k
	}
	return n, nil
}

// Read reads received data; io.EOF after the host shut down sending.
func (s *gsock) Read(p []byte) (int, error) {
	s.mu.Lock()
	for len(s.rbuf) == 0 && s.peerShut&ShutdownSend == 0 && !s.reset {
		if err := s.wait(); err != nil {
			s.mu.Unlock()
			return 0, err
		}
	}
	if len(s.rbuf) == 0 {
		reset := s.reset && s.peerShut&ShutdownSend == 0
		s.mu.Unlock()
		if reset {
			return 0, errGuestReset
		}
		return 0, io.EOF
	}
	n := copy(p, s.rbuf)
	s.rbuf = s.rbuf[n:]
	if len(s.rbuf) == 0 {
		s.rbuf = nil
	}
	s.fwdCnt += uint32(n)
	var update *Header
	believed := s.g.opts.bufAlloc - (s.rxCnt - s.lastFwdSent)
	if s.state == gEstablished && (s.creditOwed || !s.g.opts.lazyCredit && believed < s.g.opts.bufAlloc/2) {
		s.creditOwed = false
		h := s.header(OpCreditUpdate, 0)
		update = &h
	}
	s.mu.Unlock()
	if update != nil {
		s.g.sendRaw(*update, nil)
	}
	return n, nil
}

// CloseWrite sends SHUTDOWN(SEND).
func (s *gsock) CloseWrite() error { return s.sendCtrl(OpShutdown, ShutdownSend) }

// Close sends SHUTDOWN(both) and waits for the host's RST, as Linux does.
func (s *gsock) Close() error {
	s.mu.Lock()
	if s.state == gClosed {
		s.mu.Unlock()
		return nil
	}
	h := s.header(OpShutdown, shutdownBoth)
	s.mu.Unlock()
	if err := s.g.sendRaw(h, nil); err != nil {
		return err
	}
	return s.waitFor(func() bool { return s.reset || s.state == gClosed }, 5*time.Second)
}

// waitFor waits until cond (evaluated with s.mu held) holds.
func (s *gsock) waitFor(cond func() bool, timeout time.Duration) error {
	t := time.AfterFunc(timeout, s.broadcast)
	defer t.Stop()
	deadline := time.Now().Add(timeout)
	s.mu.Lock()
	defer s.mu.Unlock()
	for !cond() {
		if time.Now().After(deadline) {
			return errors.New("guest socket: timed out")
		}
		if err := s.wait(); err != nil {
			return err
		}
	}
	return nil
}

// Dial connects from a fresh guest port to host port.
func (g *guest) Dial(port uint32) (*gsock, error) {
	g.mu.Lock()
	key := gkey{local: g.nextPort, remote: port}
	g.nextPort++
	s := g.newSockLocked(key)
	g.mu.Unlock()
	if err := s.sendCtrl(OpRequest, 0); err != nil {
		return nil, err
	}
	if err := s.waitFor(func() bool { return s.state != gConnecting }, 10*time.Second); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.refused {
		return nil, fmt.Errorf("guest: connect to host port %d: refused", port)
	}
	return s, nil
}

// Listen accepts host connections to guest port.
func (g *guest) Listen(port uint32) <-chan *gsock {
	ch := make(chan *gsock, 128)
	g.mu.Lock()
	g.listeners[port] = ch
	g.mu.Unlock()
	return ch
}
