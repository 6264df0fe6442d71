// Package vsockdev implements the virtio-vsock socket device (stream sockets
// only) for a vhost-user back-end: the guest's CID in the configuration space,
// the rx (device→driver) and tx (driver→device) virtqueues, connection setup
// and teardown, and credit-based flow control in both directions. The event
// queue stays in QEMU.
//
// A Device is a vhostuser.Device. On the host side it looks like a small
// network stack: Listen accepts connections the guest makes to host ports
// (CID 2), Dial connects to ports in the guest, and both hand out net.Conns.
//
// Everything the guest writes is untrusted. Packet headers are copied out of
// guest memory before they are validated; payloads are copied straight into
// bounded per-connection buffers, and a guest that sends more than the credit
// the host granted gets its connection reset. A misbehaving guest can break
// its own connections, never the host process.
package vsockdev

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/vmharness/vmharness/harness/vhostuser"
	"github.com/vmharness/vmharness/harness/virtq"
)

// Defaults for the zero values in Config.
const (
	DefaultBufferSize   = 256 << 10
	DefaultMaxConns     = 512
	DefaultCloseTimeout = 8 * time.Second
)

const (
	featureVersion1 = 1 << 32

	rxQueue = 0 // device→driver, guest-writable buffers
	txQueue = 1 // driver→device

	// sendBufferSize bounds the data a host writer can queue ahead of
	// the guest's credit.
	sendBufferSize = 128 << 10
	listenBacklog  = 128
	// maxPendingRST bounds the RSTs owed for packets that matched no
	// connection; beyond it they are dropped (the guest times out).
	maxPendingRST = 1024
	// Packets handled per queue per round, so neither direction starves
	// the other.
	roundBatch = 256
	// firstEphemeralPort is where host ports for Dial start.
	firstEphemeralPort = 49152
	portAny            = 0xFFFFFFFF
	flushTimeout       = time.Second
)

var (
	// ErrDeviceStopped is the error of connections that were open when the
	// front-end stopped the device (guest reboot, driver reset, QEMU exit).
	// It is a net.ErrClosed: the connection is over, through nobody's fault
	// on this side.
	ErrDeviceStopped = fmt.Errorf("vsock device stopped: the guest's virtio driver or the VM went away: %w", net.ErrClosed)
	// ErrDeviceClosed is returned by operations on a closed Device.
	ErrDeviceClosed = errors.New("vsock device closed")

	errReset = syscall.ECONNRESET
)

// Config configures a Device.
type Config struct {
	// GuestCID is the guest's context ID, exposed in the configuration
	// space. Packets from any other source CID are dropped.
	GuestCID uint64
	// Fallback, if set, serves guest connections to host ports nobody
	// Listens on: the device proxies the connection to the returned
	// net.Conn. A nil Fallback or an error resets the guest's connection.
	// ctx is cancelled when the Device is closed.
	Fallback func(ctx context.Context, port uint32) (net.Conn, error)
	// BufferSize is the receive buffer per connection advertised to the
	// guest as buf_alloc; 0 means DefaultBufferSize.
	BufferSize uint32
	// MaxConns bounds the open connections; guest requests beyond it are
	// reset. 0 means DefaultMaxConns.
	MaxConns int
	// CloseTimeout is how long Close waits for the guest to acknowledge a
	// shutdown before resetting the connection; 0 means DefaultCloseTimeout.
	CloseTimeout time.Duration
	// Logf, if set, receives one line per packet the device dropped or
	// reset and per failed fallback connection.
	Logf func(format string, args ...any)
}

type connKey struct{ host, guest uint32 }

// Device is a virtio-vsock device. Create it with New; it is safe for
// concurrent use.
type Device struct {
	cfg    Config
	ctx    context.Context // cancelled by Close; bounds fallback dials
	cancel context.CancelFunc
	wg     sync.WaitGroup // fallback connection goroutines
	wake   chan struct{}  // capacity 1: "the worker has something to do"

	mu        sync.Mutex
	closed    bool
	failed    error // the queues broke; cleared by Start
	conns     map[connKey]*Conn
	listeners map[uint32]*listener
	nextPort  uint32
	ctrlq     connQueue // connections owing a control packet
	dataq     connQueue // connections with data or a shutdown to send
	rsts      []Header  // RSTs for packets that matched no connection
	worker    *worker   // nil while stopped
	flushed   chan struct{}
}

var _ vhostuser.Device = (*Device)(nil)

// worker is one Start..Stop run of the queue-processing goroutine.
type worker struct {
	rx, tx   virtq.Queue
	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}
}

// New returns a stopped device for the guest cfg.GuestCID.
func New(cfg Config) *Device {
	if cfg.BufferSize == 0 {
		cfg.BufferSize = DefaultBufferSize
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.CloseTimeout <= 0 {
		cfg.CloseTimeout = DefaultCloseTimeout
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Device{
		cfg:       cfg,
		ctx:       ctx,
		cancel:    cancel,
		wake:      make(chan struct{}, 1),
		conns:     make(map[connKey]*Conn),
		listeners: make(map[uint32]*listener),
		nextPort:  firstEphemeralPort,
	}
}

// Features implements vhostuser.Device: VIRTIO_F_VERSION_1 only (no
// SEQPACKET).
func (d *Device) Features() uint64 { return featureVersion1 }

// Config implements vhostuser.Device: the le64 guest_cid.
func (d *Device) Config() []byte {
	return binary.LittleEndian.AppendUint64(nil, d.cfg.GuestCID)
}

// NumQueues implements vhostuser.Device: rx and tx (QEMU keeps the event
// queue).
func (d *Device) NumQueues() int { return 2 }

// Start implements vhostuser.Device. It starts the goroutine that serves the
// queues; connections dialled while the device was stopped are requested
// now.
func (d *Device) Start(features uint64, queues []virtq.Queue) error {
	if len(queues) < 2 || queues[rxQueue] == nil || queues[txQueue] == nil {
		return fmt.Errorf("vsock device: start needs the rx and tx queues, got %d", len(queues))
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrDeviceClosed
	}
	if d.worker != nil {
		return errors.New("vsock device: already started")
	}
	w := &worker{rx: queues[rxQueue], tx: queues[txQueue], stop: make(chan struct{}), done: make(chan struct{})}
	d.worker = w
	d.failed = nil
	go d.run(w)
	d.signal()
	return nil
}

// Kick implements vhostuser.Device.
func (d *Device) Kick(index int) { d.signal() }

// Stop implements vhostuser.Device. It returns once the queue goroutine has
// exited; the connections that were open fail with ErrDeviceStopped.
// Listeners stay open for the next Start.
//
// Concurrent Stops (Close, and the vhost-user server on a disconnect) all
// wait for the goroutine: the server unmaps guest memory as soon as its
// Stop returns, so no Stop may return while the worker can still touch it.
func (d *Device) Stop() {
	d.mu.Lock()
	w := d.worker
	d.mu.Unlock()
	if w == nil {
		return
	}
	w.stopOnce.Do(func() { close(w.stop) })
	<-w.done
	d.mu.Lock()
	if d.worker == w {
		d.worker = nil
	}
	d.mu.Unlock()
	d.failAll(ErrDeviceStopped)
}

// Close resets every connection (delivering the RSTs if the device is
// running and the guest has rx buffers), closes the listeners, stops the
// device and waits for the goroutines serving Fallback connections.
func (d *Device) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	ls := d.listeners
	d.listeners = make(map[uint32]*listener)
	conns := d.snapshotLocked()
	d.mu.Unlock()

	d.cancel()
	for _, l := range ls {
		l.shut()
	}
	for _, c := range conns {
		c.mu.Lock()
		c.resetLocked(ErrDeviceClosed)
		c.mu.Unlock()
	}
	d.waitFlushed(flushTimeout)
	d.Stop()
	d.failAll(ErrDeviceClosed)
	d.wg.Wait()
	return nil
}

// Listen accepts connections the guest makes to port on the host (CID 2).
func (d *Device) Listen(port uint32) (net.Listener, error) {
	addr := Addr{CID: HostCID, Port: port}
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case d.closed:
		return nil, &net.OpError{Op: "listen", Net: network, Addr: addr, Err: ErrDeviceClosed}
	case port == portAny:
		return nil, &net.OpError{Op: "listen", Net: network, Addr: addr, Err: syscall.EINVAL}
	case d.listeners[port] != nil:
		return nil, &net.OpError{Op: "listen", Net: network, Addr: addr, Err: syscall.EADDRINUSE}
	}
	l := &listener{dev: d, addr: addr, accept: make(chan *Conn, listenBacklog), done: make(chan struct{})}
	d.listeners[port] = l
	return l, nil
}

// Dial connects to port in the guest from a free host port. It fails with
// an error wrapping syscall.ECONNREFUSED if the guest resets the request
// (nothing listens there). A Dial made while the device is stopped waits for
// Start (or ctx).
func (d *Device) Dial(ctx context.Context, port uint32) (net.Conn, error) {
	remote := Addr{CID: d.cfg.GuestCID, Port: port}
	opErr := func(err error) error { return &net.OpError{Op: "dial", Net: network, Addr: remote, Err: err} }
	if err := ctx.Err(); err != nil {
		return nil, opErr(err)
	}
	d.mu.Lock()
	switch {
	case d.closed:
		d.mu.Unlock()
		return nil, opErr(ErrDeviceClosed)
	case d.failed != nil:
		err := d.failed
		d.mu.Unlock()
		return nil, opErr(err)
	case len(d.conns) >= d.cfg.MaxConns:
		d.mu.Unlock()
		return nil, opErr(fmt.Errorf("%d connections open: %w", len(d.conns), syscall.EAGAIN))
	}
	host, ok := d.allocPortLocked(port)
	if !ok {
		d.mu.Unlock()
		return nil, opErr(syscall.EADDRNOTAVAIL)
	}
	c := d.newConnLocked(connKey{host: host, guest: port})
	c.state = stateConnecting
	c.needRequest = true
	d.scheduleLocked(c, true)
	d.mu.Unlock()

	select {
	case <-c.connected:
		return c, nil
	case <-c.dead:
	case <-ctx.Done():
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == stateEstablished && c.err == nil && !c.removed {
		return c, nil // connected just as ctx ended
	}
	err := c.err
	if err == nil {
		err = ctx.Err()
		c.resetLocked(err)
	}
	return nil, opErr(err)
}

// newConnLocked registers a connection; d.mu is held.
func (d *Device) newConnLocked(key connKey) *Conn {
	c := &Conn{
		dev:       d,
		key:       key,
		bufAlloc:  d.cfg.BufferSize,
		rbuf:      ring{size: int(d.cfg.BufferSize)},
		sbuf:      ring{size: sendBufferSize},
		connected: make(chan struct{}),
		dead:      make(chan struct{}),
		readable:  make(chan struct{}, 1),
		writable:  make(chan struct{}, 1),
	}
	c.rdl.ch = make(chan struct{})
	c.wdl.ch = make(chan struct{})
	d.conns[key] = c
	return c
}

// allocPortLocked picks a host port for a connection to guest port.
func (d *Device) allocPortLocked(guest uint32) (uint32, bool) {
	for range 1 << 16 {
		p := d.nextPort
		d.nextPort++
		if d.nextPort == portAny {
			d.nextPort = firstEphemeralPort
		}
		if d.listeners[p] == nil && d.conns[connKey{host: p, guest: guest}] == nil {
			return p, true
		}
	}
	return 0, false
}

func (d *Device) snapshotLocked() []*Conn {
	conns := make([]*Conn, 0, len(d.conns))
	for _, c := range d.conns {
		conns = append(conns, c)
	}
	return conns
}

// failAll fails and forgets every connection. The worker is not running.
func (d *Device) failAll(err error) {
	d.mu.Lock()
	conns := d.snapshotLocked()
	clear(d.conns)
	for c := d.ctrlq.pop(); c != nil; c = d.ctrlq.pop() {
		c.inCtrl = false
	}
	for c := d.dataq.pop(); c != nil; c = d.dataq.pop() {
		c.inData = false
	}
	d.rsts = nil
	d.mu.Unlock()
	for _, c := range conns {
		c.fail(err)
	}
}

// signal wakes the worker.
func (d *Device) signal() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// scheduleLocked queues c for the worker; d.mu is held.
func (d *Device) scheduleLocked(c *Conn, ctrl bool) {
	if ctrl {
		if !c.inCtrl {
			c.inCtrl = true
			d.ctrlq.push(c)
		}
	} else if !c.inData {
		c.inData = true
		d.dataq.push(c)
	}
	d.signal()
}

// queueRSTLocked owes the guest an RST for packet h, which matched no
// connection; d.mu is held.
func (d *Device) queueRSTLocked(h *Header) {
	if len(d.rsts) >= maxPendingRST {
		d.logPacket(*h, "dropped the RST for", "%d RSTs already pending", len(d.rsts))
		return
	}
	d.rsts = append(d.rsts, Header{
		SrcCID: HostCID, DstCID: d.cfg.GuestCID,
		SrcPort: h.DstPort, DstPort: h.SrcPort,
		Type: TypeStream, Op: OpRST,
	})
	d.signal()
}

// waitFlushed waits until the control packets queued so far have been
// handed to the guest, the device is stopped, or timeout.
func (d *Device) waitFlushed(timeout time.Duration) {
	d.mu.Lock()
	if d.worker == nil || d.failed != nil || (d.ctrlq.len() == 0 && len(d.rsts) == 0) {
		d.mu.Unlock()
		return
	}
	if d.flushed == nil {
		d.flushed = make(chan struct{})
	}
	ch := d.flushed
	d.signal()
	d.mu.Unlock()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
	}
}

// logPacket logs what the device did with packet h and why. h is a copy so
// that the hot path's headers stay on the stack.
func (d *Device) logPacket(h Header, did, why string, args ...any) {
	if d.cfg.Logf != nil {
		d.cfg.Logf("vsock: %s %v: %s", did, &h, fmt.Sprintf(why, args...))
	}
}

func (d *Device) logf(format string, args ...any) {
	if d.cfg.Logf != nil {
		d.cfg.Logf(format, args...)
	}
}

// connQueue is a FIFO of connections.
type connQueue struct {
	items []*Conn
	head  int
}

func (q *connQueue) len() int { return len(q.items) - q.head }

func (q *connQueue) push(c *Conn) {
	if q.head > 0 && q.head == len(q.items) {
		clear(q.items)
		q.items, q.head = q.items[:0], 0
	}
	q.items = append(q.items, c)
}

func (q *connQueue) pushFront(c *Conn) {
	if q.head > 0 {
		q.head--
		q.items[q.head] = c
		return
	}
	q.items = append(q.items, nil)
	copy(q.items[1:], q.items)
	q.items[0] = c
}

func (q *connQueue) pop() *Conn {
	if q.head == len(q.items) {
		return nil
	}
	c := q.items[q.head]
	q.items[q.head] = nil
	q.head++
	return c
}
