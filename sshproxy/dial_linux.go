package sshproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/vmharness/vmharness/harness/registry"
	hvsock "github.com/vmharness/vmharness/harness/vsock"
)

// DefaultTimeout bounds connecting plus the hybrid handshake. The guest's
// sshd is socket activated and a TCG guest is slow, but the vsock accept
// itself is done by systemd in the guest kernel, so an answer that takes
// longer than this means the VM is wedged.
const DefaultTimeout = 10 * time.Second

// Resolver finds harness VMs; *registry.Registry is one. Lookups fail with
// an error wrapping registry.ErrNotFound when no live VM matches.
type Resolver interface {
	Lookup(name string) (registry.Entry, error)
	LookupCID(cid uint32) (registry.Entry, error)
	List() ([]registry.Entry, error)
}

// Dialer connects to addresses for ssh.
type Dialer struct {
	// Resolver resolves vsock/ and machine/ addresses; nil makes them fail.
	Resolver Resolver
	// Timeout bounds the whole dial including the hybrid handshake;
	// zero means DefaultTimeout.
	Timeout time.Duration
}

// Dial connects to port at addr. The returned connection is a
// *net.UnixConn or a *vsock.Conn, both of which expose their fd through
// syscall.Conn for fd passing.
func (d *Dialer) Dial(ctx context.Context, addr Address, port uint32) (net.Conn, error) {
	timeout := d.Timeout
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	switch addr.Kind {
	case KindUnix:
		return dialUnix(ctx, addr.Path)
	case KindVsockMux:
		return dialHybrid(ctx, addr.Path, port)
	case KindVsock, KindMachine:
		e, err := d.resolve(addr)
		if err != nil {
			return nil, err
		}
		return dialEntry(ctx, e, port)
	default:
		return nil, fmt.Errorf("unknown address kind %q", addr.Kind)
	}
}

func (d *Dialer) resolve(addr Address) (registry.Entry, error) {
	if d.Resolver == nil {
		return registry.Entry{}, errors.New("no VM registry to look up harness VMs in")
	}
	if addr.Kind == KindVsock {
		e, err := d.Resolver.LookupCID(addr.CID)
		if errors.Is(err, registry.ErrNotFound) {
			return e, fmt.Errorf("no running harness VM has CID %d (see vmharness ps)", addr.CID)
		}
		return e, err
	}
	e, err := d.Resolver.Lookup(addr.Name)
	if !errors.Is(err, registry.ErrNotFound) {
		return e, err
	}
	// ssh lowercases %h; our config passes %n, but a config written by hand
	// may not, so accept a name that matches but for case if it is unique.
	all, lerr := d.Resolver.List()
	if lerr != nil {
		return e, lerr
	}
	var match []registry.Entry
	for _, c := range all {
		if strings.EqualFold(c.Name, addr.Name) {
			match = append(match, c)
		}
	}
	if len(match) == 1 {
		return match[0], nil
	}
	return e, fmt.Errorf("no running harness VM is called %q (see vmharness ps)", addr.Name)
}

// dialEntry connects to port in a registered VM: with the kernel's
// AF_VSOCK if the kernel transport serves it (ssh then holds the real
// socket, and no byte passes through the runner, although it has a hybrid
// socket too), else through its hybrid socket.
func dialEntry(ctx context.Context, e registry.Entry, port uint32) (net.Conn, error) {
	if e.Transport != registry.TransportKernel && e.HybridSocket != "" {
		return dialHybrid(ctx, e.HybridSocket, port)
	}
	c, err := hvsock.DialKernel(ctx, e.CID, port)
	if err != nil {
		return nil, fmt.Errorf("connect to vsock CID %d port %d of VM %q: %w", e.CID, port, e.Name, err)
	}
	return c, nil
}

func dialUnix(ctx context.Context, path string) (*net.UnixConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", path, err)
	}
	return c.(*net.UnixConn), nil
}

func dialHybrid(ctx context.Context, path string, port uint32) (*net.UnixConn, error) {
	c, err := dialUnix(ctx, path)
	if err != nil {
		return nil, err
	}
	if err := Handshake(ctx, c, port); err != nil {
		c.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}
