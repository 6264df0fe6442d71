// Command qemuguest is the init of the tiny guest that TestQEMU boots: it
// loads the vsock modules, streams data to the host, receives data from
// the host and powers off. It prints "qemuguest: ..." lines on the console.
package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

const (
	hostPort   = 1000
	guestPort  = 2000
	sendSize   = 64 << 20
	patternLen = 1 << 20
)

func main() {
	unix.Mount("devtmpfs", "/dev", "devtmpfs", 0, "")
	if c, err := os.OpenFile("/dev/console", os.O_WRONLY, 0); err == nil {
		os.Stdout, os.Stderr = c, c
	}
	if err := run(); err != nil {
		fmt.Println("qemuguest: FAIL:", err)
	} else {
		fmt.Println("qemuguest: PASS")
	}
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
}

func run() error {
	for _, m := range []string{"vsock.ko", "vmw_vsock_virtio_transport_common.ko", "vmw_vsock_virtio_transport.ko"} {
		f, err := os.Open(filepath.Join("/modules", m))
		if err != nil {
			return err
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && err != unix.EEXIST {
			return fmt.Errorf("load %s: %w", m, err)
		}
	}

	// Guest → host: the host checks the pattern.
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM, 0)
	if err != nil {
		return err
	}
	if err := unix.Connect(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_HOST, Port: hostPort}); err != nil {
		return fmt.Errorf("connect to host port %d: %w", hostPort, err)
	}
	conn := os.NewFile(uintptr(fd), "vsock")
	pattern := make([]byte, patternLen)
	for i := range pattern {
		pattern[i] = byte(i * 7 / 3)
	}
	for n := 0; n < sendSize; n += len(pattern) {
		if _, err := conn.Write(pattern); err != nil {
			return fmt.Errorf("write: %w", err)
		}
	}
	conn.Close()
	fmt.Println("qemuguest: sent", sendSize, "bytes")

	// Host → guest: reply with the SHA-256 of what arrived.
	lfd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM, 0)
	if err != nil {
		return err
	}
	if err := unix.Bind(lfd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: guestPort}); err != nil {
		return err
	}
	if err := unix.Listen(lfd, 1); err != nil {
		return err
	}
	// Tell the host we listen.
	nfd, _ := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM, 0)
	if err := unix.Connect(nfd, &unix.SockaddrVM{CID: unix.VMADDR_CID_HOST, Port: hostPort + 1}); err != nil {
		return fmt.Errorf("connect to host port %d: %w", hostPort+1, err)
	}
	unix.Close(nfd)
	afd, _, err := unix.Accept(lfd)
	if err != nil {
		return fmt.Errorf("accept: %w", err)
	}
	in := os.NewFile(uintptr(afd), "vsock-in")
	// A checksum that is cheap under TCG (SHA-256 would measure the
	// emulated SHA instructions, not vsock).
	var sum checksum
	n, err := io.Copy(&sum, in)
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	fmt.Println("qemuguest: received", n, "bytes")
	if _, err := fmt.Fprintf(in, "%d %016x\n", n, uint64(sum)); err != nil {
		return fmt.Errorf("write digest: %w", err)
	}
	in.Close()
	return nil
}

// checksum is the host test's rolling checksum: s = s*31 + b.
type checksum uint64

func (c *checksum) Write(p []byte) (int, error) {
	s := uint64(*c)
	for _, b := range p {
		s = s*31 + uint64(b)
	}
	*c = checksum(s)
	return len(p), nil
}
