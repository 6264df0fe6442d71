package vsock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"
	"unsafe"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

const (
	// vhostVsockSetGuestCID is VHOST_VSOCK_SET_GUEST_CID,
	// _IOW(VHOST_VIRTIO, 0x60, __u64) from <linux/vhost.h>.
	vhostVsockSetGuestCID = 0x4008AF60

	// firstGuestCID is the lowest CID a guest may have: 0 to 2 are the
	// hypervisor, local and host addresses.
	firstGuestCID = 3

	// kernelCIDAttempts bounds the search for a free CID, so a host with
	// every candidate taken fails with a message instead of looping for a
	// very long time.
	kernelCIDAttempts = 1 << 16
)

// setGuestCIDFunc assigns cid to an open vhost-vsock device. It returns an
// error matching unix.EADDRINUSE when another VM holds cid.
type setGuestCIDFunc func(dev *os.File, cid uint64) error

// setGuestCID is the real VHOST_VSOCK_SET_GUEST_CID ioctl.
func setGuestCID(dev *os.File, cid uint64) error {
	rc, err := dev.SyscallConn()
	if err != nil {
		return err
	}
	var errno unix.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, vhostVsockSetGuestCID, uintptr(unsafe.Pointer(&cid)))
	}); err != nil {
		return err
	}
	if errno != 0 {
		return os.NewSyscallError("ioctl VHOST_VSOCK_SET_GUEST_CID", errno)
	}
	return nil
}

// nextCID yields candidate guest CIDs; release gives a candidate up.
type nextCID func() (cid uint32, release func(), err error)

// sequentialCIDs yields firstGuestCID, firstGuestCID+1, ... (nothing to
// release: the kernel is the only arbiter).
func sequentialCIDs() nextCID {
	next := uint32(firstGuestCID)
	return func() (uint32, func(), error) {
		cid := next
		next++
		return cid, func() {}, nil
	}
}

// openKernelDevice opens the vhost-vsock device at path and assigns it the
// first candidate CID no other VM holds. The assignment is the kernel-wide
// reservation: the kernel refuses the CID to anyone else while the returned
// file (or QEMU's copy of it) is open, so there is no window between
// choosing and using it. Candidates the kernel refused are released once a
// CID is found; release gives up the one that was assigned.
func openKernelDevice(path string, setCID setGuestCIDFunc, next nextCID) (*os.File, uint32, func(), error) {
	dev, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, 0, nil, err
	}
	var refused []func()
	// Hold refused candidates until the search ends, so the allocator
	// does not offer the same one again.
	defer func() {
		for _, release := range refused {
			release()
		}
	}()
	for range kernelCIDAttempts {
		cid, release, err := next()
		if err != nil {
			dev.Close()
			return nil, 0, nil, fmt.Errorf("reserving a guest CID: %w", err)
		}
		err = setCID(dev, uint64(cid))
		if err == nil {
			return dev, cid, release, nil
		}
		refused = append(refused, release)
		if !errors.Is(err, unix.EADDRINUSE) {
			dev.Close()
			return nil, 0, nil, fmt.Errorf("%s: assigning guest CID %d: %w", path, cid, err)
		}
	}
	dev.Close()
	return nil, 0, nil, fmt.Errorf("%s: the %d guest CIDs tried are all in use; stop some VMs", path, kernelCIDAttempts)
}

// kernelTransport is a VM's vsock served by the kernel's vhost-vsock: QEMU
// gets the device fd, and host sockets are ordinary AF_VSOCK sockets.
type kernelTransport struct {
	dev        *os.File
	cid        uint32
	releaseCID func()
	hybrid     *hybridServer

	closeOnce sync.Once
	closeErr  error
}

func newKernel(_ context.Context, cfg Config) (Transport, error) {
	return newKernelWith(cfg, setGuestCID)
}

// newKernelWith builds the kernel backend. With a CIDAllocator the
// candidates come from it, so kernel and userspace VMs of the harness never
// share a CID; the kernel still has the last word.
func newKernelWith(cfg Config, setCID setGuestCIDFunc) (Transport, error) {
	next := sequentialCIDs()
	if cfg.CIDAllocator != nil {
		next = cfg.CIDAllocator.ReserveCID
	}
	dev, cid, release, err := openKernelDevice(cfg.KernelDevice, setCID, next)
	if err != nil {
		return nil, err
	}
	t := &kernelTransport{dev: dev, cid: cid, releaseCID: release}
	t.hybrid, err = listenHybrid(filepath.Join(cfg.RuntimeDir, hybridSocketName), t.Dial, cfg.Logf, defaultHybridTimeouts)
	if err != nil {
		dev.Close()
		release()
		return nil, err
	}
	return t, nil
}

func (t *kernelTransport) Kind() Kind  { return KindKernel }
func (t *kernelTransport) CID() uint32 { return t.cid }

func (t *kernelTransport) QEMUArgs() []string {
	return []string{"-device", fmt.Sprintf("vhost-vsock-pci,guest-cid=%d,vhostfd=3", t.cid)}
}

func (t *kernelTransport) ExtraFiles() []*os.File { return []*os.File{t.dev} }

// Listen binds port for every CID, because that is the only way to bind on
// the host, and hands out only connections from this VM. Ports are shared
// by all VMs on the host: pass 0 to get a free one. The listener's Addr is
// a *vsock.Addr naming the port.
func (t *kernelTransport) Listen(port uint32) (net.Listener, error) {
	l, err := vsock.ListenContextID(unix.VMADDR_CID_ANY, port, nil)
	if err != nil {
		return nil, fmt.Errorf("vsock: listening on host port %d: %w", port, err)
	}
	bound := l.Addr().(*vsock.Addr)
	return &guestListener{Listener: l, cid: t.cid, addr: &vsock.Addr{ContextID: HostCID, Port: bound.Port}}, nil
}

func (t *kernelTransport) Dial(ctx context.Context, port uint32) (net.Conn, error) {
	c, err := DialKernel(ctx, t.cid, port)
	if err != nil {
		return nil, fmt.Errorf("vsock: connecting to guest %d port %d: %w", t.cid, port, err)
	}
	return c, nil
}

func (t *kernelTransport) HybridSocket() string { return t.hybrid.path }

// Close stops the hybrid socket, closes the device (the kernel frees the
// CID once QEMU's copy of the fd is gone too) and releases the allocator's
// reservation. Call it after QEMU has exited.
func (t *kernelTransport) Close() error {
	t.closeOnce.Do(func() {
		t.closeErr = errors.Join(t.hybrid.Close(), t.dev.Close())
		t.releaseCID()
	})
	return t.closeErr
}

// guestListener passes on only connections from one guest CID; the others
// (another VM that found the port) are closed.
type guestListener struct {
	net.Listener
	cid  uint32
	addr *vsock.Addr
}

func (l *guestListener) Addr() net.Addr { return l.addr }

func (l *guestListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if a, ok := c.RemoteAddr().(*vsock.Addr); ok && a.ContextID == l.cid {
			return c, nil
		}
		c.Close()
	}
}

// kernelRetryPause separates connect attempts after the kernel's connect
// timeout, so a connect that fails at once with ETIMEDOUT cannot spin.
const kernelRetryPause = 100 * time.Millisecond

// DialKernel connects to port of the guest cid with AF_VSOCK until ctx
// ends. The kernel gives up a vsock connect after its own timeout (2 s,
// SO_VM_SOCKETS_CONNECT_TIMEOUT), whatever ctx allows, and a slow guest
// answers later: in examples/nested-vsock a just-booted nested TCG guest on
// a loaded host missed it once. So a connect that timed out is tried again
// while ctx lasts; any other error (the port refused, no such CID) is
// returned at once.
func DialKernel(ctx context.Context, cid, port uint32) (net.Conn, error) {
	return dialRetrying(ctx, func(ctx context.Context) (net.Conn, error) {
		return vsock.DialContext(ctx, cid, port, nil)
	}, kernelRetryPause)
}

// dialRetrying calls dial until it succeeds, fails with anything but
// ETIMEDOUT, or ctx ends (then the last error is returned).
func dialRetrying(ctx context.Context, dial func(context.Context) (net.Conn, error), pause time.Duration) (net.Conn, error) {
	for {
		c, err := dial(ctx)
		if err == nil || !errors.Is(err, unix.ETIMEDOUT) {
			return c, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(pause):
		}
	}
}
