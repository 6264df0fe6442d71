package virtq

import (
	"errors"
	"fmt"
	"sort"
)

// MemoryRegion is one contiguous piece of guest RAM as the front-end
// describes it in the vhost-user memory table, together with the bytes that
// back it in this process.
type MemoryRegion struct {
	// GuestAddr is the guest physical address of Data[0]. Descriptor
	// addresses are guest physical addresses.
	GuestAddr uint64
	// UserAddr is the front-end's (QEMU's) virtual address of Data[0].
	// Ring addresses set with VHOST_USER_SET_VRING_ADDR are user addresses.
	UserAddr uint64
	// Data is the region's memory, len(Data) bytes long.
	Data []byte
}

// ErrOutOfRange is wrapped by errors for addresses that fall outside guest
// memory (or whose length overflows it).
var ErrOutOfRange = errors.New("address outside guest memory")

// Memory is a guest memory map: a set of non-overlapping regions that
// translates guest physical addresses and front-end user addresses into
// slices of host memory. Every translation is bounds-checked; a Memory is
// immutable and safe for concurrent use until Close.
type Memory struct {
	byGuest []MemoryRegion // sorted by GuestAddr
	byUser  []MemoryRegion // sorted by UserAddr
	release func() error
}

// MaxRegions bounds the number of regions in a Memory; it is the vhost-user
// limit with VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS.
const MaxRegions = 509

// NewMemory validates regions (non-empty, no address overflow, no overlap in
// either address space) and returns a Memory over them. The Memory does not
// own the slices; use MapMemory for regions backed by shared-memory fds.
func NewMemory(regions []MemoryRegion) (*Memory, error) {
	return newMemory(regions, nil)
}

func newMemory(regions []MemoryRegion, release func() error) (*Memory, error) {
	if len(regions) > MaxRegions {
		return nil, fmt.Errorf("guest memory has %d regions, the limit is %d", len(regions), MaxRegions)
	}
	for i, r := range regions {
		size := uint64(len(r.Data))
		if size == 0 {
			return nil, fmt.Errorf("guest memory region %d is empty", i)
		}
		if r.GuestAddr+size-1 < r.GuestAddr {
			return nil, fmt.Errorf("guest memory region %d: guest address %#x + size %#x overflows", i, r.GuestAddr, size)
		}
		if r.UserAddr+size-1 < r.UserAddr {
			return nil, fmt.Errorf("guest memory region %d: user address %#x + size %#x overflows", i, r.UserAddr, size)
		}
	}
	m := &Memory{
		byGuest: append([]MemoryRegion(nil), regions...),
		byUser:  append([]MemoryRegion(nil), regions...),
		release: release,
	}
	sort.Slice(m.byGuest, func(i, j int) bool { return m.byGuest[i].GuestAddr < m.byGuest[j].GuestAddr })
	sort.Slice(m.byUser, func(i, j int) bool { return m.byUser[i].UserAddr < m.byUser[j].UserAddr })
	for i := 1; i < len(regions); i++ {
		prev, cur := m.byGuest[i-1], m.byGuest[i]
		if cur.GuestAddr-prev.GuestAddr < uint64(len(prev.Data)) {
			return nil, fmt.Errorf("guest memory regions overlap at guest address %#x", cur.GuestAddr)
		}
		prev, cur = m.byUser[i-1], m.byUser[i]
		if cur.UserAddr-prev.UserAddr < uint64(len(prev.Data)) {
			return nil, fmt.Errorf("guest memory regions overlap at user address %#x", cur.UserAddr)
		}
	}
	return m, nil
}

// Regions returns the regions sorted by guest address. The caller must not
// modify them.
func (m *Memory) Regions() []MemoryRegion { return m.byGuest }

// Close releases the memory (unmaps it, for MapMemory). Slices obtained from
// the Memory must not be used afterwards.
func (m *Memory) Close() error {
	if m == nil || m.release == nil {
		return nil
	}
	release := m.release
	m.release = nil
	return release()
}

// find returns the region of sorted whose [base, base+len) contains addr.
func find(sorted []MemoryRegion, addr uint64, base func(*MemoryRegion) uint64) (*MemoryRegion, bool) {
	// First region whose base is > addr; the candidate is the one before.
	i := sort.Search(len(sorted), func(i int) bool { return base(&sorted[i]) > addr })
	if i == 0 {
		return nil, false
	}
	r := &sorted[i-1]
	if addr-base(r) >= uint64(len(r.Data)) {
		return nil, false
	}
	return r, true
}

func guestBase(r *MemoryRegion) uint64 { return r.GuestAddr }
func userBase(r *MemoryRegion) uint64  { return r.UserAddr }

// Guest returns the n bytes at guest physical address addr. They must lie in
// one region.
func (m *Memory) Guest(addr, n uint64) ([]byte, error) {
	return m.slice(m.byGuest, addr, n, guestBase, "guest")
}

// User returns the n bytes at front-end user address addr. They must lie in
// one region.
func (m *Memory) User(addr, n uint64) ([]byte, error) {
	return m.slice(m.byUser, addr, n, userBase, "user")
}

func (m *Memory) slice(sorted []MemoryRegion, addr, n uint64, base func(*MemoryRegion) uint64, space string) ([]byte, error) {
	r, ok := find(sorted, addr, base)
	if !ok {
		return nil, fmt.Errorf("%s address %#x: %w", space, addr, ErrOutOfRange)
	}
	off := addr - base(r)
	if n > uint64(len(r.Data))-off {
		return nil, fmt.Errorf("%s address %#x length %#x crosses the end of its region: %w", space, addr, n, ErrOutOfRange)
	}
	return r.Data[off : off+n : off+n], nil
}

// AppendGuest appends to dst the host slices that make up the n bytes at
// guest physical address addr, which may span adjacent regions. A zero n
// appends nothing.
func (m *Memory) AppendGuest(dst [][]byte, addr uint64, n uint32) ([][]byte, error) {
	remaining := uint64(n)
	for remaining > 0 {
		r, ok := find(m.byGuest, addr, guestBase)
		if !ok {
			return dst, fmt.Errorf("guest address %#x: %w", addr, ErrOutOfRange)
		}
		off := addr - r.GuestAddr
		chunk := min(remaining, uint64(len(r.Data))-off)
		dst = append(dst, r.Data[off:off+chunk:off+chunk])
		remaining -= chunk
		next := addr + chunk
		if remaining > 0 && next < addr {
			return dst, fmt.Errorf("guest address %#x + length %#x overflows: %w", addr, n, ErrOutOfRange)
		}
		addr = next
	}
	return dst, nil
}
