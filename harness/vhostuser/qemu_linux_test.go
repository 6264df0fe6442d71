package vhostuser_test

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/vhostuser"
	"github.com/vmharness/vmharness/harness/vhostuser/vhostusertest"
)

// requestRecorder is a slog.Handler that keeps the server's per-message
// debug records.
type requestRecorder struct {
	mu       sync.Mutex
	requests []string
	details  []string
	warnings []string
}

func (r *requestRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *requestRecorder) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *requestRecorder) WithGroup(string) slog.Handler            { return r }
func (r *requestRecorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if rec.Message != "vhost-user request" {
		var sb strings.Builder
		sb.WriteString(rec.Message)
		rec.Attrs(func(a slog.Attr) bool { sb.WriteString(" " + a.String()); return true })
		r.warnings = append(r.warnings, sb.String())
		return nil
	}
	var detail strings.Builder
	rec.Attrs(func(a slog.Attr) bool {
		if a.Key == "request" {
			r.requests = append(r.requests, a.Value.String())
		}
		detail.WriteString(a.String() + " ")
		return true
	})
	r.details = append(r.details, detail.String())
	return nil
}

func (r *requestRecorder) snapshot() ([]string, []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.requests...), append([]string(nil), r.warnings...)
}

// qemuBinary is $VHOSTUSER_TEST_QEMU (to test another QEMU version), or
// qemu-system-x86_64 from PATH.
func qemuBinary() (string, error) {
	if q := os.Getenv("VHOSTUSER_TEST_QEMU"); q != "" {
		return q, nil
	}
	return exec.LookPath("qemu-system-x86_64")
}

// TestQEMUHandshake starts a real QEMU with vhost-user-vsock-pci against the
// server. Without a guest kernel the device is never started, but QEMU's
// realize runs the whole initial handshake and refuses to start if the
// back-end lacks something vhost-user-vsock needs (VHOST_USER_PROTOCOL_F_CONFIG,
// a valid GET_CONFIG reply).
//
// Observed with QEMU 7.2.22 (Debian 12), q35 with a 512 MiB
// memory-backend-memfd, recorded by this test and by TestQEMUGuestVsock
// (flags 0x1 = version only, 0x9 = NEED_REPLY; no other message asks for an
// ack):
//
//	realize (this test; -S, no guest):
//	  GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, SET_OWNER,
//	  GET_FEATURES,
//	  SET_VRING_CALL, SET_VRING_ERR (queue 0), SET_VRING_CALL, SET_VRING_ERR (queue 1),
//	  GET_CONFIG (12-byte header + 8 bytes: the guest CID)
//	guest driver sets DRIVER_OK:
//	  SET_VRING_CALL x2,
//	  SET_FEATURES, SET_MEM_TABLE (flags 0x9, one region, one fd),
//	  for queue 0 then 1: SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK,
//	  SET_VRING_ENABLE x2 (the device starts here),
//	  SET_VRING_CALL x2 (QEMU swaps the call fds of the running rings)
//	guest powers off:
//	  SET_VRING_ENABLE x2 (disable), GET_VRING_BASE x2, SET_VRING_CALL x2
//
// QEMU 10.0.2 (bookworm-backports, run from an unpacked .deb with
// VHOSTUSER_TEST_QEMU) differs only in: RESET_DEVICE after GET_CONFIG (once
// per machine reset: one with -S, two when a guest boots), SET_VRING_ENABLE
// with NEED_REPLY (flags 0x9), and a RESET_DEVICE after the stop sequence.
//
// Only queues 0 (rx) and 1 (tx) are the back-end's: QEMU keeps the vsock
// event queue itself.
func TestQEMUHandshake(t *testing.T) {
	if testing.Short() {
		t.Skip("starts QEMU")
	}
	qemu, err := qemuBinary()
	if err != nil {
		t.Skip(err)
	}
	sock := filepath.Join(t.TempDir(), "vsock.sock")
	srv, err := vhostuser.Listen(sock)
	require.NoError(t, err)
	rec := &requestRecorder{}
	srv.Logger = slog.New(rec)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	served := make(chan error, 1)
	dev := &vhostusertest.EchoDevice{ConfigSpace: []byte{3, 0, 0, 0, 0, 0, 0, 0}}
	go func() { served <- srv.Serve(ctx, dev) }()

	cmd := exec.CommandContext(ctx, qemu,
		"-accel", "tcg",
		"-machine", "q35,memory-backend=mem",
		"-object", "memory-backend-memfd,id=mem,size=512M,share=on",
		"-m", "512M",
		"-chardev", "socket,id=vs,path="+sock,
		"-device", "vhost-user-vsock-pci,chardev=vs",
		"-nographic", "-nodefaults", "-display", "none",
		"-S", // realize the devices (and so the handshake), run nothing
	)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	want := []string{
		"GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "SET_OWNER", "GET_FEATURES",
		"SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_CALL", "SET_VRING_ERR", "GET_CONFIG",
	}
	deadline := time.After(30 * time.Second)
	for {
		got, _ := rec.snapshot()
		if len(got) >= len(want) {
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("QEMU exited early (%v):\n%s\nrequests: %v", err, out.String(), got)
		case <-deadline:
			t.Fatalf("QEMU did not finish the handshake:\n%s\nrequests: %v", out.String(), got)
		case <-time.After(20 * time.Millisecond):
		}
	}
	// QEMU keeps running with the device realized.
	select {
	case err := <-exited:
		t.Fatalf("QEMU exited after the handshake (%v):\n%s", err, out.String())
	case <-time.After(500 * time.Millisecond):
	}
	got, warnings := rec.snapshot()
	t.Logf("QEMU sent:\n%s", strings.Join(rec.details, "\n"))
	require.GreaterOrEqual(t, len(got), len(want))
	assert.Equal(t, want, got[:len(want)])
	// QEMU 10.0 also resets the device when the machine resets (it uses
	// RESET_DEVICE because the back-end offers it).
	for _, r := range got[len(want):] {
		assert.Equal(t, "RESET_DEVICE", r)
	}
	assert.Empty(t, warnings)

	require.NoError(t, cmd.Process.Kill())
	<-exited
	// The server notices the disconnect and waits for the next front-end.
	require.NoError(t, srv.Close())
	require.NoError(t, <-served)
}
