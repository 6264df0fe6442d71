package vsock

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// DefaultKernelDevice is the kernel's vhost-vsock device node.
const DefaultKernelDevice = "/dev/vhost-vsock"

// maxUnixPath is the longest Unix socket path Linux accepts (sun_path is
// 108 bytes including the terminating NUL).
const maxUnixPath = 107

// CIDAllocator hands out guest CIDs that no other running harness VM uses;
// the VM registry is one. The userspace backend takes its CID from it; the
// kernel backend takes its candidates from it and lets the kernel, which
// also knows VMs outside the harness, have the last word.
type CIDAllocator interface {
	// ReserveCID reserves a CID until release is called.
	ReserveCID() (cid uint32, release func(), err error)
}

// Config configures New.
type Config struct {
	// Mode selects the backend; the zero value means ModeAuto.
	Mode Mode
	// RuntimeDir is the VM's private directory (mode 0700, at most 85
	// bytes long); the transport creates its sockets in it and removes
	// them on Close.
	RuntimeDir string
	// CIDAllocator reserves the guest CID until Close. Without one the
	// kernel backend counts up from 3 and every userspace VM is CID 3,
	// which works (each has its own device) but makes CIDs useless for
	// telling userspace VMs apart.
	CIDAllocator CIDAllocator
	// Logf receives one line saying which backend serves the VM and why,
	// and reports of failures in the transport's background goroutines.
	// Nil discards them.
	Logf func(format string, args ...any)
	// KernelDevice is the vhost-vsock device node; empty means
	// DefaultKernelDevice.
	KernelDevice string
}

// backends builds the two kinds of transport; tests substitute fakes.
type backends struct {
	kernel func(ctx context.Context, cfg Config) (Transport, error)
	user   func(ctx context.Context, cfg Config) (Transport, error)
}

// New creates the vsock transport for one VM, choosing the backend as
// cfg.Mode says. ctx bounds only the setup; the transport lives until Close.
func New(ctx context.Context, cfg Config) (Transport, error) {
	return newTransport(ctx, cfg, backends{kernel: newKernel, user: newUser})
}

func newTransport(ctx context.Context, cfg Config, b backends) (Transport, error) {
	if cfg.Mode == "" {
		cfg.Mode = ModeAuto
	}
	if cfg.KernelDevice == "" {
		cfg.KernelDevice = DefaultKernelDevice
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	if err := checkRuntimeDir(cfg.RuntimeDir); err != nil {
		return nil, err
	}

	switch cfg.Mode {
	case ModeKernel:
		t, err := b.kernel(ctx, cfg)
		if err != nil {
			return nil, fmt.Errorf("vsock: %s=%s but the kernel backend is unusable (unset it to fall back to the userspace backend): %w", EnvMode, ModeKernel, err)
		}
		cfg.Logf("vsock: using kernel vhost-vsock, guest CID %d (%s=%s)", t.CID(), EnvMode, ModeKernel)
		return t, nil
	case ModeUser:
		t, err := b.user(ctx, cfg)
		if err != nil {
			return nil, fmt.Errorf("vsock: userspace backend: %w", err)
		}
		cfg.Logf("vsock: using userspace vhost-user transport, guest CID %d (%s=%s)", t.CID(), EnvMode, ModeUser)
		return t, nil
	case ModeAuto:
		t, kerr := b.kernel(ctx, cfg)
		if kerr == nil {
			cfg.Logf("vsock: using kernel vhost-vsock, guest CID %d", t.CID())
			return t, nil
		}
		t, err := b.user(ctx, cfg)
		if err != nil {
			return nil, fmt.Errorf("vsock: kernel backend unusable (%v), and userspace backend: %w", kerr, err)
		}
		cfg.Logf("vsock: using userspace vhost-user transport, guest CID %d (%s)", t.CID(), kernelUnusableReason(cfg.KernelDevice, kerr))
		return t, nil
	default:
		return nil, fmt.Errorf("vsock: unknown mode %q (want %q, %q or %q)", cfg.Mode, ModeAuto, ModeKernel, ModeUser)
	}
}

// kernelUnusableReason says briefly why auto mode passed over the kernel.
func kernelUnusableReason(device string, err error) string {
	if errors.Is(err, fs.ErrNotExist) {
		return "no " + device
	}
	return err.Error()
}

// checkRuntimeDir verifies the directory the sockets go into: it must be
// private, since anyone who can connect to the hybrid socket can talk to
// the guest, and short enough for every socket path in it.
func checkRuntimeDir(dir string) error {
	if dir == "" {
		return errors.New("vsock: Config.RuntimeDir is empty; it must name the VM's private runtime directory")
	}
	// The longest path is the hybrid socket's per-port sibling.
	longest := filepath.Join(dir, hybridSocketName) + "_4294967295"
	if len(longest) > maxUnixPath {
		return fmt.Errorf("vsock: runtime directory %s is too long for Unix socket paths (%s is %d bytes, the limit is %d); use a shorter directory", dir, longest, len(longest), maxUnixPath)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("vsock: runtime directory: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("vsock: runtime directory %s is not a directory", dir)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("vsock: runtime directory %s has mode %04o; it must be private (0700) because its sockets reach into the guest", dir, perm)
	}
	return nil
}
