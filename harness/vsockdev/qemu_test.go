//go:build linux

package vsockdev

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/vhostuser"
)

// TestQEMU boots a real Linux guest under QEMU (TCG) with
// vhost-user-vsock-pci served by this device and moves data through the
// guest kernel's virtio-vsock driver both ways. It needs a kernel and its
// vsock modules (vsock.ko, vmw_vsock_virtio_transport_common.ko,
// vmw_vsock_virtio_transport.ko, uncompressed):
//
//	VSOCKDEV_QEMU_KERNEL=/path/vmlinuz VSOCKDEV_QEMU_MODULES=/path/dir go test -run TestQEMU -v
func TestQEMU(t *testing.T) {
	kernel, modules := os.Getenv("VSOCKDEV_QEMU_KERNEL"), os.Getenv("VSOCKDEV_QEMU_MODULES")
	if kernel == "" || modules == "" {
		t.Skip("set VSOCKDEV_QEMU_KERNEL and VSOCKDEV_QEMU_MODULES to boot a guest")
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 is not installed")
	}
	initrd := buildGuestInitrd(t, t.TempDir(), modules)
	// A buffer larger than the guest's own exercises the credit updates
	// for a sender that caps its credit (Linux does).
	for _, size := range []uint32{0, 1 << 20} {
		t.Run(fmt.Sprintf("buffer=%d", size), func(t *testing.T) {
			bootQEMU(t, qemu, kernel, initrd, size)
		})
	}
}

func bootQEMU(t *testing.T, qemu, kernel, initrd string, bufferSize uint32) {
	dir := t.TempDir()
	dev := New(Config{GuestCID: 3, Logf: t.Logf, BufferSize: bufferSize})
	defer dev.Close()
	toHost, err := dev.Listen(1000)
	require.NoError(t, err)
	guestReady, err := dev.Listen(1001)
	require.NoError(t, err)
	sock := filepath.Join(dir, "vhost-user.sock")
	srv, err := vhostuser.Listen(sock)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(ctx, dev)
	}()
	defer func() {
		cancel()
		<-served
	}()

	var console bytes.Buffer
	cmd := exec.CommandContext(ctx, qemu,
		"-machine", "q35,memory-backend=mem", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "512M",
		"-object", "memory-backend-memfd,id=mem,size=512M,share=on",
		"-display", "none", "-serial", "stdio", "-no-reboot", "-nodefaults",
		"-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 quiet",
		"-chardev", "socket,id=vsock,path="+sock, "-device", "vhost-user-vsock-pci,chardev=vsock",
	)
	cmd.Stdout, cmd.Stderr = &console, &console
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
		t.Logf("guest console:\n%s", console.String())
	}()

	// Guest → host: 64 MiB of the guest's pattern.
	c, err := toHost.Accept()
	require.NoError(t, err)
	pattern := make([]byte, 1<<20)
	for i := range pattern {
		pattern[i] = byte(i * 7 / 3)
	}
	want := sha256.New()
	for range 64 {
		want.Write(pattern)
	}
	got := sha256.New()
	start := time.Now()
	n, err := io.Copy(got, c)
	elapsed := time.Since(start)
	require.NoError(t, err)
	require.Equal(t, int64(64<<20), n)
	require.Equal(t, want.Sum(nil), got.Sum(nil))
	t.Logf("guest→host through QEMU (TCG): %d bytes in %v = %.1f MB/s", n, elapsed, float64(n)/elapsed.Seconds()/1e6)
	c.Close()

	// Host → guest: 16 MiB; the guest answers with the length and a
	// checksum.
	r, err := guestReady.Accept()
	require.NoError(t, err)
	r.Close()
	out, err := dev.Dial(ctx, 2000)
	require.NoError(t, err)
	data := make([]byte, 16<<20)
	rand.Read(data)
	start = time.Now()
	_, err = out.Write(data)
	require.NoError(t, err)
	require.NoError(t, out.(*Conn).CloseWrite())
	line, err := bufio.NewReader(out).ReadString('\n')
	elapsed = time.Since(start)
	require.NoError(t, err)
	var sum uint64
	for _, b := range data {
		sum = sum*31 + uint64(b)
	}
	require.Equal(t, fmt.Sprintf("%d %016x", len(data), sum), strings.TrimSpace(line))
	t.Logf("host→guest through QEMU (TCG): %d bytes in %v = %.1f MB/s", len(data), elapsed, float64(len(data))/elapsed.Seconds()/1e6)
	out.Close()

	select {
	case <-exited:
		exited <- nil
	case <-time.After(time.Minute):
		t.Fatal("the guest did not power off")
	}
	require.Contains(t, console.String(), "qemuguest: PASS")
}

// buildGuestInitrd builds testdata/qemuguest as /init and packs it with the
// vsock modules into a newc cpio archive.
func buildGuestInitrd(t *testing.T, dir, modules string) string {
	initBin := filepath.Join(dir, "init")
	build := exec.Command("go", "build", "-o", initBin, "./testdata/qemuguest")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := build.CombinedOutput()
	require.NoError(t, err, "building the guest init: %s", out)

	var archive bytes.Buffer
	ino := 1
	add := func(name string, mode uint32, data []byte) {
		fmt.Fprintf(&archive, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
		ino++
		archive.WriteString(name)
		archive.WriteByte(0)
		for archive.Len()%4 != 0 {
			archive.WriteByte(0)
		}
		archive.Write(data)
		for archive.Len()%4 != 0 {
			archive.WriteByte(0)
		}
	}
	initData, err := os.ReadFile(initBin)
	require.NoError(t, err)
	add("dev", 0o040755, nil)
	add("modules", 0o040755, nil)
	add("init", 0o100755, initData)
	for _, m := range []string{"vsock.ko", "vmw_vsock_virtio_transport_common.ko", "vmw_vsock_virtio_transport.ko"} {
		b, err := os.ReadFile(filepath.Join(modules, m))
		require.NoError(t, err)
		add("modules/"+m, 0o100644, b)
	}
	add("TRAILER!!!", 0, nil)
	path := filepath.Join(dir, "initrd.cpio")
	require.NoError(t, os.WriteFile(path, archive.Bytes(), 0o644))
	return path
}
