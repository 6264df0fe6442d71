package virtq

import (
	"encoding/binary"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// testRing is a split ring laid out in one memory region whose guest and
// user addresses differ, as in QEMU.
type testRing struct {
	mem                 []byte
	size                uint16
	desc, avail, used   int // offsets in mem
	data                int // offset of the data area
	guestBase, userBase uint64
	availIdx            uint16
}

const (
	testGuestBase = 0x10000
	testUserBase  = 0x7f0000000000
)

func newTestRing(t testing.TB, size uint16) (*testRing, *Memory) {
	t.Helper()
	n := int(size)
	r := &testRing{size: size, guestBase: testGuestBase, userBase: testUserBase}
	r.desc = 0
	r.avail = 16 * n
	r.used = (r.avail + 6 + 2*n + 3) &^ 3
	r.data = (r.used + 6 + 8*n + 15) &^ 15
	r.mem = make([]byte, r.data+64*1024)
	m, err := NewMemory([]MemoryRegion{{GuestAddr: r.guestBase, UserAddr: r.userBase, Data: r.mem}})
	require.NoError(t, err)
	return r, m
}

func (r *testRing) addrs() RingAddresses {
	return RingAddresses{Desc: r.userBase + uint64(r.desc), Avail: r.userBase + uint64(r.avail), Used: r.userBase + uint64(r.used)}
}

func (r *testRing) gpa(off int) uint64 { return r.guestBase + uint64(off) }

func (r *testRing) setDesc(i int, addr uint64, length uint32, flags, next uint16) {
	putDesc(r.mem[r.desc+16*i:], addr, length, flags, next)
}

func putDesc(b []byte, addr uint64, length uint32, flags, next uint16) {
	binary.LittleEndian.PutUint64(b[0:], addr)
	binary.LittleEndian.PutUint32(b[8:], length)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
}

func (r *testRing) publish(head uint16) {
	binary.LittleEndian.PutUint16(r.mem[r.avail+4+2*int(r.availIdx%r.size):], head)
	r.availIdx++
	binary.LittleEndian.PutUint16(r.mem[r.avail+2:], r.availIdx)
}

func (r *testRing) usedIdx() uint16 { return binary.LittleEndian.Uint16(r.mem[r.used+2:]) }

func (r *testRing) usedElem(i uint16) (id, length uint32) {
	e := r.mem[r.used+4+8*int(i%r.size):]
	return binary.LittleEndian.Uint32(e), binary.LittleEndian.Uint32(e[4:])
}

func TestNewSplitQueueValidation(t *testing.T) {
	r, m := newTestRing(t, 8)
	tests := []struct {
		name    string
		cfg     QueueConfig
		wantErr string
	}{
		{"ok", QueueConfig{Size: 8, Addrs: r.addrs()}, ""},
		{"zero size", QueueConfig{Size: 0, Addrs: r.addrs()}, "power of two"},
		{"not power of two", QueueConfig{Size: 6, Addrs: r.addrs()}, "power of two"},
		{"too big", QueueConfig{Size: 65535, Addrs: r.addrs()}, "power of two"},
		{"desc outside", QueueConfig{Size: 8, Addrs: RingAddresses{Desc: 1, Avail: r.addrs().Avail, Used: r.addrs().Used}}, "descriptor table"},
		{"guest address used as user address", QueueConfig{Size: 8, Addrs: RingAddresses{Desc: r.gpa(r.desc), Avail: r.gpa(r.avail), Used: r.gpa(r.used)}}, "descriptor table"},
		{"used misaligned", QueueConfig{Size: 8, Addrs: RingAddresses{Desc: r.addrs().Desc, Avail: r.addrs().Avail, Used: r.addrs().Used + 2}}, "aligned"},
		{"used past the end", QueueConfig{Size: 8, Addrs: RingAddresses{Desc: r.addrs().Desc, Avail: r.addrs().Avail, Used: r.userBase + uint64(len(r.mem)) - 8}}, "used ring"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewSplitQueue(m, tt.cfg)
			if tt.wantErr == "" {
				require.NoError(t, err)
			} else {
				require.ErrorContains(t, err, tt.wantErr)
			}
		})
	}
}

func TestSplitQueueChains(t *testing.T) {
	type desc struct {
		addrOff int // offset from the data area; -1: use addr verbatim
		addr    uint64
		length  uint32
		flags   uint16
		next    uint16
	}
	tests := []struct {
		name         string
		features     uint64
		descs        []desc
		indirect     []desc // placed in the data area at offset 0x8000
		head         uint16
		wantReadable []int
		wantWritable []int
		wantErr      bool
	}{
		{
			name:         "single readable",
			descs:        []desc{{addrOff: 0, length: 100}},
			wantReadable: []int{100},
		},
		{
			name:         "readable then writable",
			descs:        []desc{{addrOff: 0, length: 44, flags: DescFlagNext, next: 1}, {addrOff: 100, length: 4096, flags: DescFlagWrite}},
			wantReadable: []int{44},
			wantWritable: []int{4096},
		},
		{
			name:         "chain out of order",
			descs:        []desc{{addrOff: 0, length: 1, flags: DescFlagNext, next: 7}, {}, {}, {}, {}, {}, {}, {addrOff: 8, length: 2}},
			wantReadable: []int{1, 2},
		},
		{
			name:         "zero length descriptor skipped",
			descs:        []desc{{addrOff: 0, length: 0, flags: DescFlagNext, next: 1}, {addrOff: 0, length: 5}},
			wantReadable: []int{5},
		},
		{
			name:    "loop",
			descs:   []desc{{addrOff: 0, length: 1, flags: DescFlagNext, next: 1}, {addrOff: 0, length: 1, flags: DescFlagNext, next: 0}},
			wantErr: true,
		},
		{
			name:    "self loop",
			descs:   []desc{{addrOff: 0, length: 1, flags: DescFlagNext, next: 0}},
			wantErr: true,
		},
		{
			name:    "next out of range",
			descs:   []desc{{addrOff: 0, length: 1, flags: DescFlagNext, next: 8}},
			wantErr: true,
		},
		{
			name:    "head out of range",
			descs:   []desc{{addrOff: 0, length: 1}},
			head:    9,
			wantErr: true,
		},
		{
			name:    "buffer outside memory",
			descs:   []desc{{addrOff: -1, addr: 0x100, length: 1}},
			wantErr: true,
		},
		{
			name:    "buffer crosses end of memory",
			descs:   []desc{{addrOff: 64*1024 - 8, length: 16}},
			wantErr: true,
		},
		{
			name:    "buffer length wraps the address space",
			descs:   []desc{{addrOff: -1, addr: ^uint64(0) - 4, length: 16}},
			wantErr: true,
		},
		{
			name:    "readable after writable",
			descs:   []desc{{addrOff: 0, length: 4, flags: DescFlagWrite | DescFlagNext, next: 1}, {addrOff: 8, length: 4}},
			wantErr: true,
		},
		{
			name:    "indirect not negotiated",
			descs:   []desc{{addrOff: 0x8000, length: 32, flags: DescFlagIndirect}},
			wantErr: true,
		},
		{
			name:         "indirect",
			features:     1 << FeatureIndirectDesc,
			descs:        []desc{{addrOff: 0x8000, length: 64, flags: DescFlagIndirect}},
			indirect:     []desc{{addrOff: 0, length: 10, flags: DescFlagNext, next: 2}, {}, {addrOff: 16, length: 20, flags: DescFlagWrite | DescFlagNext, next: 3}, {addrOff: 64, length: 30, flags: DescFlagWrite}},
			wantReadable: []int{10},
			wantWritable: []int{20, 30},
		},
		{
			name:     "indirect loop",
			features: 1 << FeatureIndirectDesc,
			descs:    []desc{{addrOff: 0x8000, length: 32, flags: DescFlagIndirect}},
			indirect: []desc{{addrOff: 0, length: 1, flags: DescFlagNext, next: 1}, {addrOff: 0, length: 1, flags: DescFlagNext, next: 0}},
			wantErr:  true,
		},
		{
			name:     "indirect next outside table",
			features: 1 << FeatureIndirectDesc,
			descs:    []desc{{addrOff: 0x8000, length: 16, flags: DescFlagIndirect}},
			indirect: []desc{{addrOff: 0, length: 1, flags: DescFlagNext, next: 1}},
			wantErr:  true,
		},
		{
			name:     "nested indirect",
			features: 1 << FeatureIndirectDesc,
			descs:    []desc{{addrOff: 0x8000, length: 16, flags: DescFlagIndirect}},
			indirect: []desc{{addrOff: 0x8000, length: 16, flags: DescFlagIndirect}},
			wantErr:  true,
		},
		{
			name:     "indirect length not a multiple of 16",
			features: 1 << FeatureIndirectDesc,
			descs:    []desc{{addrOff: 0x8000, length: 17, flags: DescFlagIndirect}},
			wantErr:  true,
		},
		{
			name:     "indirect with next",
			features: 1 << FeatureIndirectDesc,
			descs:    []desc{{addrOff: 0x8000, length: 16, flags: DescFlagIndirect | DescFlagNext, next: 1}, {addrOff: 0, length: 1}},
			indirect: []desc{{addrOff: 0, length: 1}},
			wantErr:  true,
		},
		{
			name:     "indirect table outside memory",
			features: 1 << FeatureIndirectDesc,
			descs:    []desc{{addrOff: -1, addr: 0x20, length: 16, flags: DescFlagIndirect}},
			wantErr:  true,
		},
		{
			name:     "indirect table longer than the queue",
			features: 1 << FeatureIndirectDesc,
			descs:    []desc{{addrOff: 0x8000, length: 16 * 9, flags: DescFlagIndirect}},
			indirect: []desc{
				{addrOff: 0, length: 1, flags: DescFlagNext, next: 1}, {addrOff: 0, length: 1, flags: DescFlagNext, next: 2},
				{addrOff: 0, length: 1, flags: DescFlagNext, next: 3}, {addrOff: 0, length: 1, flags: DescFlagNext, next: 4},
				{addrOff: 0, length: 1, flags: DescFlagNext, next: 5}, {addrOff: 0, length: 1, flags: DescFlagNext, next: 6},
				{addrOff: 0, length: 1, flags: DescFlagNext, next: 7}, {addrOff: 0, length: 1, flags: DescFlagNext, next: 8},
				{addrOff: 0, length: 1},
			},
			wantErr: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, m := newTestRing(t, 8)
			addr := func(d desc) uint64 {
				if d.addrOff < 0 {
					return d.addr
				}
				return r.gpa(r.data + d.addrOff)
			}
			for i, d := range tt.descs {
				r.setDesc(i, addr(d), d.length, d.flags, d.next)
			}
			for i, d := range tt.indirect {
				putDesc(r.mem[r.data+0x8000+16*i:], addr(d), d.length, d.flags, d.next)
			}
			q, err := NewSplitQueue(m, QueueConfig{Size: 8, Addrs: r.addrs(), Features: tt.features})
			require.NoError(t, err)
			r.publish(tt.head)

			c, err := q.Next()
			if tt.wantErr {
				require.ErrorIs(t, err, ErrBadChain)
				assert.Nil(t, c)
				assert.Equal(t, uint16(1), q.LastAvail(), "the bad chain is consumed")
				return
			}
			require.NoError(t, err)
			require.NotNil(t, c)
			lens := func(bs [][]byte) []int {
				var out []int
				for _, b := range bs {
					out = append(out, len(b))
				}
				return out
			}
			assert.Equal(t, tt.wantReadable, lens(c.Readable))
			assert.Equal(t, tt.wantWritable, lens(c.Writable))

			next, err := q.Next()
			require.NoError(t, err)
			assert.Nil(t, next, "only one chain was published")
		})
	}
}

func TestSplitQueueCompleteAndIndexWraparound(t *testing.T) {
	r, m := newTestRing(t, 4)
	const start = 0xfffe // two steps before the 16-bit indices wrap
	r.availIdx = start
	binary.LittleEndian.PutUint16(r.mem[r.used+2:], start) // the driver's used index
	q, err := NewSplitQueue(m, QueueConfig{Size: 4, Addrs: r.addrs(), LastAvail: start})
	require.NoError(t, err)
	q.usedIdx = start

	for i := 0; i < 10; i++ {
		head := uint16(i % 4)
		r.setDesc(int(head), r.gpa(r.data+64*int(head)), 8, DescFlagWrite, 0)
		r.publish(head)
		c, err := q.Next()
		require.NoError(t, err)
		require.NotNil(t, c, "iteration %d", i)
		require.Equal(t, head, c.Head)
		copy(c.Writable[0], "written!")
		require.NoError(t, q.Complete(c, 8))

		want := uint16(start + i + 1)
		assert.Equal(t, want, r.usedIdx())
		id, length := r.usedElem(want - 1)
		assert.Equal(t, uint32(head), id)
		assert.Equal(t, uint32(8), length)
		assert.Equal(t, "written!", string(r.mem[r.data+64*int(head):][:8]))
	}
	assert.Equal(t, uint16(start+10-0x10000), q.LastAvail())
}

func TestSplitQueueRejectsRunawayAvailIndex(t *testing.T) {
	r, m := newTestRing(t, 4)
	q, err := NewSplitQueue(m, QueueConfig{Size: 4, Addrs: r.addrs()})
	require.NoError(t, err)
	binary.LittleEndian.PutUint16(r.mem[r.avail+2:], 5) // 5 new entries in a 4-entry ring
	_, err = q.Next()
	require.ErrorIs(t, err, ErrBadChain)
}

func TestSplitQueueCompleteValidation(t *testing.T) {
	r, m := newTestRing(t, 4)
	q, err := NewSplitQueue(m, QueueConfig{Size: 4, Addrs: r.addrs()})
	require.NoError(t, err)
	r.setDesc(0, r.gpa(r.data), 8, DescFlagWrite, 0)
	r.publish(0)
	c, err := q.Next()
	require.NoError(t, err)

	require.ErrorContains(t, q.Complete(c, 9), "written into 8")
	require.ErrorContains(t, q.Complete(&Chain{Head: 0}, 0), "does not belong")
	require.ErrorContains(t, q.Complete(nil, 0), "does not belong")
	require.NoError(t, q.Complete(c, 8))
}

// eventfd returns a call eventfd file and a function that reads (and
// resets) its counter.
func eventfd(t *testing.T) (*os.File, func() uint64) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	require.NoError(t, err)
	f := os.NewFile(uintptr(fd), "call")
	t.Cleanup(func() { f.Close() })
	return f, func() uint64 {
		var b [8]byte
		n, err := unix.Read(fd, b[:])
		if err != nil || n != 8 {
			return 0
		}
		return binary.LittleEndian.Uint64(b[:])
	}
}

func TestSplitQueueNotify(t *testing.T) {
	tests := []struct {
		name        string
		features    uint64
		prepare     func(r *testRing)
		completions int
		wantSignal  []bool // per Notify after each completion
	}{
		{
			name:        "plain: signal each time",
			completions: 2,
			wantSignal:  []bool{true, true},
		},
		{
			name:        "plain: NO_INTERRUPT suppresses",
			prepare:     func(r *testRing) { binary.LittleEndian.PutUint16(r.mem[r.avail:], AvailFlagNoInterrupt) },
			completions: 2,
			wantSignal:  []bool{false, false},
		},
		{
			name:     "event idx: signal only when used_event is crossed",
			features: 1 << FeatureEventIdx,
			// used_event = 1: the driver wants an interrupt when the used
			// index moves past 1, i.e. after the second completion.
			prepare:     func(r *testRing) { binary.LittleEndian.PutUint16(r.mem[r.avail+4+2*int(r.size):], 1) },
			completions: 3,
			wantSignal:  []bool{true, true, false},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, m := newTestRing(t, 4)
			if tt.prepare != nil {
				tt.prepare(r)
			}
			q, err := NewSplitQueue(m, QueueConfig{Size: 4, Addrs: r.addrs(), Features: tt.features})
			require.NoError(t, err)
			call, signals := eventfd(t)
			q.SetCall(call)

			require.NoError(t, q.Notify())
			assert.Zero(t, signals(), "nothing completed, nothing to signal")
			for i := 0; i < tt.completions; i++ {
				r.setDesc(i, r.gpa(r.data), 1, 0, 0)
				r.publish(uint16(i))
				c, err := q.Next()
				require.NoError(t, err)
				require.NoError(t, q.Complete(c, 0))
				require.NoError(t, q.Notify())
				assert.Equal(t, tt.wantSignal[i], signals() > 0, "completion %d", i)
			}
		})
	}
}

func TestSplitQueueEventIdxRequestsKicks(t *testing.T) {
	r, m := newTestRing(t, 4)
	q, err := NewSplitQueue(m, QueueConfig{Size: 4, Addrs: r.addrs(), Features: 1 << FeatureEventIdx})
	require.NoError(t, err)
	availEvent := func() uint16 { return binary.LittleEndian.Uint16(r.mem[r.used+4+8*4:]) }

	for i := 0; i < 3; i++ {
		r.setDesc(i, r.gpa(r.data), 1, 0, 0)
		r.publish(uint16(i))
	}
	for i := 0; i < 3; i++ {
		c, err := q.Next()
		require.NoError(t, err)
		require.NotNil(t, c)
	}
	c, err := q.Next()
	require.NoError(t, err)
	require.Nil(t, c)
	assert.Equal(t, uint16(3), availEvent(), "an empty ring asks for a kick at the next entry")
}

func TestSplitQueueSetMemoryKeepsPosition(t *testing.T) {
	r, m := newTestRing(t, 4)
	q, err := NewSplitQueue(m, QueueConfig{Size: 4, Addrs: r.addrs()})
	require.NoError(t, err)
	r.setDesc(0, r.gpa(r.data), 4, 0, 0)
	r.publish(0)
	_, err = q.Next()
	require.NoError(t, err)

	// The same bytes at a different user address: rings are re-translated.
	r.userBase = 0x6000_0000_0000
	m2, err := NewMemory([]MemoryRegion{{GuestAddr: r.guestBase, UserAddr: r.userBase, Data: r.mem}})
	require.NoError(t, err)
	require.ErrorContains(t, q.SetMemory(m2), "descriptor table", "the ring addresses are not in the new table")

	m3, err := NewMemory([]MemoryRegion{{GuestAddr: r.guestBase, UserAddr: testUserBase, Data: r.mem}})
	require.NoError(t, err)
	require.NoError(t, q.SetMemory(m3))
	r.publish(0)
	c, err := q.Next()
	require.NoError(t, err)
	require.NotNil(t, c)
	assert.Equal(t, uint16(2), q.LastAvail())
}

func TestSetMemoryAllIsAllOrNothing(t *testing.T) {
	// Two rings in two regions of one table; the new tables back them with
	// copies, so a chain's buffer shows which table a queue reads.
	r0, _ := newTestRing(t, 4)
	r1, _ := newTestRing(t, 4)
	r1.guestBase, r1.userBase = 0x100000, 0x7f0000100000
	region := func(r *testRing, data []byte) MemoryRegion {
		return MemoryRegion{GuestAddr: r.guestBase, UserAddr: r.userBase, Data: data}
	}
	old, err := NewMemory([]MemoryRegion{region(r0, r0.mem), region(r1, r1.mem)})
	require.NoError(t, err)
	var queues []*SplitQueue
	for _, r := range []*testRing{r0, r1} {
		q, err := NewSplitQueue(old, QueueConfig{Size: 4, Addrs: r.addrs()})
		require.NoError(t, err)
		queues = append(queues, q)
	}
	copy0 := append([]byte(nil), r0.mem...)
	copy1 := append([]byte(nil), r1.mem...)
	copies := [][]byte{copy0, copy1}

	tests := []struct {
		name    string
		regions []MemoryRegion
		wantErr string
		want    [][]byte // the memory each queue's chain must come from
	}{
		{"misses queue 1", []MemoryRegion{region(r0, copy0)}, "queue 1: descriptor table", [][]byte{r0.mem, r1.mem}},
		{"misses queue 1's used ring", []MemoryRegion{region(r0, copy0), region(r1, copy1[:r1.used+4+UsedElemSize*4-1])}, "queue 1: used ring", [][]byte{r0.mem, r1.mem}},
		{"misses queue 0", []MemoryRegion{region(r1, copy1)}, "queue 0: descriptor table", [][]byte{r0.mem, r1.mem}},
		{"covers both", []MemoryRegion{region(r0, copy0), region(r1, copy1)}, "", [][]byte{copy0, copy1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := NewMemory(tt.regions)
			require.NoError(t, err)
			err = SetMemoryAll(m, append(queues, nil)) // nil: a queue not set up
			if tt.wantErr != "" {
				require.ErrorIs(t, err, ErrOutOfRange)
				require.ErrorContains(t, err, tt.wantErr)
			} else {
				require.NoError(t, err)
			}
			for i, r := range []*testRing{r0, r1} {
				// The same chain in the ring and in its copy, so whichever
				// table the queue reads yields it.
				for _, b := range [][]byte{r.mem, copies[i]} {
					putDesc(b[r.desc:], r.gpa(r.data), 4, 0, 0)
					binary.LittleEndian.PutUint16(b[r.avail+4+2*int(r.availIdx%r.size):], 0)
					binary.LittleEndian.PutUint16(b[r.avail+2:], r.availIdx+1)
				}
				r.availIdx++
				c, err := queues[i].Next()
				require.NoError(t, err)
				require.NotNil(t, c)
				require.Len(t, c.Readable, 1)
				assert.Same(t, &tt.want[i][r.data], &c.Readable[0][0], "queue %d reads the wrong table", i)
				require.NoError(t, queues[i].Complete(c, 0))
			}
		})
	}
}

func BenchmarkSplitQueueNextComplete(b *testing.B) {
	r, m := newTestRing(b, 256)
	q, err := NewSplitQueue(m, QueueConfig{Size: 256, Addrs: r.addrs(), Features: 1<<FeatureEventIdx | 1<<FeatureIndirectDesc})
	require.NoError(b, err)
	for i := 0; i < 256; i++ {
		r.setDesc(i, r.gpa(r.data), 44, DescFlagNext, uint16((i+1)%256))
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		head := uint16(i) & 254
		r.setDesc(int(head), r.gpa(r.data), 44, DescFlagNext, head+1)
		r.setDesc(int(head)+1, r.gpa(r.data+64), 4096, 0, 0)
		r.publish(head)
		c, err := q.Next()
		if err != nil || c == nil {
			b.Fatal(c, err)
		}
		if err := q.Complete(c, 0); err != nil {
			b.Fatal(err)
		}
		if err := q.Notify(); err != nil {
			b.Fatal(err)
		}
	}
}
