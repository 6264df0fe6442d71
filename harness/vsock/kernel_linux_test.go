package vsock

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// fakeCIDs plays the kernel's VHOST_VSOCK_SET_GUEST_CID: taken CIDs fail
// with EADDRINUSE, fail CIDs with their error, others succeed.
type fakeCIDs struct {
	taken map[uint64]bool
	fail  map[uint64]error
	tried []uint64
	dev   *os.File // the file the ioctl was issued on
}

func (f *fakeCIDs) set(dev *os.File, cid uint64) error {
	f.tried = append(f.tried, cid)
	f.dev = dev
	if err := f.fail[cid]; err != nil {
		return err
	}
	if f.taken[cid] {
		return os.NewSyscallError("ioctl VHOST_VSOCK_SET_GUEST_CID", unix.EADDRINUSE)
	}
	return nil
}

// fakeDeviceNode stands in for /dev/vhost-vsock: openKernelDevice only
// needs it to open read-write.
func fakeDeviceNode(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "vhost-vsock")
	require.NoError(t, os.WriteFile(path, nil, 0o600))
	return path
}

func TestOpenKernelDeviceSkipsTakenCIDs(t *testing.T) {
	fake := &fakeCIDs{taken: map[uint64]bool{3: true, 4: true}}
	dev, cid, release, err := openKernelDevice(fakeDeviceNode(t), fake.set, sequentialCIDs())
	require.NoError(t, err)
	defer dev.Close()
	defer release()

	assert.Equal(t, uint32(5), cid)
	assert.Equal(t, []uint64{3, 4, 5}, fake.tried)
	assert.Same(t, fake.dev, dev, "the file whose CID was set must be the one kept")
	_, err = dev.Stat()
	assert.NoError(t, err, "the device must stay open: closing it gives the CID up")
}

func TestOpenKernelDeviceAbortsOnOtherErrors(t *testing.T) {
	fake := &fakeCIDs{
		taken: map[uint64]bool{3: true},
		fail:  map[uint64]error{4: os.NewSyscallError("ioctl VHOST_VSOCK_SET_GUEST_CID", unix.ENOTTY)},
	}
	path := fakeDeviceNode(t)
	_, _, _, err := openKernelDevice(path, fake.set, sequentialCIDs())
	require.ErrorIs(t, err, unix.ENOTTY)
	assert.ErrorContains(t, err, path+": assigning guest CID 4")
	assert.Equal(t, []uint64{3, 4}, fake.tried, "no CID after a hard error may be tried")
	_, err = fake.dev.Stat()
	assert.ErrorIs(t, err, os.ErrClosed, "the device must be closed on failure")
}

func TestOpenKernelDeviceAllTaken(t *testing.T) {
	var last *os.File
	allTaken := func(dev *os.File, cid uint64) error {
		last = dev
		return unix.EADDRINUSE
	}
	_, _, _, err := openKernelDevice(fakeDeviceNode(t), allTaken, sequentialCIDs())
	require.ErrorContains(t, err, "the 65536 guest CIDs tried are all in use")
	_, err = last.Stat()
	assert.ErrorIs(t, err, os.ErrClosed)
}

func TestOpenKernelDeviceMissing(t *testing.T) {
	_, _, _, err := openKernelDevice(filepath.Join(t.TempDir(), "vhost-vsock"), (&fakeCIDs{}).set, sequentialCIDs())
	require.ErrorIs(t, err, os.ErrNotExist)
}

// fakeAllocator hands out CIDs from a list and records releases.
type fakeAllocator struct {
	cids     []uint32
	err      error
	held     map[uint32]bool
	released []uint32
}

func (a *fakeAllocator) ReserveCID() (uint32, func(), error) {
	if a.err != nil {
		return 0, nil, a.err
	}
	cid := a.cids[0]
	a.cids = a.cids[1:]
	if a.held == nil {
		a.held = make(map[uint32]bool)
	}
	a.held[cid] = true
	return cid, func() {
		delete(a.held, cid)
		a.released = append(a.released, cid)
	}, nil
}

func TestOpenKernelDeviceWithAllocator(t *testing.T) {
	// The registry offers 10; a VM outside the harness holds it, so the
	// kernel refuses and the next reservation, 12, is used.
	alloc := &fakeAllocator{cids: []uint32{10, 12, 13}}
	fake := &fakeCIDs{taken: map[uint64]bool{10: true}}
	tr, err := newKernelWith(Config{RuntimeDir: privateDir(t), KernelDevice: fakeDeviceNode(t), CIDAllocator: alloc, Logf: t.Logf}, fake.set)
	require.NoError(t, err)
	assert.Equal(t, uint32(12), tr.CID())
	assert.Equal(t, []uint64{10, 12}, fake.tried)
	assert.Equal(t, []uint32{10}, alloc.released, "refused candidates are released once a CID is found")
	assert.True(t, alloc.held[12], "the assigned CID stays reserved while the transport lives")

	require.NoError(t, tr.Close())
	assert.Equal(t, []uint32{10, 12}, alloc.released)
	require.NoError(t, tr.Close(), "Close is idempotent")
	assert.Equal(t, []uint32{10, 12}, alloc.released)

	alloc = &fakeAllocator{err: errors.New("registry unreadable")}
	_, err = newKernelWith(Config{RuntimeDir: privateDir(t), KernelDevice: fakeDeviceNode(t), CIDAllocator: alloc}, fake.set)
	require.ErrorContains(t, err, "registry unreadable")
}

func TestKernelTransport(t *testing.T) {
	dir := privateDir(t)
	fake := &fakeCIDs{taken: map[uint64]bool{3: true}}
	tr, err := newKernelWith(Config{RuntimeDir: dir, KernelDevice: fakeDeviceNode(t), Logf: t.Logf}, fake.set)
	require.NoError(t, err)

	assert.Equal(t, KindKernel, tr.Kind())
	assert.Equal(t, uint32(4), tr.CID())
	assert.Equal(t, []string{"-device", "vhost-vsock-pci,guest-cid=4,vhostfd=3"}, tr.QEMUArgs())
	require.Len(t, tr.ExtraFiles(), 1)
	assert.Same(t, fake.dev, tr.ExtraFiles()[0])

	hybrid := tr.HybridSocket()
	assert.Equal(t, filepath.Join(dir, "vsock.sock"), hybrid)
	fi, err := os.Stat(hybrid)
	require.NoError(t, err)
	assert.Equal(t, os.ModeSocket|0o600, fi.Mode()&(os.ModeType|os.ModePerm))

	require.NoError(t, tr.Close())
	_, err = os.Stat(hybrid)
	assert.ErrorIs(t, err, os.ErrNotExist, "Close must remove the hybrid socket")
	_, err = fake.dev.Stat()
	assert.ErrorIs(t, err, os.ErrClosed, "Close must close the device")
}

// TestSetGuestCIDOnWrongDevice issues the real ioctl on a device that is
// not vhost-vsock: the kernel answers ENOTTY, and auto mode passes over
// the kernel backend saying so.
func TestSetGuestCIDOnWrongDevice(t *testing.T) {
	dev, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	require.NoError(t, err)
	defer dev.Close()
	require.ErrorIs(t, setGuestCID(dev, 3), unix.ENOTTY)

	var log logRecorder
	b := backends{
		kernel: newKernel,
		user: func(context.Context, Config) (Transport, error) {
			return &fakeTransport{kind: KindUser, cid: 3}, nil
		},
	}
	tr, err := newTransport(context.Background(), Config{RuntimeDir: privateDir(t), KernelDevice: os.DevNull, Logf: log.logf}, b)
	require.NoError(t, err)
	assert.Equal(t, KindUser, tr.Kind())
	require.Len(t, log.lines, 1)
	assert.Contains(t, log.lines[0], "/dev/null: assigning guest CID 3")
	assert.Contains(t, log.lines[0], "inappropriate ioctl")
}

// A connect the kernel timed out (its own 2 s limit) is tried again while
// ctx lasts; other errors and ctx's end stop at once.
func TestDialRetrying(t *testing.T) {
	timedOut := &net.OpError{Op: "dial", Net: "vsock", Err: os.NewSyscallError("connect", unix.ETIMEDOUT)}
	refused := &net.OpError{Op: "dial", Net: "vsock", Err: os.NewSyscallError("connect", unix.ECONNRESET)}
	tests := []struct {
		name      string
		errs      []error // returned by successive attempts; then success
		ctxLife   time.Duration
		wantCalls int
		wantErr   error
	}{
		{name: "first try", errs: nil, ctxLife: time.Second, wantCalls: 1},
		{name: "timed out twice, then connected", errs: []error{timedOut, timedOut}, ctxLife: time.Second, wantCalls: 3},
		{name: "refused is final", errs: []error{refused, timedOut}, ctxLife: time.Second, wantCalls: 1, wantErr: unix.ECONNRESET},
		{name: "ctx ends while timing out", errs: slices.Repeat([]error{timedOut}, 1000), ctxLife: 50 * time.Millisecond, wantErr: unix.ETIMEDOUT},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), tt.ctxLife)
			defer cancel()
			calls := 0
			server, client := net.Pipe()
			defer server.Close()
			c, err := dialRetrying(ctx, func(context.Context) (net.Conn, error) {
				calls++
				if calls <= len(tt.errs) {
					return nil, tt.errs[calls-1]
				}
				return client, nil
			}, 10*time.Millisecond)
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
				assert.Nil(t, c)
			} else {
				require.NoError(t, err)
				assert.Same(t, client, c)
			}
			if tt.wantCalls > 0 {
				assert.Equal(t, tt.wantCalls, calls)
			}
		})
	}
}
