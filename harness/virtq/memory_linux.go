package virtq

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// SharedRegion describes a region of a vhost-user memory table: Size bytes
// at MmapOffset in the file FD, seen by the guest at GuestAddr and by the
// front-end at UserAddr.
type SharedRegion struct {
	GuestAddr  uint64
	Size       uint64
	UserAddr   uint64
	MmapOffset uint64
	FD         int
}

// MapMemory maps the regions' files shared and read-write and returns the
// Memory over them; Memory.Close unmaps them. MapMemory does not close the
// fds (the mappings stay valid after the caller closes them). A region that
// extends past the end of its file is rejected, because touching it would
// raise SIGBUS.
func MapMemory(regions []SharedRegion) (*Memory, error) {
	if len(regions) > MaxRegions {
		return nil, fmt.Errorf("guest memory has %d regions, the limit is %d", len(regions), MaxRegions)
	}
	var mappings [][]byte
	unmapAll := func() error {
		var errs []error
		for _, b := range mappings {
			if err := unix.Munmap(b); err != nil {
				errs = append(errs, fmt.Errorf("unmap guest memory: %w", err))
			}
		}
		mappings = nil
		return errors.Join(errs...)
	}
	mem := make([]MemoryRegion, 0, len(regions))
	for i, r := range regions {
		if r.Size == 0 {
			_ = unmapAll()
			return nil, fmt.Errorf("guest memory region %d is empty", i)
		}
		end := r.MmapOffset + r.Size
		if end < r.MmapOffset || end > uint64(maxInt) {
			_ = unmapAll()
			return nil, fmt.Errorf("guest memory region %d: mmap offset %#x + size %#x overflows", i, r.MmapOffset, r.Size)
		}
		var st unix.Stat_t
		if err := unix.Fstat(r.FD, &st); err != nil {
			_ = unmapAll()
			return nil, fmt.Errorf("guest memory region %d: stat fd: %w", i, err)
		}
		if st.Size < 0 || uint64(st.Size) < end {
			_ = unmapAll()
			return nil, fmt.Errorf("guest memory region %d: offset %#x + size %#x exceeds its file's %d bytes", i, r.MmapOffset, r.Size, st.Size)
		}
		// mmap needs a page-aligned file offset; map from the start of the
		// page that holds MmapOffset.
		pageOff := r.MmapOffset &^ uint64(unix.Getpagesize()-1)
		b, err := unix.Mmap(r.FD, int64(pageOff), int(end-pageOff), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			_ = unmapAll()
			return nil, fmt.Errorf("guest memory region %d: mmap %#x bytes: %w", i, end-pageOff, err)
		}
		mappings = append(mappings, b)
		skip := r.MmapOffset - pageOff
		mem = append(mem, MemoryRegion{
			GuestAddr: r.GuestAddr,
			UserAddr:  r.UserAddr,
			Data:      b[skip : skip+r.Size : skip+r.Size],
		})
	}
	m, err := newMemory(mem, unmapAll)
	if err != nil {
		_ = unmapAll()
		return nil, err
	}
	return m, nil
}

const maxInt = int(^uint(0) >> 1)
