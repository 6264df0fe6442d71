package vhostusertest

import (
	"sync"

	"github.com/vmharness/vmharness/harness/virtq"
)

// EchoDevice is a trivial vhost-user Device for tests of the server and
// the Driver: every buffer the driver sends on queue 1 ("tx") comes back in
// the next writable buffer the driver offers on queue 0 ("rx"), truncated to
// fit. Its config space is ConfigSpace.
type EchoDevice struct {
	// ConfigSpace is returned by Config (default: 8 bytes, CID 3 LE).
	ConfigSpace []byte
	// FeatureBits are offered in addition to VIRTIO_F_VERSION_1.
	FeatureBits uint64

	mu      sync.Mutex
	starts  int
	stops   int
	lastErr error
	kick    chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

// Features implements vhostuser.Device.
func (e *EchoDevice) Features() uint64 { return 1<<virtq.FeatureVersion1 | e.FeatureBits }

// Config implements vhostuser.Device.
func (e *EchoDevice) Config() []byte {
	if e.ConfigSpace != nil {
		return e.ConfigSpace
	}
	return []byte{3, 0, 0, 0, 0, 0, 0, 0}
}

// NumQueues implements vhostuser.Device.
func (e *EchoDevice) NumQueues() int { return 2 }

// Start implements vhostuser.Device.
func (e *EchoDevice) Start(features uint64, queues []virtq.Queue) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.starts++
	e.kick = make(chan struct{}, 1)
	e.stop = make(chan struct{})
	e.done = make(chan struct{})
	go e.run(queues[0], queues[1], e.kick, e.stop, e.done)
	return nil
}

// Kick implements vhostuser.Device.
func (e *EchoDevice) Kick(int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.kick == nil {
		return
	}
	select {
	case e.kick <- struct{}{}:
	default:
	}
}

// Stop implements vhostuser.Device.
func (e *EchoDevice) Stop() {
	e.mu.Lock()
	stop, done := e.stop, e.done
	e.kick, e.stop, e.done = nil, nil, nil
	e.stops++
	e.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}

// Counts reports how often the device was started and stopped.
func (e *EchoDevice) Counts() (starts, stops int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.starts, e.stops
}

// Err is the last queue error the device saw (a malformed chain, say); the
// device stops processing its queues after one.
func (e *EchoDevice) Err() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.lastErr
}

func (e *EchoDevice) fail(err error) {
	e.mu.Lock()
	e.lastErr = err
	e.mu.Unlock()
}

func (e *EchoDevice) run(rx, tx virtq.Queue, kick, stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	var pending *virtq.Chain // a tx chain waiting for an rx buffer
	for {
		select {
		case <-stop:
			return
		case <-kick:
		}
		for {
			if pending == nil {
				c, err := tx.Next()
				if err != nil {
					e.fail(err)
					return
				}
				if c == nil {
					break
				}
				pending = c
			}
			r, err := rx.Next()
			if err != nil {
				e.fail(err)
				return
			}
			if r == nil {
				break
			}
			n := copyChain(r.Writable, pending.Readable)
			if err := rx.Complete(r, uint32(n)); err != nil {
				e.fail(err)
				return
			}
			if err := tx.Complete(pending, 0); err != nil {
				e.fail(err)
				return
			}
			pending = nil
		}
		if err := rx.Notify(); err != nil {
			e.fail(err)
		}
		if err := tx.Notify(); err != nil {
			e.fail(err)
		}
	}
}

// copyChain copies the concatenation of src into the buffers of dst and
// returns the bytes copied.
func copyChain(dst, src [][]byte) int {
	n := 0
	di, doff := 0, 0
	for _, s := range src {
		for len(s) > 0 && di < len(dst) {
			c := copy(dst[di][doff:], s)
			s, doff, n = s[c:], doff+c, n+c
			if doff == len(dst[di]) {
				di, doff = di+1, 0
			}
		}
	}
	return n
}
