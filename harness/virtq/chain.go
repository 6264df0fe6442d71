// Package virtq implements the device side of virtio split virtqueues over
// guest memory shared by a vhost-user front-end (QEMU).
//
// Everything read from guest memory (ring indices, descriptor addresses and
// lengths, flags) is untrusted: it is bounds-checked against the memory table
// and a malformed ring yields an error, never a panic or an out-of-range
// access.
package virtq

// Chain is one available descriptor chain taken from a queue.
//
// Readable holds the driver-written buffers in chain order (the device reads
// them); Writable holds the device-writable buffers in chain order. The
// slices alias guest memory: they are valid only until the chain is
// completed, and the guest may change them concurrently, so the device copies
// what it parses before validating it.
type Chain struct {
	Head     uint16
	Readable [][]byte
	Writable [][]byte
}

// ReadableLen returns the total length of the readable buffers.
func (c *Chain) ReadableLen() int {
	n := 0
	for _, b := range c.Readable {
		n += len(b)
	}
	return n
}

// WritableLen returns the total length of the writable buffers.
func (c *Chain) WritableLen() int {
	n := 0
	for _, b := range c.Writable {
		n += len(b)
	}
	return n
}

// Queue is the device's view of one started virtqueue. It is what a
// vhost-user device implementation (for example the vsock device) is handed
// by the vhost-user server; tests may substitute a fake.
//
// A Queue is not safe for concurrent use: the device drives each queue from
// one goroutine at a time.
type Queue interface {
	// Next returns the next available chain, or (nil, nil) when the driver
	// has made none available.
	Next() (*Chain, error)
	// Complete returns a chain to the driver through the used ring, with
	// written bytes stored into its writable buffers.
	Complete(c *Chain, written uint32) error
	// Notify signals the driver (the call eventfd) that used buffers are
	// ready, unless the driver suppressed interrupts.
	Notify() error
}
