// Package vsock gives the harness one vsock endpoint per VM: the QEMU
// arguments that add the device, the guest's CID, listeners for connections
// the guest makes to the host and dials to ports in the guest.
//
// Two backends implement Transport: the kernel's vhost-vsock (when
// /dev/vhost-vsock is usable) and an in-process userspace vhost-user-vsock
// device (harness/vsockdev over harness/vhostuser) for hosts without it.
// New picks one as Config.Mode (VMHARNESS_VSOCK, see ParseMode) says and
// logs which and why.
//
// # Kernel backend
//
// New opens /dev/vhost-vsock and assigns it a guest CID with
// VHOST_VSOCK_SET_GUEST_CID: the candidates come from Config.CIDAllocator
// (or count up from 3 without one), and a CID the kernel refuses with
// EADDRINUSE because another VM holds it is skipped. The kernel's
// assignment is the reservation, so there is no race window. QEMU inherits
// the device fd (ExtraFiles, fd 3). Host sockets are ordinary AF_VSOCK sockets, so host
// ports are shared by every VM on the host: Listen(0) picks a free one.
//
// # Userspace backend
//
// The transport serves RuntimeDir/vhost-user.sock, which QEMU's
// vhost-user-vsock-pci device connects to, and terminates the guest's vsock
// connections in this process. Host ports are private to the VM. The CID
// comes from Config.CIDAllocator; it names the VM but does not route.
//
// # Hybrid socket
//
// Both backends serve RuntimeDir/vsock.sock (mode 0600), the Unix socket
// convention of Firecracker and cloud-hypervisor that systemd's ssh proxy
// speaks as vsock-mux/PATH:
//
//   - A host program connects and writes "CONNECT <port>\n" (the verb in any
//     case, at most 32 bytes, within 5 s). The transport connects to that
//     port in the guest, answers "OK <host port>\n" and relays bytes both
//     ways; a half-close (shutdown of one direction) is passed on. A
//     malformed or late request, or a port the guest refuses, gets no
//     answer: the connection is just closed.
//   - With the userspace backend, a guest connection to a host port nobody
//     Listens on goes to the Unix socket "RuntimeDir/vsock.sock_<port>" if
//     something listens there, and is reset otherwise. (With the kernel
//     backend such connections are the host kernel's business.)
package vsock

import (
	"context"
	"fmt"
	"net"
	"os"

	"github.com/mdlayher/vsock"
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
	// Port 0 picks a free port; the listener's Addr is a
	// *github.com/mdlayher/vsock.Addr naming the port either way.
	Listen(port uint32) (net.Listener, error)
	// Dial connects to port in the guest.
	Dial(ctx context.Context, port uint32) (net.Conn, error)
	// HybridSocket is the path of the per-VM Unix socket that speaks the
	// "CONNECT <port>\n" / "OK <n>\n" convention, or "" if there is none.
	HybridSocket() string
	Close() error
}

// ListenFree listens on a free host port of t and returns the port, which
// the guest needs to be told (in a credential, say).
func ListenFree(t Transport) (net.Listener, uint32, error) {
	l, err := t.Listen(0)
	if err != nil {
		return nil, 0, err
	}
	addr, ok := l.Addr().(*vsock.Addr)
	if !ok {
		l.Close()
		return nil, 0, fmt.Errorf("vsock listener has address %v, not a vsock address", l.Addr())
	}
	return l, addr.Port, nil
}
