// Command guestinit is the init (PID 1) of the throw-away guest that
// TestQEMUGuestVsock boots: it loads the virtio-vsock modules, sends a
// fixed amount of data to the host over vsock, reports the throughput on
// the console and powers the guest off.
package main

import (
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

const (
	hostPort = 5000
	total    = 256 << 20
	chunk    = 64 << 10
)

func main() {
	if err := run(); err != nil {
		fmt.Println("GUEST ERROR:", err)
	}
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
}

func run() error {
	for _, m := range []string{"/vsock.ko", "/vmw_vsock_virtio_transport_common.ko", "/vmw_vsock_virtio_transport.ko"} {
		b, err := os.ReadFile(m)
		if err != nil {
			return err
		}
		if err := unix.InitModule(b, ""); err != nil {
			return fmt.Errorf("load %s: %w", m, err)
		}
	}
	var fd int
	var err error
	// The device probes asynchronously; retry until the transport is up.
	for i := 0; ; i++ {
		fd, err = unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM, 0)
		if err == nil {
			err = unix.Connect(fd, &unix.SockaddrVM{CID: 2, Port: hostPort})
			if err == nil {
				break
			}
			unix.Close(fd)
		}
		if i == 50 {
			return fmt.Errorf("connect to host: %w", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Println("GUEST CONNECTED")
	buf := make([]byte, chunk)
	for i := range buf {
		buf[i] = byte(i)
	}
	start := time.Now()
	for sent := 0; sent < total; {
		n, err := unix.Write(fd, buf)
		if err != nil {
			return fmt.Errorf("write after %d bytes: %w", sent, err)
		}
		sent += n
	}
	elapsed := time.Since(start)
	fmt.Printf("GUEST SENT %d bytes in %v: %.1f MB/s\n", total, elapsed, float64(total)/elapsed.Seconds()/1e6)
	unix.Shutdown(fd, unix.SHUT_WR)
	unix.Close(fd)
	time.Sleep(200 * time.Millisecond)
	return nil
}
