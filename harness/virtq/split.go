package virtq

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"
)

// Virtio feature bits that concern the ring layout (virtio 1.2, section 6).
const (
	FeatureIndirectDesc = 28 // VIRTIO_RING_F_INDIRECT_DESC
	FeatureEventIdx     = 29 // VIRTIO_RING_F_EVENT_IDX
	FeatureVersion1     = 32 // VIRTIO_F_VERSION_1
)

// RingFeatures is the set of ring features SplitQueue implements; a device
// may offer them.
const RingFeatures = 1<<FeatureIndirectDesc | 1<<FeatureEventIdx

// Descriptor flags and ring flags (virtio 1.2, 2.7).
const (
	DescFlagNext     = 1
	DescFlagWrite    = 2
	DescFlagIndirect = 4

	AvailFlagNoInterrupt = 1
	UsedFlagNoNotify     = 1
)

// Sizes of the split ring structures.
const (
	DescSize     = 16
	UsedElemSize = 8
	// MaxQueueSize is the largest split queue the spec allows.
	MaxQueueSize = 32768
)

// RingAddresses locates a split ring's three parts by front-end user address
// (the addresses VHOST_USER_SET_VRING_ADDR carries).
type RingAddresses struct {
	Desc, Avail, Used uint64
}

// ErrBadChain is wrapped by Next's errors for descriptor chains that break
// the virtio rules (loops, out-of-range indices or addresses, bad indirect
// tables). The chain has been consumed; the queue is unusable until reset,
// as virtio prescribes for a driver that violates the ring protocol.
var ErrBadChain = errors.New("malformed descriptor chain")

// SplitQueue is the device side of one virtio split virtqueue in guest
// memory. It implements Queue. Next, Complete and Notify must be called from
// one goroutine at a time (the device's); SetMemory and SetCall may be
// called concurrently with them.
//
// It allocates nothing per chain: chains are recycled per head index.
type SplitQueue struct {
	size     uint16
	addrs    RingAddresses
	indirect bool
	eventIdx bool

	view atomic.Pointer[ringView]
	call atomic.Pointer[os.File]

	lastAvail     uint16
	usedIdx       uint16
	signalledUsed uint16
	pendingSignal bool
	everSignalled bool
	chains        []Chain
	fence         atomic.Uint32
	signalBuf     [8]byte
}

// ringView is the ring translated through one Memory.
type ringView struct {
	mem   *Memory
	desc  []byte
	avail []byte
	used  []byte
}

// QueueConfig describes a split queue to NewSplitQueue.
type QueueConfig struct {
	// Size is the number of descriptors (a power of two, at most 32768).
	Size uint16
	// Addrs are the ring addresses (front-end user addresses).
	Addrs RingAddresses
	// Features are the negotiated virtio features; INDIRECT_DESC and
	// EVENT_IDX change how the ring is used.
	Features uint64
	// LastAvail is the ring's starting available index
	// (VHOST_USER_SET_VRING_BASE). The used index starts at the same value.
	LastAvail uint16
}

// NewSplitQueue translates the ring through mem and returns the queue.
func NewSplitQueue(mem *Memory, cfg QueueConfig) (*SplitQueue, error) {
	if cfg.Size == 0 || cfg.Size > MaxQueueSize || cfg.Size&(cfg.Size-1) != 0 {
		return nil, fmt.Errorf("queue size %d is not a power of two in 1..%d", cfg.Size, MaxQueueSize)
	}
	q := &SplitQueue{
		size:      cfg.Size,
		addrs:     cfg.Addrs,
		indirect:  cfg.Features&(1<<FeatureIndirectDesc) != 0,
		eventIdx:  cfg.Features&(1<<FeatureEventIdx) != 0,
		lastAvail: cfg.LastAvail,
		usedIdx:   cfg.LastAvail,
		chains:    make([]Chain, cfg.Size),
	}
	for i := range q.chains {
		q.chains[i].Head = uint16(i)
	}
	if err := q.SetMemory(mem); err != nil {
		return nil, err
	}
	return q, nil
}

// SetMemory re-translates the ring through a new memory table (the
// front-end sent a new one). Chains handed out earlier keep aliasing the old
// Memory, so the caller keeps it mapped until the device has stopped. To
// move several queues, use SetMemoryAll.
func (q *SplitQueue) SetMemory(mem *Memory) error {
	v, err := q.translate(mem)
	if err != nil {
		return err
	}
	q.view.Store(v)
	return nil
}

// SetMemoryAll moves every non-nil queue in queues to mem, or none of them:
// if mem does not cover some queue's rings, no queue has seen mem when it
// returns (the error names the first such queue by its index in queues), so
// the caller may unmap mem at once. Moving queues one by one instead would
// leave the ones moved before the failure reading a table the caller then
// unmaps, which faults the process.
func SetMemoryAll(mem *Memory, queues []*SplitQueue) error {
	views := make([]*ringView, len(queues))
	for i, q := range queues {
		if q == nil {
			continue
		}
		v, err := q.translate(mem)
		if err != nil {
			return fmt.Errorf("queue %d: %w", i, err)
		}
		views[i] = v
	}
	for i, q := range queues {
		if q != nil {
			q.view.Store(views[i])
		}
	}
	return nil
}

// translate checks that mem holds the whole ring, at the queue's size and
// with virtio's alignment, and returns the ring's view through it.
func (q *SplitQueue) translate(mem *Memory) (*ringView, error) {
	n := uint64(q.size)
	extra := uint64(0)
	if q.eventIdx {
		extra = 2
	}
	desc, err := mem.User(q.addrs.Desc, DescSize*n)
	if err != nil {
		return nil, fmt.Errorf("descriptor table: %w", err)
	}
	avail, err := mem.User(q.addrs.Avail, 4+2*n+extra)
	if err != nil {
		return nil, fmt.Errorf("available ring: %w", err)
	}
	used, err := mem.User(q.addrs.Used, 4+UsedElemSize*n+extra)
	if err != nil {
		return nil, fmt.Errorf("used ring: %w", err)
	}
	// The alignment virtio requires; it also makes the index accesses below
	// single aligned machine words.
	if uintptr(unsafe.Pointer(&desc[0]))%16 != 0 || uintptr(unsafe.Pointer(&avail[0]))%2 != 0 || uintptr(unsafe.Pointer(&used[0]))%4 != 0 {
		return nil, fmt.Errorf("ring addresses %#x/%#x/%#x are not aligned to 16/2/4 bytes", q.addrs.Desc, q.addrs.Avail, q.addrs.Used)
	}
	return &ringView{mem: mem, desc: desc, avail: avail, used: used}, nil
}

// SetCall sets the eventfd Notify signals (nil: none). The caller owns the
// file and may close it after SetCall has replaced it.
func (q *SplitQueue) SetCall(f *os.File) { q.call.Store(f) }

// Size is the queue size.
func (q *SplitQueue) Size() uint16 { return q.size }

// LastAvail is the index of the next available-ring entry the device will
// read (VHOST_USER_GET_VRING_BASE reports it).
func (q *SplitQueue) LastAvail() uint16 { return q.lastAvail }

// UsedIdx is the used-ring index the device will publish next.
func (q *SplitQueue) UsedIdx() uint16 { return q.usedIdx }

// fullFence orders every earlier memory access before every later one, on
// the CPU and in the compiler (a locked read-modify-write on amd64, an
// acquire-release atomic on arm64).
func (q *SplitQueue) fullFence() { q.fence.Add(1) }

// load16 reads the little-endian uint16 at b[off:] (off even, b 2-aligned)
// with one atomic aligned 32-bit load of the word containing it, falling
// back to a plain load behind a fence when that word is not inside b.
func load16(b []byte, off int) uint16 {
	p := uintptr(unsafe.Pointer(&b[off]))
	switch {
	case p%4 == 0 && off+4 <= len(b):
		return uint16(atomic.LoadUint32((*uint32)(unsafe.Pointer(&b[off]))))
	case p%4 == 2 && off >= 2:
		return uint16(atomic.LoadUint32((*uint32)(unsafe.Pointer(&b[off-2]))) >> 16)
	default:
		return binary.LittleEndian.Uint16(b[off:])
	}
}

// Next implements Queue.
func (q *SplitQueue) Next() (*Chain, error) {
	v := q.view.Load()
	availIdx := load16(v.avail, 2)
	if availIdx == q.lastAvail && q.eventIdx {
		// Ask for a kick when the driver adds the next buffer, then look
		// again: the driver may have added one before it saw avail_event.
		binary.LittleEndian.PutUint16(v.used[4+UsedElemSize*int(q.size):], q.lastAvail)
		q.fullFence()
		availIdx = load16(v.avail, 2)
	}
	if availIdx == q.lastAvail {
		return nil, nil
	}
	if pending := availIdx - q.lastAvail; pending > q.size {
		return nil, fmt.Errorf("available index %d is %d entries ahead of %d, more than the queue size %d: %w",
			availIdx, pending, q.lastAvail, q.size, ErrBadChain)
	}
	// Read the ring entry (and the descriptors) only after the index.
	q.fullFence()
	head := binary.LittleEndian.Uint16(v.avail[4+2*int(q.lastAvail%q.size):])
	q.lastAvail++
	if head >= q.size {
		return nil, fmt.Errorf("available ring entry %d: head %d >= queue size %d: %w", q.lastAvail-1, head, q.size, ErrBadChain)
	}
	c := &q.chains[head]
	c.Readable = c.Readable[:0]
	c.Writable = c.Writable[:0]
	if err := q.walk(v, c); err != nil {
		c.Readable, c.Writable = c.Readable[:0], c.Writable[:0]
		return nil, fmt.Errorf("chain at head %d: %w", head, err)
	}
	return c, nil
}

func (q *SplitQueue) walk(v *ringView, c *Chain) error {
	table := v.desc
	tableLen := uint32(q.size)
	idx := uint32(c.Head)
	indirect := false
	limit := uint32(q.size) // total descriptors in the chain, direct and indirect
	count := uint32(0)
	for {
		count++
		if count > limit {
			return fmt.Errorf("longer than %d descriptors (a loop?): %w", limit, ErrBadChain)
		}
		d := table[DescSize*idx : DescSize*idx+DescSize]
		addr := binary.LittleEndian.Uint64(d[0:])
		length := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])

		if flags&DescFlagIndirect != 0 {
			switch {
			case !q.indirect:
				return fmt.Errorf("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC: %w", ErrBadChain)
			case indirect:
				return fmt.Errorf("indirect descriptor inside an indirect table: %w", ErrBadChain)
			case flags&DescFlagNext != 0:
				return fmt.Errorf("indirect descriptor with NEXT set: %w", ErrBadChain)
			case length == 0 || length%DescSize != 0:
				return fmt.Errorf("indirect table length %d is not a positive multiple of %d: %w", length, DescSize, ErrBadChain)
			}
			t, err := v.mem.Guest(addr, uint64(length))
			if err != nil {
				return fmt.Errorf("indirect table: %w: %w", err, ErrBadChain)
			}
			table, tableLen, idx, indirect = t, length/DescSize, 0, true
			continue
		}
		var err error
		if flags&DescFlagWrite != 0 {
			c.Writable, err = v.mem.AppendGuest(c.Writable, addr, length)
		} else {
			if len(c.Writable) > 0 {
				return fmt.Errorf("readable descriptor after a writable one: %w", ErrBadChain)
			}
			c.Readable, err = v.mem.AppendGuest(c.Readable, addr, length)
		}
		if err != nil {
			return fmt.Errorf("descriptor buffer: %w: %w", err, ErrBadChain)
		}
		if flags&DescFlagNext == 0 {
			return nil
		}
		if uint32(next) >= tableLen {
			return fmt.Errorf("next index %d outside a table of %d: %w", next, tableLen, ErrBadChain)
		}
		idx = uint32(next)
	}
}

// Complete implements Queue.
func (q *SplitQueue) Complete(c *Chain, written uint32) error {
	if c == nil || int(c.Head) >= len(q.chains) || c != &q.chains[c.Head] {
		return errors.New("complete: chain does not belong to this queue")
	}
	if uint64(written) > uint64(c.WritableLen()) {
		return fmt.Errorf("complete: %d bytes written into %d writable bytes", written, c.WritableLen())
	}
	v := q.view.Load()
	e := v.used[4+UsedElemSize*int(q.usedIdx%q.size):]
	binary.LittleEndian.PutUint32(e[0:], uint32(c.Head))
	binary.LittleEndian.PutUint32(e[4:], written)
	q.usedIdx++
	// The element must be visible before the index; the atomic store of the
	// flags+idx word (both device-owned, 4-aligned) is a release on every
	// Go platform.
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&v.used[0])), uint32(q.usedIdx)<<16)
	q.pendingSignal = true
	c.Readable, c.Writable = c.Readable[:0], c.Writable[:0]
	return nil
}

// Notify implements Queue.
func (q *SplitQueue) Notify() error {
	if !q.pendingSignal {
		return nil
	}
	v := q.view.Load()
	// The used index store must be visible before we read the driver's
	// suppression state, or both sides may wait for each other.
	q.fullFence()
	if q.eventIdx {
		usedEvent := load16(v.avail, 4+2*int(q.size))
		old := q.signalledUsed
		if q.everSignalled && !needEvent(usedEvent, q.usedIdx, old) {
			q.pendingSignal = false
			q.signalledUsed = q.usedIdx
			return nil
		}
	} else if load16(v.avail, 0)&AvailFlagNoInterrupt != 0 {
		q.pendingSignal = false
		return nil
	}
	q.pendingSignal = false
	q.everSignalled = true
	q.signalledUsed = q.usedIdx
	return q.signal()
}

// needEvent is vring_need_event from the virtio spec: whether moving the
// index from old to new passed event.
func needEvent(event, newIdx, oldIdx uint16) bool {
	return newIdx-event-1 < newIdx-oldIdx
}

func (q *SplitQueue) signal() error {
	binary.LittleEndian.PutUint64(q.signalBuf[:], 1)
	for attempt := 0; attempt < 2; attempt++ {
		f := q.call.Load()
		if f == nil {
			return nil
		}
		_, err := f.Write(q.signalBuf[:])
		if err == nil {
			return nil
		}
		// The front-end replaced the call fd under us; signal the new one.
		if !errors.Is(err, os.ErrClosed) || q.call.Load() == f {
			return fmt.Errorf("signal call eventfd: %w", err)
		}
	}
	return nil
}

var _ Queue = (*SplitQueue)(nil)
