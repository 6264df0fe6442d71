package vhostuser_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/vhostuser"
	"github.com/vmharness/vmharness/harness/virtq"
)

// TestQEMUGuestVsock boots a real Linux guest in QEMU with
// vhost-user-vsock-pci served by this package, so the guest's
// virtio-vsock driver drives real rings through the server. The guest's
// init (testdata/guestinit) connects to host port 5000 and sends 256 MiB;
// a minimal vsock responder (sinkDevice) accepts the connection, counts the
// bytes and grants credit.
//
// It needs a kernel and the three vsock modules (uncompressed):
//
//	VHOSTUSER_TEST_GUEST=DIR go test -run TestQEMUGuestVsock -v ./harness/vhostuser/
//
// with DIR holding vmlinuz, vsock.ko, vmw_vsock_virtio_transport_common.ko
// and vmw_vsock_virtio_transport.ko (for example from a Debian trixie
// linux-image-cloud-amd64, xz -d'ed).
func TestQEMUGuestVsock(t *testing.T) {
	dir := os.Getenv("VHOSTUSER_TEST_GUEST")
	if dir == "" {
		t.Skip("set VHOSTUSER_TEST_GUEST to a directory with vmlinuz and the vsock modules")
	}
	qemu, err := qemuBinary()
	if err != nil {
		t.Skip(err)
	}
	work := t.TempDir()
	initPath := filepath.Join(work, "init")
	build := exec.Command("go", "build", "-o", initPath, "./testdata/guestinit")
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	out, err := build.CombinedOutput()
	require.NoError(t, err, "build guest init: %s", out)

	files := map[string]string{"init": initPath}
	for _, m := range []string{"vsock.ko", "vmw_vsock_virtio_transport_common.ko", "vmw_vsock_virtio_transport.ko"} {
		files[m] = filepath.Join(dir, m)
	}
	initrd := filepath.Join(work, "initrd.cpio")
	require.NoError(t, writeInitramfs(initrd, files))

	sock := filepath.Join(work, "vsock.sock")
	dev := &sinkDevice{guestCID: 3}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	srvCtx, stopSrv := context.WithCancel(ctx)
	served := make(chan error, 1)
	srv, err := vhostuser.Listen(sock)
	require.NoError(t, err)
	rec := &requestRecorder{}
	srv.Logger = slog.New(rec)
	go func() { served <- srv.Serve(srvCtx, dev) }()

	cmd := exec.CommandContext(ctx, qemu,
		"-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
		"-machine", "q35,memory-backend=mem",
		"-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-m", "512M",
		"-chardev", "socket,id=vs,path="+sock,
		"-device", "vhost-user-vsock-pci,chardev=vs",
		"-kernel", filepath.Join(dir, "vmlinuz"), "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 quiet",
		"-nographic", "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
	)
	var console bytes.Buffer
	cmd.Stdout, cmd.Stderr = &console, &console
	start := time.Now()
	progressDone := make(chan struct{})
	defer close(progressDone)
	go func() {
		for {
			select {
			case <-progressDone:
				return
			case <-time.After(5 * time.Second):
				n, _, err := dev.result()
				t.Logf("%v: host has received %d bytes (err %v)", time.Since(start).Round(time.Second), n, err)
			}
		}
	}()
	err = cmd.Run()
	if err != nil {
		stopSrv()
		<-served
		_, warnings := rec.snapshot()
		t.Logf("front-end requests:\n%s\nwarnings: %v", strings.Join(rec.details, "\n"), warnings)
	}
	t.Logf("QEMU ran %v, exit %v; console:\n%s", time.Since(start).Round(time.Millisecond), err, console.String())
	require.NoError(t, err)
	stopSrv()
	<-served
	requests, warnings := rec.snapshot()
	t.Logf("front-end requests:\n%s", strings.Join(rec.details, "\n"))
	_ = requests
	assert.Empty(t, warnings)

	c := console.String()
	require.Contains(t, c, "GUEST CONNECTED")
	require.NotContains(t, c, "GUEST ERROR")
	m := regexp.MustCompile(`GUEST SENT (\d+) bytes`).FindStringSubmatch(c)
	require.NotNil(t, m)
	received, elapsed, err := dev.result()
	require.NoError(t, err)
	assert.Equal(t, m[1], fmt.Sprint(received), "the host received every byte the guest sent")
	t.Logf("host received %d bytes in %v: %.1f MB/s", received, elapsed, float64(received)/elapsed.Seconds()/1e6)
}

// writeInitramfs writes a newc cpio archive with /dev/console and files
// (name in the archive -> host path), executable.
func writeInitramfs(path string, files map[string]string) error {
	var b bytes.Buffer
	ino := 1
	entry := func(name string, mode, rdevMajor, rdevMinor int, data []byte) {
		fmt.Fprintf(&b, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
		ino++
		b.WriteString(name)
		b.WriteByte(0)
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
		b.Write(data)
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
	}
	entry("dev", 0o040755, 0, 0, nil)
	entry("dev/console", 0o020600, 5, 1, nil)
	for name, src := range files {
		data, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		entry(name, 0o100755, 0, 0, data)
	}
	entry("TRAILER!!!", 0, 0, 0, nil)
	return os.WriteFile(path, b.Bytes(), 0o644)
}

// virtio-vsock packet header fields (virtio 1.2, 5.10.6).
const (
	vsockHdrSize = 44

	vsockOpRequest       = 1
	vsockOpResponse      = 2
	vsockOpRST           = 3
	vsockOpShutdown      = 4
	vsockOpRW            = 5
	vsockOpCreditUpdate  = 6
	vsockOpCreditRequest = 7

	sinkBufAlloc = 256 << 10
)

// sinkDevice is the least a vsock device must do to take a stream from the
// guest: accept connection requests, count data, grant credit, reset on
// shutdown. Queue 0 is rx (to the guest), 1 is tx (from the guest).
//
// Observed with the Debian trixie 6.12 guest: the guest never has more than
// 256 KiB (its own vsock buffer size) unacknowledged, whatever buf_alloc the
// host advertises; with a 4 MiB buf_alloc and a credit update per MiB the
// stream stalled at exactly 256 KiB. So the host must send CREDIT_UPDATE
// well before 256 KiB are consumed (here: every 64 KiB).
type sinkDevice struct {
	guestCID uint64

	mu       sync.Mutex
	received uint64
	first    time.Time
	last     time.Time
	err      error
	kick     chan struct{}
	stop     chan struct{}
	done     chan struct{}
}

func (s *sinkDevice) Features() uint64 { return 1 << virtq.FeatureVersion1 }
func (s *sinkDevice) Config() []byte   { return binary.LittleEndian.AppendUint64(nil, s.guestCID) }
func (s *sinkDevice) NumQueues() int   { return 2 }

func (s *sinkDevice) Start(_ uint64, queues []virtq.Queue) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.kick, s.stop, s.done = make(chan struct{}, 1), make(chan struct{}), make(chan struct{})
	go s.run(queues[0], queues[1], s.kick, s.stop, s.done)
	return nil
}

func (s *sinkDevice) Kick(int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.kick != nil {
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
}

func (s *sinkDevice) Stop() {
	s.mu.Lock()
	stop, done := s.stop, s.done
	s.kick, s.stop, s.done = nil, nil, nil
	s.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}

func (s *sinkDevice) result() (uint64, time.Duration, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.received, s.last.Sub(s.first), s.err
}

func (s *sinkDevice) run(rx, tx virtq.Queue, kick, stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	var replies [][vsockHdrSize]byte
	var hdr [vsockHdrSize]byte
	var fwd, credited uint32
	fail := func(err error) {
		s.mu.Lock()
		s.err = err
		s.mu.Unlock()
	}
	for {
		select {
		case <-stop:
			return
		case <-kick:
		}
		for {
			c, err := tx.Next()
			if err != nil {
				fail(err)
				return
			}
			if c == nil {
				break
			}
			n := 0
			for _, b := range c.Readable {
				n += copy(hdr[n:], b)
			}
			if n == vsockHdrSize {
				op := binary.LittleEndian.Uint16(hdr[30:])
				length := binary.LittleEndian.Uint32(hdr[24:])
				reply := func(op uint16) {
					var r [vsockHdrSize]byte
					copy(r[0:8], hdr[8:16])    // src_cid = their dst
					copy(r[8:16], hdr[0:8])    // dst_cid = their src
					copy(r[16:20], hdr[20:24]) // src_port = their dst_port
					copy(r[20:24], hdr[16:20]) // dst_port = their src_port
					binary.LittleEndian.PutUint16(r[28:], 1)
					binary.LittleEndian.PutUint16(r[30:], op)
					binary.LittleEndian.PutUint32(r[36:], sinkBufAlloc)
					binary.LittleEndian.PutUint32(r[40:], fwd)
					replies = append(replies, r)
				}
				switch op {
				case vsockOpRequest:
					reply(vsockOpResponse)
				case vsockOpRW:
					now := time.Now()
					s.mu.Lock()
					if s.received == 0 {
						s.first = now
					}
					s.received += uint64(length)
					s.last = now
					s.mu.Unlock()
					fwd += length
					if fwd-credited >= sinkBufAlloc/4 {
						credited = fwd
						reply(vsockOpCreditUpdate)
					}
				case vsockOpCreditRequest:
					credited = fwd
					reply(vsockOpCreditUpdate)
				case vsockOpShutdown:
					reply(vsockOpRST)
				}
			}
			if err := tx.Complete(c, 0); err != nil {
				fail(err)
				return
			}
		}
		for len(replies) > 0 {
			c, err := rx.Next()
			if err != nil {
				fail(err)
				return
			}
			if c == nil {
				break // wait for the guest to post rx buffers (it kicks)
			}
			n := 0
			for _, w := range c.Writable {
				n += copy(w, replies[0][n:])
			}
			replies = replies[1:]
			if err := rx.Complete(c, uint32(n)); err != nil {
				fail(err)
				return
			}
		}
		if err := rx.Notify(); err != nil {
			fail(err)
		}
		if err := tx.Notify(); err != nil {
			fail(err)
		}
	}
}
