package virtq

import (
	"encoding/binary"
	"testing"
	"unsafe"
)

// FuzzDescriptorChain lets the fuzzer write the whole ring area (descriptor
// table, available ring, used ring and the start of the data area) of an
// 8-entry queue, then drains the queue. Whatever the guest wrote, the queue
// must not panic, must hand out only slices inside guest memory, and must
// stay within its descriptor limit.
func FuzzDescriptorChain(f *testing.F) {
	const size = 8
	seed := func(build func(r *testRing)) []byte {
		r, _ := newTestRing(f, size)
		build(r)
		return append([]byte(nil), r.mem[:r.data+64]...)
	}
	f.Add(uint8(0), seed(func(r *testRing) {
		r.setDesc(0, r.gpa(r.data), 16, DescFlagNext, 1)
		r.setDesc(1, r.gpa(r.data+16), 32, DescFlagWrite, 0)
		r.publish(0)
	}))
	f.Add(uint8(1), seed(func(r *testRing) { // indirect
		r.setDesc(3, r.gpa(r.data), 32, DescFlagIndirect, 0)
		putDesc(r.mem[r.data:], r.gpa(r.data+32), 8, DescFlagNext, 1)
		putDesc(r.mem[r.data+16:], r.gpa(r.data+40), 8, DescFlagWrite, 0)
		r.publish(3)
	}))
	f.Add(uint8(2), seed(func(r *testRing) { // loop
		r.setDesc(0, r.gpa(r.data), 1, DescFlagNext, 1)
		r.setDesc(1, r.gpa(r.data), 1, DescFlagNext, 0)
		r.publish(0)
		r.publish(1)
	}))
	f.Add(uint8(3), seed(func(r *testRing) { // wild addresses and indices
		r.setDesc(0, ^uint64(0)-3, 100, DescFlagWrite, 0)
		r.setDesc(1, r.gpa(r.data), 1<<31, 0, 0)
		r.publish(0)
		r.publish(1)
		r.publish(0xffff)
	}))

	f.Fuzz(func(t *testing.T, features uint8, ring []byte) {
		r, m := newTestRing(t, size)
		copy(r.mem, ring)
		lo := uintptr(unsafe.Pointer(&r.mem[0]))
		hi := lo + uintptr(len(r.mem))
		inside := func(b []byte) bool {
			if len(b) == 0 {
				return true
			}
			p := uintptr(unsafe.Pointer(&b[0]))
			return p >= lo && p+uintptr(len(b)) <= hi
		}
		var feat uint64
		if features&1 != 0 {
			feat |= 1 << FeatureIndirectDesc
		}
		if features&2 != 0 {
			feat |= 1 << FeatureEventIdx
		}
		lastAvail := binary.LittleEndian.Uint16(r.mem[r.avail+2:]) - uint16(features>>2)
		q, err := NewSplitQueue(m, QueueConfig{Size: size, Addrs: r.addrs(), Features: feat, LastAvail: lastAvail})
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 2*size; i++ {
			c, err := q.Next()
			if err != nil || c == nil {
				break
			}
			total := 0
			for _, b := range append(append([][]byte(nil), c.Readable...), c.Writable...) {
				if !inside(b) {
					t.Fatalf("chain buffer outside guest memory")
				}
				total += len(b)
			}
			if n := len(c.Readable) + len(c.Writable); n > size*2 {
				t.Fatalf("chain of %d segments from at most %d descriptors", n, size)
			}
			written := uint32(c.WritableLen())
			if written > 0 {
				c.Writable[0][0] = 0xaa
			}
			if err := q.Complete(c, written); err != nil {
				t.Fatal(err)
			}
			_ = q.Notify()
		}
	})
}
