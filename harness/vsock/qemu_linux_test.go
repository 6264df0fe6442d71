package vsock

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/vsock"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// envTestImage names a built image directory (vmlinuz, initrd.img,
// rootfs.img; see images/default) to boot in TestQEMU. The test is skipped
// without it because it boots a real VM (about 15 s under TCG).
const envTestImage = "VMHARNESS_TEST_IMAGE"

// TestQEMU boots the image in QEMU with a transport chosen as
// VMHARNESS_VSOCK says and checks all three paths through it against
// services the image has: the guest's PID 1 reporting READY=1 to a host
// listener (vmm.notify_socket), a host Dial to the guest's vsock echo
// service on port 1234, and the same service through the hybrid socket.
func TestQEMU(t *testing.T) {
	image := os.Getenv(envTestImage)
	if image == "" {
		t.Skipf("set %s to an image directory to boot a VM", envTestImage)
	}
	mode, err := ParseMode(os.Getenv(EnvMode))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute) // TCG on a busy host is slow
	defer cancel()

	dir := privateDir(t)
	tr, err := New(ctx, Config{Mode: mode, RuntimeDir: dir, Logf: t.Logf})
	require.NoError(t, err)
	defer func() { assert.NoError(t, tr.Close()) }()

	notify, err := tr.Listen(0)
	require.NoError(t, err)
	defer notify.Close()
	notifyPort := notify.Addr().(*vsock.Addr).Port

	args := []string{
		"-machine", "q35,memory-backend=mem", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
		"-m", "1G", "-object", "memory-backend-memfd,id=mem,size=1G,share=on",
		"-nodefaults", "-display", "none", "-monitor", "none",
		"-serial", "file:" + filepath.Join(dir, "console.log"),
		"-kernel", filepath.Join(image, "vmlinuz"), "-initrd", filepath.Join(image, "initrd.img"),
		"-append", "root=/dev/vda rw console=ttyS0 systemd.journald.forward_to_console=no",
		"-drive", "file=" + filepath.Join(image, "rootfs.img") + ",format=raw,if=virtio,snapshot=on",
		"-smbios", fmt.Sprintf("type=11,value=io.systemd.credential:vmm.notify_socket=vsock-stream:%d:%d", HostCID, notifyPort),
	}
	args = append(args, tr.QEMUArgs()...)
	qemu := exec.Command("qemu-system-x86_64", args...)
	qemu.ExtraFiles = tr.ExtraFiles()
	var qemuErr strings.Builder
	qemu.Stderr = &qemuErr
	require.NoError(t, qemu.Start())
	exited := make(chan error, 1)
	go func() { exited <- qemu.Wait() }()
	defer func() {
		qemu.Process.Signal(syscall.SIGTERM)
		<-exited
		if t.Failed() {
			console, _ := os.ReadFile(filepath.Join(dir, "console.log"))
			t.Logf("QEMU stderr:\n%s\nconsole:\n%s", qemuErr.String(), console)
		}
	}()
	start := time.Now()

	// Guest to host: PID 1 sends each notification (X_SYSTEMD_HOSTNAME=,
	// X_SYSTEMD_UNIT_ACTIVE=, ..., READY=1) on its own connection.
	messages := make(chan string)
	go func() {
		for {
			c, err := notify.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			msg, err := io.ReadAll(c)
			c.Close()
			if err != nil {
				t.Errorf("reading a notification: %v", err)
				continue
			}
			select {
			case messages <- string(msg):
			case <-ctx.Done():
				return
			}
		}
	}()
	for ready := false; !ready; {
		select {
		case msg := <-messages:
			t.Logf("guest notification after %v: %q", time.Since(start).Round(time.Millisecond), msg)
			ready = slices.Contains(strings.Split(msg, "\n"), "READY=1")
		case err := <-exited:
			t.Fatalf("QEMU exited before the guest was ready: %v", err)
		case <-ctx.Done():
			t.Fatal("the guest did not report READY=1")
		}
	}

	// Host to guest: the echo service.
	c, err := tr.Dial(ctx, 1234)
	require.NoError(t, err)
	assert.Equal(t, "hello from the host\n", echo(t, c, "hello from the host\n"))

	// The same through the hybrid socket.
	h, err := net.Dial("unix", tr.HybridSocket())
	require.NoError(t, err)
	h.SetDeadline(time.Now().Add(30 * time.Second))
	_, err = h.Write([]byte("CONNECT 1234\n"))
	require.NoError(t, err)
	r := bufio.NewReader(h)
	ok, err := r.ReadString('\n')
	require.NoError(t, err)
	t.Logf("hybrid socket answered %q", ok)
	assert.True(t, strings.HasPrefix(ok, "OK "), "answer %q", ok)
	assert.Equal(t, "through the hybrid socket\n", echo(t, &bufferedConn{Conn: h, r: r}, "through the hybrid socket\n"))

	// An ordinary client, as a user would poke the VM by hand.
	if socat, err := exec.LookPath("socat"); err == nil {
		cmd := exec.CommandContext(ctx, socat, "-t", "30", "-", "UNIX-CONNECT:"+tr.HybridSocket())
		cmd.Stdin = strings.NewReader("CONNECT 1234\nvia socat\n")
		out, err := cmd.Output()
		require.NoError(t, err)
		t.Logf("socat got %q", out)
		ok, rest, _ := strings.Cut(string(out), "\n")
		assert.True(t, strings.HasPrefix(ok, "OK "), "answer %q", ok)
		assert.Equal(t, "via socat\n", rest)
	}

	// A big payload, to exercise flow control both ways.
	c, err = tr.Dial(ctx, 1234)
	require.NoError(t, err)
	big := strings.Repeat("0123456789abcdef", 1<<16) // 1 MiB
	assert.True(t, echo(t, c, big) == big, "1 MiB echo mismatch")
}

// echo sends s, half-closes and returns everything read until EOF.
func echo(t *testing.T, c net.Conn, s string) string {
	t.Helper()
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	errc := make(chan error, 1)
	go func() {
		_, err := io.WriteString(c, s)
		if err == nil {
			err = c.(interface{ CloseWrite() error }).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	require.NoError(t, <-errc)
	return string(got)
}

// bufferedConn reads through r, which may hold bytes already read from Conn.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }
func (c *bufferedConn) CloseWrite() error {
	cw, ok := c.Conn.(interface{ CloseWrite() error })
	if !ok {
		return errors.New("no CloseWrite")
	}
	return cw.CloseWrite()
}
