package vhostusertest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vmharness/vmharness/harness/vhostuser"
	"github.com/vmharness/vmharness/harness/virtq"
)

// Options configure a Driver. The zero value is a vsock-like device: two
// queues of 128 descriptors with 64 KiB buffers, every offered feature
// accepted, an 8-byte config space.
type Options struct {
	// NumQueues is how many queues to set up (default 2).
	NumQueues int
	// QueueSize is the descriptors per queue (default 128).
	QueueSize uint16
	// BufferSize is the guest buffer behind each descriptor (default
	// 64 KiB); Add rejects longer buffers.
	BufferSize int
	// RejectFeatures are virtio feature bits the driver declines even if
	// the back-end offers them (for example 1<<virtq.FeatureEventIdx).
	RejectFeatures uint64
	// ConfigSize is the config-space length GET_CONFIG asks for (default 8).
	ConfigSize int
	// NoEnable leaves the queues disabled (no SET_VRING_ENABLE), so the
	// device does not start.
	NoEnable bool
	// Timeout bounds each request/reply exchange (default 10 s).
	Timeout time.Duration
	// StrictNotify makes the queues notify like Linux's virtio ring does,
	// with no safety net: Kick signals the device only when it asked for
	// it (avail_event with VIRTIO_RING_F_EVENT_IDX, else the used ring's
	// NO_NOTIFY flag), and Used looks at the used ring only on the first
	// call after it returned a chain or after the device signalled the
	// call eventfd, never on a timer. A kick or an interrupt the device
	// failed to ask for or to send then stalls the test, as it would
	// stall a real guest, instead of costing 100 ms.
	StrictNotify bool
}

func (o *Options) defaults() {
	if o.NumQueues == 0 {
		o.NumQueues = 2
	}
	if o.QueueSize == 0 {
		o.QueueSize = 128
	}
	if o.BufferSize == 0 {
		o.BufferSize = 64 << 10
	}
	if o.ConfigSize == 0 {
		o.ConfigSize = 8
	}
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Second
	}
}

// Guest physical and front-end user address layout of the two regions.
const (
	ringsGuestAddr = 0
	dataGuestAddr  = 4 << 30
	// UserAddrOffset is added to a guest physical address to form the
	// front-end user address the Driver announces for it.
	UserAddrOffset = 0x7f00_0000_0000
)

// Driver is a fake front-end plus guest driver connected to a back-end.
type Driver struct {
	t    testing.TB
	opts Options

	conn  *net.UnixConn
	memfd int
	mem   []byte // the whole memfd mapping: rings region, then data region

	ringsSize int // bytes of mem in the rings region
	regions   []vhostuser.MemRegion

	offered       uint64
	features      uint64 // acknowledged, as sent in SET_FEATURES
	protoFeatures uint64
	config        []byte

	queues []*DriverQueue

	closeOnce sync.Once
}

// NewDriver connects to the back-end at socketPath and brings the device up:
// features (VIRTIO_F_VERSION_1 is required), protocol features, owner,
// config, memory table and every queue, enabled. When it returns the
// back-end has acknowledged every step. Failures end the test. The Driver
// is closed by t.Cleanup.
func NewDriver(t testing.TB, socketPath string, opts Options) *Driver {
	t.Helper()
	d, err := Dial(t, socketPath, opts)
	if err != nil {
		t.Fatalf("vhostusertest: %v", err)
	}
	if err := d.Setup(); err != nil {
		t.Fatalf("vhostusertest: set up device: %v", err)
	}
	return d
}

// Dial connects and lays out guest memory, without sending any message;
// call Setup (or send messages yourself) next. It is closed by t.Cleanup.
func Dial(t testing.TB, socketPath string, opts Options) (*Driver, error) {
	opts.defaults()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socketPath, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", socketPath, err)
	}
	d := &Driver{t: t, opts: opts, conn: c, memfd: -1}
	t.Cleanup(d.Close)
	if err := d.layout(); err != nil {
		return nil, err
	}
	return d, nil
}

func alignUp(n, a int) int { return (n + a - 1) &^ (a - 1) }

// layout creates the memfd and places rings, indirect tables and buffers.
func (d *Driver) layout() error {
	const page = 4096
	n := int(d.opts.QueueSize)
	ringBytes := alignUp(16*n, page) + alignUp(6+2*n, page) + alignUp(6+8*n, page)
	tableBytes := alignUp(n*16*n, page) // one indirect table of n entries per head
	d.ringsSize = d.opts.NumQueues * (ringBytes + tableBytes)
	dataSize := d.opts.NumQueues * n * alignUp(d.opts.BufferSize, 64)
	dataSize = alignUp(dataSize, page)
	total := d.ringsSize + dataSize

	fd, err := unix.MemfdCreate("vhostusertest-guest", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("memfd_create: %w", err)
	}
	d.memfd = fd
	if err := unix.Ftruncate(fd, int64(total)); err != nil {
		return fmt.Errorf("size guest memory: %w", err)
	}
	d.mem, err = unix.Mmap(fd, 0, total, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("map guest memory: %w", err)
	}
	d.regions = []vhostuser.MemRegion{
		{GuestAddr: ringsGuestAddr, Size: uint64(d.ringsSize), UserAddr: ringsGuestAddr + UserAddrOffset, MmapOffset: 0},
		{GuestAddr: dataGuestAddr, Size: uint64(dataSize), UserAddr: dataGuestAddr + UserAddrOffset, MmapOffset: uint64(d.ringsSize)},
	}
	off := 0
	for i := 0; i < d.opts.NumQueues; i++ {
		q := &DriverQueue{d: d, index: i, size: d.opts.QueueSize, kick: -1, chains: make([][]uint16, n)}
		q.descOff = off
		q.availOff = q.descOff + alignUp(16*n, page)
		q.usedOff = q.availOff + alignUp(6+2*n, page)
		q.tablesOff = q.usedOff + alignUp(6+8*n, page)
		off = q.tablesOff + tableBytes
		q.desc = d.mem[q.descOff : q.descOff+16*n]
		q.avail = d.mem[q.availOff : q.availOff+6+2*n]
		q.used = d.mem[q.usedOff : q.usedOff+6+8*n]
		q.bufStride = alignUp(d.opts.BufferSize, 64)
		q.bufOff = d.ringsSize + i*n*q.bufStride
		for j := n - 1; j >= 0; j-- {
			q.free = append(q.free, uint16(j))
		}
		d.queues = append(d.queues, q)
	}
	return nil
}

// GuestAddr returns the guest physical address of byte off of the memfd.
func (d *Driver) GuestAddr(off int) uint64 {
	if off < d.ringsSize {
		return ringsGuestAddr + uint64(off)
	}
	return dataGuestAddr + uint64(off-d.ringsSize)
}

// UserAddr returns the front-end user address of byte off of the memfd.
func (d *Driver) UserAddr(off int) uint64 { return d.GuestAddr(off) + UserAddrOffset }

// Memory returns the whole guest memory (rings region, then data region);
// tests may scribble on it.
func (d *Driver) Memory() []byte { return d.mem }

// MemRegions returns the memory table the Driver sends.
func (d *Driver) MemRegions() []vhostuser.MemRegion { return d.regions }

// MemFD is the guest memory's memfd (owned by the Driver).
func (d *Driver) MemFD() int { return d.memfd }

// Setup performs the handshake NewDriver does, in the order QEMU 7.2 uses.
func (d *Driver) Setup() error {
	if err := d.Negotiate(); err != nil {
		return err
	}
	if err := d.SetMemTable(); err != nil {
		return err
	}
	for _, q := range d.queues {
		if err := q.setup(); err != nil {
			return fmt.Errorf("queue %d: %w", q.index, err)
		}
	}
	if d.opts.NoEnable {
		return nil
	}
	for _, q := range d.queues {
		if err := d.ack(vhostuser.SetVringEnable, vhostuser.AppendVringState(nil, uint32(q.index), 1)); err != nil {
			return err
		}
	}
	return nil
}

// Negotiate exchanges features and protocol features, sets the owner and
// reads the config space.
func (d *Driver) Negotiate() error {
	reply, err := d.Request(vhostuser.GetFeatures, nil, nil)
	if err != nil {
		return err
	}
	if len(reply) != 8 {
		return fmt.Errorf("GET_FEATURES reply of %d bytes", len(reply))
	}
	d.offered = binary.LittleEndian.Uint64(reply)
	if d.offered&(1<<virtq.FeatureVersion1) == 0 {
		return fmt.Errorf("back-end features %#x lack VIRTIO_F_VERSION_1", d.offered)
	}
	if d.offered&(1<<vhostuser.FeatureProtocolFeatures) != 0 {
		reply, err := d.Request(vhostuser.GetProtocolFeatures, nil, nil)
		if err != nil {
			return err
		}
		if len(reply) != 8 {
			return fmt.Errorf("GET_PROTOCOL_FEATURES reply of %d bytes", len(reply))
		}
		want := uint64(1<<vhostuser.ProtocolFeatureReplyAck | 1<<vhostuser.ProtocolFeatureConfig)
		d.protoFeatures = binary.LittleEndian.Uint64(reply) & want
		if err := d.Send(vhostuser.SetProtocolFeatures, 0, binary.LittleEndian.AppendUint64(nil, d.protoFeatures), nil); err != nil {
			return err
		}
	}
	if err := d.ack(vhostuser.SetOwner, nil); err != nil {
		return err
	}
	if d.protoFeatures&(1<<vhostuser.ProtocolFeatureConfig) != 0 {
		h := vhostuser.ConfigHeader{Size: uint32(d.opts.ConfigSize)}
		reply, err := d.Request(vhostuser.GetConfig, vhostuser.AppendConfig(nil, h, make([]byte, h.Size)), nil)
		if err != nil {
			return err
		}
		if len(reply) != 12+d.opts.ConfigSize {
			return fmt.Errorf("GET_CONFIG reply of %d bytes, want %d", len(reply), 12+d.opts.ConfigSize)
		}
		d.config = reply[12:]
	}
	d.features = d.offered &^ d.opts.RejectFeatures
	return d.ack(vhostuser.SetFeatures, binary.LittleEndian.AppendUint64(nil, d.features))
}

// SetMemTable sends the memory table with the memfd.
func (d *Driver) SetMemTable() error {
	fds := make([]int, len(d.regions))
	for i := range fds {
		fds[i] = d.memfd
	}
	return d.ack(vhostuser.SetMemTable, vhostuser.AppendMemTable(nil, d.regions), fds...)
}

// Features returns the features the Driver acknowledged (SET_FEATURES).
func (d *Driver) Features() uint64 { return d.features }

// Config returns the config space GET_CONFIG returned.
func (d *Driver) Config() []byte { return d.config }

// Queue returns queue i.
func (d *Driver) Queue(i int) *DriverQueue { return d.queues[i] }

// Send sends one message with flags (the version bit is added) and fds
// passed by SCM_RIGHTS; it does not wait for a reply.
func (d *Driver) Send(req vhostuser.Request, flags uint32, payload []byte, fds []int) error {
	b := vhostuser.AppendHeader(nil, vhostuser.Header{Request: req, Flags: flags | vhostuser.FlagVersion, Size: uint32(len(payload))})
	return d.SendRaw(append(b, payload...), fds)
}

// SendRaw writes b as one message (or anything else) with fds attached.
func (d *Driver) SendRaw(b []byte, fds []int) error {
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	d.conn.SetWriteDeadline(time.Now().Add(d.opts.Timeout))
	if _, _, err := d.conn.WriteMsgUnix(b, oob, nil); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	return nil
}

// Request sends a request that has a reply and returns the reply payload.
func (d *Driver) Request(req vhostuser.Request, payload []byte, fds []int) ([]byte, error) {
	if err := d.Send(req, 0, payload, fds); err != nil {
		return nil, fmt.Errorf("%v: %w", req, err)
	}
	return d.ReadReply(req)
}

// ReadReply reads one reply to req.
func (d *Driver) ReadReply(req vhostuser.Request) ([]byte, error) {
	d.conn.SetReadDeadline(time.Now().Add(d.opts.Timeout))
	var hb [vhostuser.HeaderSize]byte
	if _, err := io.ReadFull(d.conn, hb[:]); err != nil {
		return nil, fmt.Errorf("%v: read reply: %w", req, err)
	}
	r := vhostuser.Request(binary.LittleEndian.Uint32(hb[0:]))
	flags := binary.LittleEndian.Uint32(hb[4:])
	size := binary.LittleEndian.Uint32(hb[8:])
	if r != req || flags&vhostuser.FlagReply == 0 || size > vhostuser.MaxPayload {
		return nil, fmt.Errorf("%v: unexpected reply header %v flags %#x size %d", req, r, flags, size)
	}
	p := make([]byte, size)
	if _, err := io.ReadFull(d.conn, p); err != nil {
		return nil, fmt.Errorf("%v: read reply payload: %w", req, err)
	}
	return p, nil
}

// ack sends a request without a natural reply, with NEED_REPLY when
// REPLY_ACK was negotiated, and checks the acknowledgement.
func (d *Driver) ack(req vhostuser.Request, payload []byte, fds ...int) error {
	if d.protoFeatures&(1<<vhostuser.ProtocolFeatureReplyAck) == 0 {
		return d.Send(req, 0, payload, fds)
	}
	if err := d.Send(req, vhostuser.FlagNeedReply, payload, fds); err != nil {
		return fmt.Errorf("%v: %w", req, err)
	}
	reply, err := d.ReadReply(req)
	if err != nil {
		return err
	}
	if len(reply) != 8 {
		return fmt.Errorf("%v: ack of %d bytes", req, len(reply))
	}
	if status := binary.LittleEndian.Uint64(reply); status != 0 {
		return fmt.Errorf("%v: back-end reported failure %d", req, status)
	}
	return nil
}

// Ack sends req with NEED_REPLY and returns an error if the back-end does
// not acknowledge success (REPLY_ACK must have been negotiated).
func (d *Driver) Ack(req vhostuser.Request, payload []byte, fds ...int) error {
	return d.ack(req, payload, fds...)
}

// StopQueues stops the device the way QEMU does when the guest resets it:
// SET_VRING_ENABLE 0 and GET_VRING_BASE on every queue. It returns each
// queue's base (the next available index the back-end would read).
func (d *Driver) StopQueues() ([]uint16, error) {
	for _, q := range d.queues {
		if err := d.ack(vhostuser.SetVringEnable, vhostuser.AppendVringState(nil, uint32(q.index), 0)); err != nil {
			return nil, err
		}
	}
	bases := make([]uint16, len(d.queues))
	for i, q := range d.queues {
		reply, err := d.Request(vhostuser.GetVringBase, vhostuser.AppendVringState(nil, uint32(q.index), 0), nil)
		if err != nil {
			return nil, err
		}
		if len(reply) != 8 || binary.LittleEndian.Uint32(reply) != uint32(q.index) {
			return nil, fmt.Errorf("GET_VRING_BASE reply %x for queue %d", reply, q.index)
		}
		bases[i] = uint16(binary.LittleEndian.Uint32(reply[4:]))
	}
	return bases, nil
}

// Disconnect closes the connection, as QEMU exiting would. Guest memory
// stays mapped on the Driver's side until Close.
func (d *Driver) Disconnect() {
	_ = d.conn.Close()
}

// Close disconnects and releases the memory and eventfds. Safe to call
// more than once.
func (d *Driver) Close() {
	d.closeOnce.Do(func() {
		_ = d.conn.Close()
		for _, q := range d.queues {
			q.close()
		}
		if d.mem != nil {
			_ = unix.Munmap(d.mem)
			d.mem = nil
		}
		if d.memfd >= 0 {
			_ = unix.Close(d.memfd)
			d.memfd = -1
		}
	})
}

// ErrQueueFull is returned by Add when too few descriptors are free.
var ErrQueueFull = errors.New("vhostusertest: not enough free descriptors")

// DriverQueue is the guest driver's side of one split virtqueue. Its
// methods are safe for concurrent use.
type DriverQueue struct {
	d     *Driver
	index int
	size  uint16

	descOff, availOff, usedOff, tablesOff int
	desc, avail, used                     []byte
	bufOff, bufStride                     int

	kick int
	call *os.File

	mu       sync.Mutex
	free     []uint16
	chains   [][]uint16 // head -> descriptors whose buffers the chain uses
	writable [][]bool
	lens     [][]int // head -> buffer lengths, parallel to writable
	availIdx uint16
	lastUsed uint16
	fence    atomic.Uint32

	// StrictNotify bookkeeping.
	kickedIdx  uint16       // availIdx at the last Kick
	suppressed atomic.Int64 // Kicks the device did not ask for
}

func (q *DriverQueue) setup() error {
	d := q.d
	kick, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("kick eventfd: %w", err)
	}
	q.kick = kick
	call, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("call eventfd: %w", err)
	}
	q.call = os.NewFile(uintptr(call), fmt.Sprintf("queue%d-call", q.index))
	q.writable = make([][]bool, q.size)
	q.lens = make([][]int, q.size)
	idx := uint32(q.index)
	addrs := q.RingAddrs()
	steps := []struct {
		req     vhostuser.Request
		payload []byte
		fds     []int
	}{
		{vhostuser.SetVringNum, vhostuser.AppendVringState(nil, idx, uint32(q.size)), nil},
		{vhostuser.SetVringBase, vhostuser.AppendVringState(nil, idx, 0), nil},
		{vhostuser.SetVringAddr, vhostuser.AppendVringAddr(nil, vhostuser.VringAddr{
			Index: idx, Desc: addrs.Desc, Used: addrs.Used, Avail: addrs.Avail,
		}), nil},
		{vhostuser.SetVringKick, binary.LittleEndian.AppendUint64(nil, uint64(idx)), []int{kick}},
		{vhostuser.SetVringCall, binary.LittleEndian.AppendUint64(nil, uint64(idx)), []int{call}},
	}
	for _, s := range steps {
		if err := d.ack(s.req, s.payload, s.fds...); err != nil {
			return err
		}
	}
	return nil
}

func (q *DriverQueue) close() {
	if q.kick >= 0 {
		_ = unix.Close(q.kick)
		q.kick = -1
	}
	if q.call != nil {
		_ = q.call.Close()
	}
}

// RingAddrs returns the front-end user addresses of the ring's descriptor
// table, available ring and used ring, as SET_VRING_ADDR announces them.
func (q *DriverQueue) RingAddrs() virtq.RingAddresses {
	return virtq.RingAddresses{Desc: q.d.UserAddr(q.descOff), Avail: q.d.UserAddr(q.availOff), Used: q.d.UserAddr(q.usedOff)}
}

// Index is the queue number.
func (q *DriverQueue) Index() int { return q.index }

// Size is the queue size.
func (q *DriverQueue) Size() uint16 { return q.size }

// Free is the number of free descriptors.
func (q *DriverQueue) Free() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.free)
}

func (q *DriverQueue) bufferAt(i uint16) int { return q.bufOff + int(i)*q.bufStride }

// BufferAddr is the guest physical address of descriptor i's buffer.
func (q *DriverQueue) BufferAddr(i uint16) uint64 { return q.d.GuestAddr(q.bufferAt(i)) }

// Add copies readable into guest buffers, reserves writable buffers of the
// given lengths, links them into one chain (readable first) and publishes
// it on the available ring. It does not kick.
func (q *DriverQueue) Add(readable [][]byte, writableLens []int) (uint16, error) {
	return q.add(readable, writableLens, false)
}

// AddIndirect is Add with the chain in an indirect descriptor table
// (VIRTIO_RING_F_INDIRECT_DESC).
func (q *DriverQueue) AddIndirect(readable [][]byte, writableLens []int) (uint16, error) {
	return q.add(readable, writableLens, true)
}

func (q *DriverQueue) add(readable [][]byte, writableLens []int, indirect bool) (uint16, error) {
	n := len(readable) + len(writableLens)
	if n == 0 {
		return 0, errors.New("vhostusertest: empty chain")
	}
	for _, b := range readable {
		if len(b) > q.d.opts.BufferSize {
			return 0, fmt.Errorf("vhostusertest: buffer of %d bytes exceeds BufferSize %d", len(b), q.d.opts.BufferSize)
		}
	}
	for _, l := range writableLens {
		if l < 0 || l > q.d.opts.BufferSize {
			return 0, fmt.Errorf("vhostusertest: writable length %d outside 0..%d", l, q.d.opts.BufferSize)
		}
	}
	need := n
	if indirect {
		need++
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.free) < need {
		return 0, ErrQueueFull
	}
	ids := append([]uint16(nil), q.free[len(q.free)-need:]...)
	q.free = q.free[:len(q.free)-need]
	head := ids[0]
	bufs := ids
	if indirect {
		bufs = ids[1:]
	}
	wr := make([]bool, len(bufs))
	lens := make([]int, len(bufs))
	for i := range bufs {
		wr[i] = i >= len(readable)
		if wr[i] {
			lens[i] = writableLens[i-len(readable)]
		} else {
			lens[i] = len(readable[i])
		}
	}
	entry := func(table []byte, slot int, buf uint16, length int, flags, next uint16) {
		e := table[16*slot:]
		binary.LittleEndian.PutUint64(e[0:], q.BufferAddr(buf))
		binary.LittleEndian.PutUint32(e[8:], uint32(length))
		binary.LittleEndian.PutUint16(e[12:], flags)
		binary.LittleEndian.PutUint16(e[14:], next)
	}
	var table []byte
	if indirect {
		off := q.tablesOff + int(head)*16*int(q.size)
		table = q.d.mem[off : off+16*n]
		binary.LittleEndian.PutUint64(q.desc[16*int(head):], q.d.GuestAddr(off))
		binary.LittleEndian.PutUint32(q.desc[16*int(head)+8:], uint32(16*n))
		binary.LittleEndian.PutUint16(q.desc[16*int(head)+12:], virtq.DescFlagIndirect)
		binary.LittleEndian.PutUint16(q.desc[16*int(head)+14:], 0)
	}
	for i, buf := range bufs {
		var length int
		var flags uint16
		if i < len(readable) {
			length = len(readable[i])
			copy(q.d.mem[q.bufferAt(buf):], readable[i])
		} else {
			length = writableLens[i-len(readable)]
			flags |= virtq.DescFlagWrite
		}
		var next uint16
		if i+1 < len(bufs) {
			flags |= virtq.DescFlagNext
			if indirect {
				next = uint16(i + 1)
			} else {
				next = bufs[i+1]
			}
		}
		if indirect {
			entry(table, i, buf, length, flags, next)
		} else {
			entry(q.desc, int(buf), buf, length, flags, next)
		}
	}
	q.chains[head] = ids
	q.writable[head] = wr
	q.lens[head] = lens
	q.publishLocked(head)
	return head, nil
}

// SetDescriptor writes descriptor i of the descriptor table verbatim (for
// malformed-chain tests). Pair it with Publish.
func (q *DriverQueue) SetDescriptor(i uint16, addr uint64, length uint32, flags, next uint16) {
	e := q.desc[16*int(i%q.size):]
	binary.LittleEndian.PutUint64(e[0:], addr)
	binary.LittleEndian.PutUint32(e[8:], length)
	binary.LittleEndian.PutUint16(e[12:], flags)
	binary.LittleEndian.PutUint16(e[14:], next)
}

// Publish puts head on the available ring without any bookkeeping (for
// malformed-chain tests; Used does not free descriptors of such chains).
func (q *DriverQueue) Publish(head uint16) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.publishLocked(head)
}

// SetAvailIdx stores an arbitrary available index (for tests of bad rings).
func (q *DriverQueue) SetAvailIdx(idx uint16) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.availIdx = idx
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&q.avail[0])), uint32(idx)<<16)
}

func (q *DriverQueue) publishLocked(head uint16) {
	binary.LittleEndian.PutUint16(q.avail[4+2*int(q.availIdx%q.size):], head)
	q.availIdx++
	// Flags (0: interrupts wanted) and the index in one release store.
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&q.avail[0])), uint32(q.availIdx)<<16)
}

// Kick signals the queue's kick eventfd. With Options.StrictNotify it
// does so only if the device asked to be notified of the buffers published
// since the last Kick, the way Linux's virtqueue_kick_prepare decides.
func (q *DriverQueue) Kick() error {
	if q.d.opts.StrictNotify && !q.kickNeeded() {
		q.suppressed.Add(1)
		return nil
	}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], 1)
	if _, err := unix.Write(q.kick, b[:]); err != nil && !errors.Is(err, unix.EAGAIN) {
		return fmt.Errorf("kick queue %d: %w", q.index, err)
	}
	return nil
}

// kickNeeded reports whether the device wants a kick for the buffers
// published since the last Kick (virtio 1.2, 2.7.10).
func (q *DriverQueue) kickNeeded() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	newIdx, oldIdx := q.availIdx, q.kickedIdx
	q.kickedIdx = newIdx
	// The index store must be visible before the device's suppression
	// state is read, or both sides may wait for each other.
	q.fence.Add(1)
	if q.d.features&(1<<virtq.FeatureEventIdx) != 0 {
		event := binary.LittleEndian.Uint16(q.used[4+8*int(q.size):])
		return uint16(newIdx-event-1) < uint16(newIdx-oldIdx)
	}
	return binary.LittleEndian.Uint16(q.used[0:])&virtq.UsedFlagNoNotify == 0
}

// SuppressedKicks counts the Kicks StrictNotify left out because the
// device had not asked for them.
func (q *DriverQueue) SuppressedKicks() int64 { return q.suppressed.Load() }

// Pending reports, without side effects, how many chains the device has
// returned that Used has not yet handed out, and how many published chains
// the device has not returned yet. For diagnosing stalls.
func (q *DriverQueue) Pending() (used, inDevice int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	usedIdx := uint16(atomic.LoadUint32((*uint32)(unsafe.Pointer(&q.used[0]))) >> 16)
	return int(uint16(usedIdx - q.lastUsed)), int(uint16(q.availIdx - usedIdx))
}

// Poll returns the next used chain if there is one, without waiting.
func (q *DriverQueue) Poll() (head uint16, written []byte, ok bool, err error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.pollLocked()
}

func (q *DriverQueue) pollLocked() (uint16, []byte, bool, error) {
	usedWord := (*uint32)(unsafe.Pointer(&q.used[0]))
	usedIdx := uint16(atomic.LoadUint32(usedWord) >> 16)
	if usedIdx == q.lastUsed && q.d.features&(1<<virtq.FeatureEventIdx) != 0 {
		// used_event: interrupt me once the used index passes lastUsed;
		// then look again, the device may have published before seeing it.
		binary.LittleEndian.PutUint16(q.avail[4+2*int(q.size):], q.lastUsed)
		q.fence.Add(1)
		usedIdx = uint16(atomic.LoadUint32(usedWord) >> 16)
	}
	if usedIdx == q.lastUsed {
		return 0, nil, false, nil
	}
	if uint16(usedIdx-q.lastUsed) > q.size {
		return 0, nil, false, fmt.Errorf("queue %d: used index %d is more than %d ahead of %d", q.index, usedIdx, q.size, q.lastUsed)
	}
	e := q.used[4+8*int(q.lastUsed%q.size):]
	id := binary.LittleEndian.Uint32(e[0:])
	length := binary.LittleEndian.Uint32(e[4:])
	q.lastUsed++
	if id >= uint32(q.size) {
		return 0, nil, false, fmt.Errorf("queue %d: used id %d out of range", q.index, id)
	}
	head := uint16(id)
	ids := q.chains[head]
	if ids == nil {
		return head, nil, true, nil // a chain placed with Publish
	}
	written := make([]byte, 0, length)
	bufs := ids
	if len(q.writable[head]) < len(ids) {
		bufs = ids[1:] // indirect: ids[0] is the table's descriptor
	}
	for i, buf := range bufs {
		if !q.writable[head][i] || uint32(len(written)) >= length {
			continue
		}
		take := min(int(length)-len(written), q.lens[head][i])
		off := q.bufferAt(buf)
		written = append(written, q.d.mem[off:off+take]...)
	}
	if uint32(len(written)) != length {
		return head, written, true, fmt.Errorf("queue %d: device reports %d bytes written into %d writable", q.index, length, len(written))
	}
	q.free = append(q.free, ids...)
	q.chains[head], q.writable[head], q.lens[head] = nil, nil, nil
	return head, written, true, nil
}

// Used waits (on the call eventfd) until the device returns a chain and
// returns its head and a copy of the bytes the device wrote into it.
func (q *DriverQueue) Used(ctx context.Context) (head uint16, written []byte, err error) {
	defer q.call.SetReadDeadline(time.Time{})
	var b [8]byte
	// A driver looks at the used ring when it starts and after an
	// interrupt, and goes on until the ring is empty (one chain per call
	// here), so the first look of every call is legitimate.
	look := true
	for {
		if look {
			head, written, ok, err := q.Poll()
			if err != nil || ok {
				return head, written, err
			}
		}
		if err := ctx.Err(); err != nil {
			return 0, nil, fmt.Errorf("queue %d: wait for used buffer: %w", q.index, err)
		}
		// Wake up now and then to notice cancellation.
		deadline := time.Now().Add(100 * time.Millisecond)
		if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
			deadline = dl
		}
		_ = q.call.SetReadDeadline(deadline)
		_, err := q.call.Read(b[:])
		switch {
		case err == nil:
			look = true
		case errors.Is(err, os.ErrDeadlineExceeded):
			// Only a lenient driver peeks at the ring on a timer.
			look = !q.d.opts.StrictNotify
		default:
			return 0, nil, fmt.Errorf("queue %d: read call eventfd: %w", q.index, err)
		}
	}
}
