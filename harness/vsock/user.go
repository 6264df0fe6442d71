package vsock

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/mdlayher/vsock"

	"github.com/vmharness/vmharness/harness/vhostuser"
	"github.com/vmharness/vmharness/harness/vsockdev"
)

const (
	// vhostUserSocketName is the socket in RuntimeDir QEMU connects to.
	vhostUserSocketName = "vhost-user.sock"

	// defaultUserCID is the guest CID of a userspace VM without a
	// CIDAllocator. Every VM has its own device, so CIDs need not differ
	// for connections to work.
	defaultUserCID = 3

	// Listen(0) picks the first free port from this range, below the
	// device's ephemeral ports (49152 and up) used by Dial.
	firstAutoPort = 1024
	lastAutoPort  = 49151
)

// userTransport is a VM's vsock served in this process: QEMU's
// vhost-user-vsock-pci device connects to a vhost-user server whose device
// (harness/vsockdev) terminates the guest's vsock connections here.
type userTransport struct {
	cid        uint32
	releaseCID func()
	sockPath   string
	logf       func(string, ...any)

	dev    *vsockdev.Device
	server *vhostuser.Server
	hybrid *hybridServer

	cancel context.CancelFunc // stops Serve
	served chan struct{}      // closed when Serve has returned

	closeOnce sync.Once
	closeErr  error
}

func newUser(_ context.Context, cfg Config) (_ Transport, err error) {
	t := &userTransport{
		cid:        defaultUserCID,
		releaseCID: func() {},
		sockPath:   filepath.Join(cfg.RuntimeDir, vhostUserSocketName),
		logf:       cfg.Logf,
		served:     make(chan struct{}),
	}
	if cfg.CIDAllocator != nil {
		cid, release, err := cfg.CIDAllocator.ReserveCID()
		if err != nil {
			return nil, fmt.Errorf("reserving a guest CID: %w", err)
		}
		t.cid, t.releaseCID = cid, release
	}
	defer func() {
		if err != nil {
			t.releaseCID()
		}
	}()

	hybridPath := filepath.Join(cfg.RuntimeDir, hybridSocketName)
	t.dev = vsockdev.New(vsockdev.Config{
		GuestCID: uint64(t.cid),
		Fallback: hostSocketDialer(hybridPath),
		Logf:     cfg.Logf,
	})

	t.server, err = vhostuser.Listen(t.sockPath)
	if err != nil {
		t.dev.Close()
		return nil, fmt.Errorf("creating vhost-user socket: %w", err)
	}
	t.server.Logger = slog.New(slog.NewTextHandler(logfWriter(cfg.Logf), &slog.HandlerOptions{
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{} // Logf's sink stamps its own time
			}
			return a
		},
	}))

	t.hybrid, err = listenHybrid(hybridPath, t.dev.Dial, cfg.Logf, defaultHybridTimeouts)
	if err != nil {
		t.server.Close()
		t.dev.Close()
		return nil, err
	}

	ctx, cancel := context.WithCancel(context.Background())
	t.cancel = cancel
	go t.serve(ctx)
	return t, nil
}

// serve runs the vhost-user server until Close. An error before Close
// (QEMU sent garbage, say) is reported; the VM's vsock is dead from then on
// and the test will notice its connections failing.
func (t *userTransport) serve(ctx context.Context) {
	defer close(t.served)
	if err := t.server.Serve(ctx, t.dev); err != nil && ctx.Err() == nil {
		t.logf("vsock: vhost-user server on %s stopped: %v", t.sockPath, err)
	}
}

func (t *userTransport) Kind() Kind  { return KindUser }
func (t *userTransport) CID() uint32 { return t.cid }

func (t *userTransport) QEMUArgs() []string {
	return []string{
		// QEMU's option syntax escapes a comma by doubling it.
		"-chardev", "socket,id=vhostvsock,path=" + strings.ReplaceAll(t.sockPath, ",", ",,"),
		"-device", "vhost-user-vsock-pci,chardev=vhostvsock",
	}
}

func (t *userTransport) ExtraFiles() []*os.File { return nil }

// Listen accepts the guest's connections to port; 0 picks a free port. The
// listener's Addr is a *vsock.Addr naming the port.
func (t *userTransport) Listen(port uint32) (net.Listener, error) {
	if port != 0 {
		l, err := t.dev.Listen(port)
		if err != nil {
			return nil, fmt.Errorf("vsock: listening on host port %d: %w", port, err)
		}
		return &hostListener{Listener: l, addr: &vsock.Addr{ContextID: HostCID, Port: port}}, nil
	}
	for p := uint32(firstAutoPort); p <= lastAutoPort; p++ {
		l, err := t.dev.Listen(p)
		if err == nil {
			return &hostListener{Listener: l, addr: &vsock.Addr{ContextID: HostCID, Port: p}}, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) {
			return nil, fmt.Errorf("vsock: listening on host port %d: %w", p, err)
		}
	}
	return nil, fmt.Errorf("vsock: every host port from %d to %d is in use", firstAutoPort, lastAutoPort)
}

// hostListener gives the device's listeners the address type the kernel
// backend's have.
type hostListener struct {
	net.Listener
	addr *vsock.Addr
}

func (l *hostListener) Addr() net.Addr { return l.addr }

func (t *userTransport) Dial(ctx context.Context, port uint32) (net.Conn, error) {
	c, err := t.dev.Dial(ctx, port)
	if err != nil {
		return nil, fmt.Errorf("vsock: connecting to guest %d port %d: %w", t.cid, port, err)
	}
	return c, nil
}

func (t *userTransport) HybridSocket() string { return t.hybrid.path }

// Close stops the hybrid socket and the vhost-user server, closes the
// device (and with it every connection to the guest), removes the sockets
// and releases the CID. It waits for all of the transport's goroutines.
func (t *userTransport) Close() error {
	t.closeOnce.Do(func() {
		// The device goes before the server so that, if QEMU is still
		// connected, the guest is told its connections are reset.
		errs := []error{t.hybrid.Close(), t.dev.Close()}
		t.cancel()
		errs = append(errs, t.server.Close())
		<-t.served
		if err := os.Remove(t.sockPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		t.releaseCID()
		t.closeErr = errors.Join(errs...)
	})
	return t.closeErr
}

// logfWriter turns the lines a slog handler writes into Logf calls.
type logfWriter func(format string, args ...any)

func (w logfWriter) Write(p []byte) (int, error) {
	w("vsock: %s", strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}
