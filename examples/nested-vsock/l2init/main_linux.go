// Command l2init is PID 1 of the nested L2 guest of examples/nested-vsock:
// a static binary alone in a tiny initramfs, booted by the L1 test in a
// nested QEMU whose vsock device is the kernel's vhost-vsock.
//
// It loads the guest's vsock modules (shipped next to it in the
// initramfs, taken from the L1's own kernel), then
//
//   - serves an echo on vsock port 1234 (what the host Dials),
//   - serves a banner and then an echo on port 22 (what `vmharness
//     ssh-proxy vsock/CID 22` connects to; no sshd needed to prove the path),
//   - reports READY=1 and its own CID to the host over the sd_notify
//     protocol (a vsock-stream connection to the host CID 2, port from the
//     kernel command line, as systemd's vmm.notify_socket does),
//   - and, when the host connects to port 1235 and writes a number, reports
//     EXIT_STATUS=<number> the same way and powers the VM off, as a test
//     unit's report and its success action end a harness VM.
//
// Everything it does goes to the serial console, for the L1 test's log.
package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

// Ports the L1 test uses; they are the guest's own, so any fixed ones do.
const (
	echoPort   = 1234
	exitPort   = 1235
	bannerPort = 22
	hostCID    = 2
)

func main() {
	if err := run(); err != nil {
		logf("FAILED: %v", err)
	}
	// PID 1 must not return; power off either way (panic=-1 on the
	// command line would reboot, which QEMU's -no-reboot turns into exit).
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "l2init: "+format+"\n", args...)
}

func run() error {
	start := time.Now()
	for _, m := range []struct{ src, dst, fs string }{
		{"devtmpfs", "/dev", "devtmpfs"}, {"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"},
	} {
		os.MkdirAll(m.dst, 0o755)
		if err := unix.Mount(m.src, m.dst, m.fs, 0, ""); err != nil {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	// The console for our output: the kernel opened /dev/console for PID 1
	// only if the initramfs has it; with devtmpfs mounted we can open it.
	if c, err := os.OpenFile("/dev/console", os.O_WRONLY, 0); err == nil {
		os.Stderr = c
		os.Stdout = c
	}
	logf("started (%v after PID 1 began)", time.Since(start).Round(time.Millisecond))

	// In dependency order; the L1 test puts them in /modules.
	for _, m := range []string{"vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"} {
		if err := loadModule(filepath.Join("/modules", m+".ko.xz")); err != nil {
			return err
		}
	}
	cid, err := vsock.ContextID()
	if err != nil {
		return fmt.Errorf("reading the guest's own CID: %w", err)
	}
	logf("vsock modules loaded, local CID %d", cid)

	notifyPort, err := cmdlinePort("nested.notify_port")
	if err != nil {
		return err
	}
	if err := serve(echoPort, func(c net.Conn) { io.Copy(c, c) }); err != nil {
		return err
	}
	if err := serve(bannerPort, func(c net.Conn) {
		fmt.Fprintf(c, "SSH-2.0-nested-vsock-l2 cid=%d\r\n", cid)
		io.Copy(c, c)
	}); err != nil {
		return err
	}
	exit := make(chan int, 1)
	if err := serve(exitPort, func(c net.Conn) {
		line, err := bufio.NewReader(io.LimitReader(c, 16)).ReadString('\n')
		n, perr := strconv.Atoi(strings.TrimSpace(line))
		if err != nil || perr != nil || n < 0 || n > 255 {
			logf("bad exit request %q: %v %v", line, err, perr)
			return
		}
		fmt.Fprintf(c, "OK\n")
		exit <- n
	}); err != nil {
		return err
	}
	if err := notify(notifyPort, fmt.Sprintf("READY=1\nX_NESTED_CID=%d\n", cid)); err != nil {
		return err
	}
	logf("READY=1 sent to host port %d; serving ports %d, %d, %d", notifyPort, echoPort, bannerPort, exitPort)
	status := <-exit
	if err := notify(notifyPort, fmt.Sprintf("EXIT_STATUS=%d\n", status)); err != nil {
		return err
	}
	logf("EXIT_STATUS=%d sent; powering off", status)
	return nil
}

// loadModule loads a compressed module with finit_module; the kernel
// decompresses it (CONFIG_MODULE_DECOMPRESS).
func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("module: %w", err)
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", unix.MODULE_INIT_COMPRESSED_FILE); err != nil && err != unix.EEXIST {
		return fmt.Errorf("loading %s: %w", path, err)
	}
	return nil
}

// cmdlinePort reads key=PORT from the kernel command line.
func cmdlinePort(key string) (uint32, error) {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return 0, err
	}
	for _, f := range strings.Fields(string(b)) {
		if v, ok := strings.CutPrefix(f, key+"="); ok {
			p, err := strconv.ParseUint(v, 10, 32)
			if err != nil {
				return 0, fmt.Errorf("%s=%q is not a port", key, v)
			}
			return uint32(p), nil
		}
	}
	return 0, fmt.Errorf("no %s= on the kernel command line", key)
}

// serve accepts connections on a guest port, each handled by h and closed.
func serve(port uint32, h func(net.Conn)) error {
	l, err := vsock.Listen(port, nil)
	if err != nil {
		return fmt.Errorf("listening on vsock port %d: %w", port, err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				logf("accept on port %d: %v", port, err)
				return
			}
			go func() {
				defer c.Close()
				logf("port %d: connection from %v", port, c.RemoteAddr())
				h(c)
			}()
		}
	}()
	return nil
}

// notify sends one sd_notify message on its own connection, as PID 1
// does to vmm.notify_socket.
func notify(port uint32, msg string) error {
	c, err := vsock.Dial(hostCID, port, nil)
	if err != nil {
		return fmt.Errorf("notify: connecting to host port %d: %w", port, err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, msg); err != nil {
		return fmt.Errorf("notify: %w", err)
	}
	return nil
}
