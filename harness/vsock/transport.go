// Package vsock gives the harness one vsock endpoint per VM: the QEMU
// arguments that add the device, the guest's CID, listeners for connections
// the guest makes to the host and dials to ports in the guest.
//
// Two backends implement Transport: the kernel's vhost-vsock (when
// /dev/vhost-vsock is usable) and an in-process userspace vhost-user-vsock
// device (harness/vsockdev over harness/vhostuser) for hosts without it.
package vsock

import (
	"context"
	"net"
	"os"
)

// HostCID is the CID under which the guest reaches the host.
const HostCID = 2

// Kind names a transport backend.
type Kind string

const (
	KindKernel Kind = "kernel"
	KindUser   Kind = "user"
)

// Transport is one VM's vsock endpoint on the host. It is created before
// QEMU starts and closed after QEMU has exited; Close releases every socket,
// fd and goroutine it owns.
type Transport interface {
	// Kind reports which backend serves this VM.
	Kind() Kind
	// CID is the guest's context ID, unique among the harness's running VMs.
	CID() uint32
	// QEMUArgs returns the arguments that add the vsock device. The VM's
	// RAM must be a shared memfd backend (the harness always uses one).
	QEMUArgs() []string
	// ExtraFiles returns files QEMU must inherit (the kernel backend's
	// vhost fd); QEMUArgs refers to them as fd 3, 4, ... in order.
	ExtraFiles() []*os.File
	// Listen accepts connections the guest makes to host port (CID 2).
	Listen(port uint32) (net.Listener, error)
	// Dial connects to port in the guest.
	Dial(ctx context.Context, port uint32) (net.Conn, error)
	// HybridSocket is the path of the per-VM Unix socket that speaks the
	// "CONNECT <port>\n" / "OK <n>\n" convention, or "" if there is none.
	HybridSocket() string
	Close() error
}
