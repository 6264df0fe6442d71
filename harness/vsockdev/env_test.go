package vsockdev

import (
	"context"
	"errors"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/vhostuser"
	"github.com/vmharness/vmharness/harness/vhostuser/vhostusertest"
	"github.com/vmharness/vmharness/harness/virtq"
)

// fakeQueue is an in-memory virtqueue: the device side implements
// virtq.Queue, the driver side driverQueue. Chains are plain Go slices.
type fakeQueue struct {
	kick func()

	mu       sync.Mutex
	nextHead uint16
	avail    []*virtq.Chain
	used     chan fakeUsed
	notifies atomic.Int64
	fail     error // returned by Next once set
}

type fakeUsed struct {
	head    uint16
	written []byte
}

func newFakeQueue(kick func()) *fakeQueue {
	return &fakeQueue{kick: kick, used: make(chan fakeUsed, 1<<14)}
}

func (q *fakeQueue) Next() (*virtq.Chain, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.fail != nil {
		return nil, q.fail
	}
	if len(q.avail) == 0 {
		return nil, nil
	}
	c := q.avail[0]
	q.avail = q.avail[1:]
	return c, nil
}

func (q *fakeQueue) Complete(c *virtq.Chain, written uint32) error {
	if int(written) > c.WritableLen() {
		return errors.New("fake queue: written exceeds the writable buffers")
	}
	out := make([]byte, 0, written)
	for _, b := range c.Writable {
		out = append(out, b[:min(len(b), int(written)-len(out))]...)
	}
	q.used <- fakeUsed{head: c.Head, written: out}
	return nil
}

func (q *fakeQueue) Notify() error {
	q.notifies.Add(1)
	return nil
}

func (q *fakeQueue) Add(readable [][]byte, writableLens []int) (uint16, error) {
	c := &virtq.Chain{}
	for _, b := range readable {
		c.Readable = append(c.Readable, append([]byte(nil), b...))
	}
	for _, l := range writableLens {
		c.Writable = append(c.Writable, make([]byte, l))
	}
	q.mu.Lock()
	c.Head = q.nextHead
	q.nextHead++
	q.avail = append(q.avail, c)
	q.mu.Unlock()
	return c.Head, nil
}

func (q *fakeQueue) Kick() error {
	q.kick()
	return nil
}

func (q *fakeQueue) Used(ctx context.Context) (uint16, []byte, error) {
	select {
	case u := <-q.used:
		return u.head, u.written, nil
	case <-ctx.Done():
		return 0, nil, ctx.Err()
	}
}

// env is a started device with a test guest on its queues.
type env struct {
	dev    *Device
	g      *guest
	stop   func()                // stops the device the way the front-end would
	driver *vhostusertest.Driver // nil with the fake queues
}

type backend struct {
	name string
	new  func(t testing.TB, cfg Config, gopts guestOptions) *env
}

// backends are the two ways tests reach the device: through the real
// vhost-user server and test driver (memfd memory, split rings, eventfds)
// and through the in-memory fake queues.
var backends = []backend{
	{"vhostuser", newDriverEnv},
	{"fake", newFakeEnv},
}

func newFakeEnv(t testing.TB, cfg Config, gopts guestOptions) *env {
	if cfg.GuestCID == 0 {
		cfg.GuestCID = 3
	}
	gopts.cid = cfg.GuestCID
	dev := New(cfg)
	rx := newFakeQueue(func() { dev.Kick(rxQueue) })
	tx := newFakeQueue(func() { dev.Kick(txQueue) })
	require.NoError(t, dev.Start(featureVersion1, []virtq.Queue{rx, tx}))
	g := newGuest(t, rx, tx, gopts)
	t.Cleanup(func() {
		dev.Close()
		g.stop()
	})
	return &env{dev: dev, g: g, stop: dev.Stop}
}

func newDriverEnv(t testing.TB, cfg Config, gopts guestOptions) *env {
	if cfg.GuestCID == 0 {
		cfg.GuestCID = 3
	}
	gopts.cid = cfg.GuestCID
	dev := New(cfg)
	sock := filepath.Join(t.TempDir(), "vhost-user.sock")
	srv, err := vhostuser.Listen(sock)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(ctx, dev)
	}()
	// Strict notifications: the guest kicks and takes interrupts only as
	// the device asks, like Linux, so a notification the device fails to
	// request or send stalls a test instead of being polled over.
	d := vhostusertest.NewDriver(t, sock, vhostusertest.Options{QueueSize: 256, StrictNotify: true})
	require.Equal(t, cfg.GuestCID, leUint64(d.Config()), "config space guest_cid")
	g := newGuest(t, d.Queue(rxQueue), d.Queue(txQueue), gopts)
	t.Cleanup(func() {
		dev.Close()
		g.stop()
		cancel()
		srv.Close()
		<-served
		d.Close()
	})
	return &env{dev: dev, g: g, driver: d, stop: func() {
		d.Disconnect()
		// The server stops the device when it notices the hang-up.
		require.Eventually(t, func() bool {
			dev.mu.Lock()
			defer dev.mu.Unlock()
			return dev.worker == nil
		}, 5*time.Second, time.Millisecond)
	}}
}

func leUint64(b []byte) uint64 {
	var v uint64
	for i := len(b) - 1; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

// checkGoroutines fails the test if goroutines started during it are still
// running once it cleans up.
func checkGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			buf := make([]byte, 1<<20)
			t.Errorf("%d goroutines leaked:\n%s", n-before, buf[:runtime.Stack(buf, true)])
		}
	})
}
