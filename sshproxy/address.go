// Package sshproxy connects OpenSSH to harness VMs: it is the ProxyCommand
// behind `ssh vsock/CID`, `ssh machine/NAME`, `ssh vsock-mux/PATH` and
// `ssh unix/PATH`, and writes the ssh_config fragment that routes those host
// names through it.
//
// With `ProxyUseFdpass yes` the proxy connects, hands the connected socket
// to ssh over its stdout with SCM_RIGHTS and exits, so no bytes pass through
// it; otherwise it copies bytes between stdin/stdout and the connection.
// The address forms and the fd passing follow systemd-ssh-proxy(1), so the
// same host names work with systemd's own proxy where it applies.
package sshproxy

import (
	"fmt"
	"strconv"
	"strings"
)

// Kind is the form of a proxy address.
type Kind string

const (
	// KindVsock is vsock/<cid>: a harness VM found by its guest CID.
	KindVsock Kind = "vsock"
	// KindVsockMux is vsock-mux/<path>: a hybrid vsock Unix socket.
	KindVsockMux Kind = "vsock-mux"
	// KindUnix is unix/<path>: a Unix stream socket that is the sshd.
	KindUnix Kind = "unix"
	// KindMachine is machine/<name>: a harness VM found by its name.
	KindMachine Kind = "machine"
)

// Address is a parsed ssh host name of one of the forms above.
type Address struct {
	Kind Kind
	CID  uint32 // KindVsock
	Path string // KindVsockMux, KindUnix: absolute unless it started with "./"
	Name string // KindMachine
}

// String returns the host name form of a.
func (a Address) String() string {
	switch a.Kind {
	case KindVsock:
		return fmt.Sprintf("vsock/%d", a.CID)
	case KindMachine:
		return "machine/" + a.Name
	default:
		return string(a.Kind) + "/" + strings.TrimPrefix(a.Path, "/")
	}
}

// ParseAddress parses an ssh host name such as "vsock/3",
// "vsock-mux/run/vm/vsock.sock", "unix/tmp/sshd.sock" or "machine/NAME".
// Paths are absolute: "unix/tmp/x" and "unix//tmp/x" both mean /tmp/x, as
// with systemd-ssh-proxy; "unix/./x" is relative to the working directory.
func ParseAddress(host string) (Address, error) {
	// KIND%REST is accepted as well as KIND/REST, as systemd-ssh-proxy
	// does: scp takes any argument with a '/' before its ':' for a local
	// path, so "scp f vsock%3:/root/" is the only way to name a VM there.
	i := strings.IndexAny(host, "/%")
	if i < 0 {
		return Address{}, fmt.Errorf("%q is not a vmharness address (want vsock/CID, vsock-mux/PATH, unix/PATH or machine/NAME)", host)
	}
	kind, rest := host[:i], host[i+1:]
	switch Kind(kind) {
	case KindVsock:
		cid, err := strconv.ParseUint(rest, 10, 32)
		if err != nil {
			return Address{}, fmt.Errorf("%s: CID %q is not a number", host, rest)
		}
		// 0 (hypervisor), 1 (local), 2 (host) and VMADDR_CID_ANY are never a
		// guest.
		if cid < 3 || cid == 0xffffffff {
			return Address{}, fmt.Errorf("%s: CID %d is not a guest CID (guests have 3 and up)", host, cid)
		}
		return Address{Kind: KindVsock, CID: uint32(cid)}, nil
	case KindVsockMux, KindUnix:
		if rest == "" || rest == "/" {
			return Address{}, fmt.Errorf("%s: missing socket path", host)
		}
		if strings.ContainsRune(rest, 0) {
			return Address{}, fmt.Errorf("%s: socket path contains NUL", host)
		}
		path := rest
		if !strings.HasPrefix(path, "/") && !strings.HasPrefix(path, "./") {
			path = "/" + path
		}
		return Address{Kind: Kind(kind), Path: path}, nil
	case KindMachine:
		if rest == "" || strings.ContainsAny(rest, "/\x00") {
			return Address{}, fmt.Errorf("%s: %q is not a VM name", host, rest)
		}
		return Address{Kind: KindMachine, Name: rest}, nil
	default:
		return Address{}, fmt.Errorf("%q is not a vmharness address: unknown kind %q (want vsock, vsock-mux, unix or machine)", host, kind)
	}
}

// ParsePort parses the ssh port argument (ssh's %p); "" means 22.
func ParsePort(s string) (uint32, error) {
	if s == "" {
		return 22, nil
	}
	p, err := strconv.ParseUint(s, 10, 32)
	if err != nil || p == 0 {
		return 0, fmt.Errorf("port %q is not a port number", s)
	}
	return uint32(p), nil
}
