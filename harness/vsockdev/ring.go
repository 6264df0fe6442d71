package vsockdev

// ring is a fixed-capacity byte FIFO. Its storage is allocated on first
// write and released by free, so idle connections cost no buffer memory.
// It is not synchronised; the owning connection's mutex guards it.
type ring struct {
	size int
	buf  []byte
	head int // index of the first buffered byte
	n    int // buffered bytes
}

func (r *ring) len() int   { return r.n }
func (r *ring) avail() int { return r.size - r.n }

// write appends as much of p as fits and returns how much that was.
func (r *ring) write(p []byte) int {
	if len(p) > r.size-r.n {
		p = p[:r.size-r.n]
	}
	if len(p) == 0 {
		return 0
	}
	if r.buf == nil {
		r.buf = make([]byte, r.size)
	}
	tail := (r.head + r.n) % r.size
	c := copy(r.buf[tail:], p)
	if c < len(p) {
		copy(r.buf, p[c:])
	}
	r.n += len(p)
	return len(p)
}

// peek returns up to n buffered bytes as at most two slices, without
// consuming them.
func (r *ring) peek(n int) (a, b []byte) {
	if n > r.n {
		n = r.n
	}
	if n == 0 {
		return nil, nil
	}
	end := r.head + n
	if end <= r.size {
		return r.buf[r.head:end], nil
	}
	return r.buf[r.head:], r.buf[:end-r.size]
}

// discard consumes n buffered bytes (n <= len()).
func (r *ring) discard(n int) {
	r.n -= n
	if r.n == 0 {
		r.head = 0
		return
	}
	r.head = (r.head + n) % r.size
}

// read consumes up to len(p) bytes into p.
func (r *ring) read(p []byte) int {
	a, b := r.peek(len(p))
	n := copy(p, a)
	n += copy(p[n:], b)
	r.discard(n)
	return n
}

// free drops the buffered bytes and the storage.
func (r *ring) free() {
	r.buf = nil
	r.head, r.n = 0, 0
}
