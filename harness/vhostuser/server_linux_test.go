package vhostuser_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/vhostuser"
	"github.com/vmharness/vmharness/harness/vhostuser/vhostusertest"
	"github.com/vmharness/vmharness/harness/virtq"
)

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// startServer serves dev on a fresh socket until the test ends and checks
// that Serve returned cleanly.
func startServer(t *testing.T, dev vhostuser.Device) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "vu.sock")
	srv, err := vhostuser.Listen(sock)
	require.NoError(t, err)
	srv.Logger = quietLogger()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, dev) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			assert.ErrorIs(t, err, context.Canceled)
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after cancel")
		}
	})
	return sock
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestListenSocketMode(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "vu.sock")
	srv, err := vhostuser.Listen(sock)
	require.NoError(t, err)
	fi, err := os.Stat(sock)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	assert.Equal(t, os.ModeSocket, fi.Mode().Type())
	require.NoError(t, srv.Close())
	_, err = os.Stat(sock)
	assert.True(t, errors.Is(err, os.ErrNotExist), "Close removes the socket")

	require.NoError(t, srv.Serve(context.Background(), &vhostusertest.EchoDevice{}), "Serve after Close returns nil")
}

func TestHandshakeAndConfig(t *testing.T) {
	dev := &vhostusertest.EchoDevice{ConfigSpace: []byte{42, 0, 0, 0, 0, 0, 0, 0}}
	sock := startServer(t, dev)
	d := vhostusertest.NewDriver(t, sock, vhostusertest.Options{})

	assert.Equal(t, []byte{42, 0, 0, 0, 0, 0, 0, 0}, d.Config())
	assert.NotZero(t, d.Features()&(1<<virtq.FeatureVersion1))
	assert.NotZero(t, d.Features()&(1<<vhostuser.FeatureProtocolFeatures))
	assert.NotZero(t, d.Features()&(1<<virtq.FeatureEventIdx), "the server offers the ring features")
	starts, _ := dev.Counts()
	assert.Equal(t, 1, starts, "the device starts once the last queue is enabled")

	// A partial config read and an out-of-range one.
	reply, err := d.Request(vhostuser.GetConfig, vhostuser.AppendConfig(nil, vhostuser.ConfigHeader{Offset: 0, Size: 4}, make([]byte, 4)), nil)
	require.NoError(t, err)
	assert.Equal(t, []byte{42, 0, 0, 0}, reply[12:])
	reply, err = d.Request(vhostuser.GetConfig, vhostuser.AppendConfig(nil, vhostuser.ConfigHeader{Offset: 4, Size: 8}, make([]byte, 8)), nil)
	require.NoError(t, err)
	assert.Len(t, reply, 12, "an out-of-range read gets an empty config")

	// Queue count and a rejected SET_CONFIG keep the connection usable.
	reply, err = d.Request(vhostuser.GetQueueNum, nil, nil)
	require.NoError(t, err)
	assert.Equal(t, uint64(2), binary.LittleEndian.Uint64(reply))
	require.Error(t, d.Ack(vhostuser.SetConfig, vhostuser.AppendConfig(nil, vhostuser.ConfigHeader{Size: 1}, []byte{1})))
	require.Error(t, d.Ack(vhostuser.Request(99), nil), "unknown requests are refused")
	require.NoError(t, d.Ack(vhostuser.SetOwner, nil), "the connection survives refusals")
}

func TestEchoBothWays(t *testing.T) {
	for _, tt := range []struct {
		name string
		opts vhostusertest.Options
	}{
		{"event idx", vhostusertest.Options{}},
		{"no event idx", vhostusertest.Options{RejectFeatures: 1 << virtq.FeatureEventIdx}},
		{"small queues", vhostusertest.Options{QueueSize: 4, BufferSize: 512}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dev := &vhostusertest.EchoDevice{}
			sock := startServer(t, dev)
			d := vhostusertest.NewDriver(t, sock, tt.opts)
			ctx := testCtx(t)
			rx, tx := d.Queue(0), d.Queue(1)

			for i := 0; i < 300; i++ { // several times around every ring
				msg := []byte(fmt.Sprintf("message %d", i))
				rxHead, err := rx.Add(nil, []int{4, 64})
				require.NoError(t, err)
				require.NoError(t, rx.Kick())
				var txHead uint16
				if i%2 == 0 {
					txHead, err = tx.Add([][]byte{msg[:3], msg[3:]}, nil)
				} else {
					txHead, err = tx.AddIndirect([][]byte{msg}, nil)
				}
				require.NoError(t, err)
				require.NoError(t, tx.Kick())

				head, written, err := tx.Used(ctx)
				require.NoError(t, err)
				assert.Equal(t, txHead, head)
				assert.Empty(t, written)
				head, written, err = rx.Used(ctx)
				require.NoError(t, err)
				assert.Equal(t, rxHead, head)
				assert.Equal(t, msg, written)
			}
			require.NoError(t, dev.Err())
		})
	}
}

func TestStopResetAndReconnect(t *testing.T) {
	dev := &vhostusertest.EchoDevice{}
	sock := startServer(t, dev)
	ctx := testCtx(t)

	d := vhostusertest.NewDriver(t, sock, vhostusertest.Options{})
	_, err := d.Queue(1).Add([][]byte{[]byte("x")}, nil)
	require.NoError(t, err)
	require.NoError(t, d.Queue(1).Kick())
	_, err = d.Queue(0).Add(nil, []int{8})
	require.NoError(t, err)
	require.NoError(t, d.Queue(0).Kick())
	_, _, err = d.Queue(1).Used(ctx)
	require.NoError(t, err)

	bases, err := d.StopQueues()
	require.NoError(t, err)
	assert.Equal(t, []uint16{1, 1}, bases, "each queue consumed one chain")
	starts, stops := dev.Counts()
	assert.Equal(t, 1, starts)
	assert.Equal(t, 1, stops)

	require.NoError(t, d.Ack(vhostuser.ResetDevice, nil))
	d.Disconnect()

	// A new front-end gets a fresh device start.
	d2 := vhostusertest.NewDriver(t, sock, vhostusertest.Options{})
	require.Eventually(t, func() bool { s, _ := dev.Counts(); return s == 2 }, 5*time.Second, 10*time.Millisecond)
	rxHead, err := d2.Queue(0).Add(nil, []int{16})
	require.NoError(t, err)
	_, err = d2.Queue(1).Add([][]byte{[]byte("again")}, nil)
	require.NoError(t, err)
	require.NoError(t, d2.Queue(1).Kick())
	head, written, err := d2.Queue(0).Used(ctx)
	require.NoError(t, err)
	assert.Equal(t, rxHead, head)
	assert.Equal(t, []byte("again"), written)
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(ents)
}

func TestDisconnectMidTransferReleasesEverything(t *testing.T) {
	dev := &vhostusertest.EchoDevice{}
	sock := startServer(t, dev)
	ctx := testCtx(t)

	// Warm up: the runtime's own goroutines and fds (netpoller) settle.
	d := vhostusertest.NewDriver(t, sock, vhostusertest.Options{})
	d.Close()
	require.Eventually(t, func() bool { s, st := dev.Counts(); return s == st }, 5*time.Second, 10*time.Millisecond)

	baseG, baseFD := runtime.NumGoroutine(), openFDs(t)
	for round := 0; round < 5; round++ {
		d := vhostusertest.NewDriver(t, sock, vhostusertest.Options{})
		tx, rx := d.Queue(1), d.Queue(0)
		for i := 0; i < 10; i++ {
			_, err := tx.Add([][]byte{bytes.Repeat([]byte{byte(i)}, 1000)}, nil)
			require.NoError(t, err)
		}
		_, err := rx.Add(nil, []int{2000})
		require.NoError(t, err)
		require.NoError(t, tx.Kick())
		_, _, err = rx.Used(ctx) // the device is mid-way through tx
		require.NoError(t, err)
		d.Close()
	}
	// Poll from this goroutine: testify's Eventually runs its condition in
	// a goroutine of its own, which would skew the count.
	var starts, stops, goroutines, fds int
	deadline := time.Now().Add(5 * time.Second)
	for {
		starts, stops = dev.Counts()
		goroutines, fds = runtime.NumGoroutine(), openFDs(t)
		if starts == stops && goroutines <= baseG && fds <= baseFD {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("leak: device starts %d stops %d, goroutines %d (before %d), fds %d (before %d)\n%s",
				starts, stops, goroutines, baseG, fds, baseFD, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("device starts %d stops %d, goroutines %d (before %d), fds %d (before %d)", starts, stops, goroutines, baseG, fds, baseFD)
}

func TestMalformedInputEndsOnlyThatConnection(t *testing.T) {
	hdr := func(req vhostuser.Request, flags, size uint32) []byte {
		return vhostuser.AppendHeader(nil, vhostuser.Header{Request: req, Flags: flags, Size: size})
	}
	tests := []struct {
		name string
		send func(d *vhostusertest.Driver) error
	}{
		{"bad version", func(d *vhostusertest.Driver) error { return d.SendRaw(hdr(vhostuser.GetFeatures, 2, 0), nil) }},
		{"reply flag", func(d *vhostusertest.Driver) error { return d.SendRaw(hdr(vhostuser.GetFeatures, 1|4, 0), nil) }},
		{"huge payload", func(d *vhostusertest.Driver) error { return d.SendRaw(hdr(vhostuser.SetFeatures, 1, 1<<20), nil) }},
		{"short payload", func(d *vhostusertest.Driver) error { return d.Send(vhostuser.SetFeatures, 0, []byte{1, 2, 3}, nil) }},
		{"queue index out of range", func(d *vhostusertest.Driver) error {
			return d.Send(vhostuser.SetVringNum, 0, vhostuser.AppendVringState(nil, 2, 64), nil)
		}},
		{"queue size not power of two", func(d *vhostusertest.Driver) error {
			return d.Send(vhostuser.SetVringNum, 0, vhostuser.AppendVringState(nil, 0, 100), nil)
		}},
		{"unoffered feature", func(d *vhostusertest.Driver) error {
			return d.Send(vhostuser.SetFeatures, 0, binary.LittleEndian.AppendUint64(nil, 1<<63), nil)
		}},
		{"kick without fd", func(d *vhostusertest.Driver) error {
			return d.Send(vhostuser.SetVringKick, 0, binary.LittleEndian.AppendUint64(nil, 0), nil)
		}},
		{"fd on a request without fds", func(d *vhostusertest.Driver) error {
			return d.Send(vhostuser.SetOwner, 0, nil, []int{d.MemFD()})
		}},
		{"mem table fd count mismatch", func(d *vhostusertest.Driver) error {
			return d.Send(vhostuser.SetMemTable, 0, vhostuser.AppendMemTable(nil, d.MemRegions()), []int{d.MemFD()})
		}},
		{"mem table zero regions", func(d *vhostusertest.Driver) error {
			return d.Send(vhostuser.SetMemTable, 0, vhostuser.AppendMemTable(nil, nil), nil)
		}},
		{"mem table nine regions", func(d *vhostusertest.Driver) error {
			regions := make([]vhostuser.MemRegion, 9)
			return d.Send(vhostuser.SetMemTable, 0, vhostuser.AppendMemTable(nil, regions), nil)
		}},
		{"mem region past the end of the file", func(d *vhostusertest.Driver) error {
			r := d.MemRegions()[1]
			r.Size += 4096
			return d.Send(vhostuser.SetMemTable, 0, vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{r}), []int{d.MemFD()})
		}},
		{"mem region offset overflow", func(d *vhostusertest.Driver) error {
			r := d.MemRegions()[1]
			r.MmapOffset = ^uint64(0) - 10
			return d.Send(vhostuser.SetMemTable, 0, vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{r}), []int{d.MemFD()})
		}},
		{"overlapping mem regions", func(d *vhostusertest.Driver) error {
			r := d.MemRegions()
			bad := []vhostuser.MemRegion{r[0], r[1]}
			bad[1].GuestAddr = r[0].GuestAddr + 4096
			return d.Send(vhostuser.SetMemTable, 0, vhostuser.AppendMemTable(nil, bad), []int{d.MemFD(), d.MemFD()})
		}},
		{"config size beyond payload", func(d *vhostusertest.Driver) error {
			return d.Send(vhostuser.GetConfig, 0, vhostuser.AppendConfig(nil, vhostuser.ConfigHeader{Size: 200}, make([]byte, 8)), nil)
		}},
		{"reserved bits in vring fd message", func(d *vhostusertest.Driver) error {
			return d.Send(vhostuser.SetVringCall, 0, binary.LittleEndian.AppendUint64(nil, 1<<20|vhostuserNoFD), nil)
		}},
	}
	dev := &vhostusertest.EchoDevice{}
	sock := startServer(t, dev)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := vhostusertest.Dial(t, sock, vhostusertest.Options{Timeout: 5 * time.Second})
			require.NoError(t, err)
			require.NoError(t, tt.send(d))
			_, err = d.ReadReply(vhostuser.GetFeatures)
			require.ErrorIs(t, err, io.EOF, "the server closes the connection")

			// The next front-end is served normally.
			d2 := vhostusertest.NewDriver(t, sock, vhostusertest.Options{})
			assert.Len(t, d2.Config(), 8)
			d2.Close()
		})
	}
}

// vhostuserNoFD is VHOST_USER_VRING_NOFD_MASK.
const vhostuserNoFD = 0x100

func TestMalformedRingFailsDeviceNotHost(t *testing.T) {
	dev := &vhostusertest.EchoDevice{}
	sock := startServer(t, dev)
	d := vhostusertest.NewDriver(t, sock, vhostusertest.Options{})
	tx := d.Queue(1)

	// A two-descriptor loop, then a buffer far outside guest memory.
	tx.SetDescriptor(0, tx.BufferAddr(0), 16, virtq.DescFlagNext, 1)
	tx.SetDescriptor(1, tx.BufferAddr(1), 16, virtq.DescFlagNext, 0)
	tx.Publish(0)
	_, err := d.Queue(0).Add(nil, []int{64})
	require.NoError(t, err)
	require.NoError(t, tx.Kick())
	require.Eventually(t, func() bool { return errors.Is(dev.Err(), virtq.ErrBadChain) }, 5*time.Second, 10*time.Millisecond)

	// The server still answers, and a new connection works.
	require.NoError(t, d.Ack(vhostuser.SetOwner, nil))
	d.Close()
	d2 := vhostusertest.NewDriver(t, sock, vhostusertest.Options{})
	tx2 := d2.Queue(1)
	tx2.SetDescriptor(5, 0xdead_beef_0000, 4096, 0, 0)
	tx2.Publish(5)
	_, err = d2.Queue(0).Add(nil, []int{64})
	require.NoError(t, err)
	require.NoError(t, tx2.Kick())
	require.Eventually(t, func() bool { return errors.Is(dev.Err(), virtq.ErrOutOfRange) }, 5*time.Second, 10*time.Millisecond)
}

func TestQueuesStayDisabledUntilEnabled(t *testing.T) {
	dev := &vhostusertest.EchoDevice{}
	sock := startServer(t, dev)
	d := vhostusertest.NewDriver(t, sock, vhostusertest.Options{NoEnable: true})
	starts, _ := dev.Counts()
	assert.Zero(t, starts, "with VHOST_USER_F_PROTOCOL_FEATURES rings start disabled")

	require.NoError(t, d.Ack(vhostuser.SetVringEnable, vhostuser.AppendVringState(nil, 0, 1)))
	starts, _ = dev.Counts()
	assert.Zero(t, starts, "queue 1 is still disabled")
	require.NoError(t, d.Ack(vhostuser.SetVringEnable, vhostuser.AppendVringState(nil, 1, 1)))
	starts, _ = dev.Counts()
	assert.Equal(t, 1, starts)
}

func TestNewMemTableWhileRunning(t *testing.T) {
	dev := &vhostusertest.EchoDevice{}
	sock := startServer(t, dev)
	d := vhostusertest.NewDriver(t, sock, vhostusertest.Options{})
	ctx := testCtx(t)

	echo := func(msg string) {
		t.Helper()
		_, err := d.Queue(0).Add(nil, []int{64})
		require.NoError(t, err)
		_, err = d.Queue(1).Add([][]byte{[]byte(msg)}, nil)
		require.NoError(t, err)
		require.NoError(t, d.Queue(1).Kick())
		_, written, err := d.Queue(0).Used(ctx)
		require.NoError(t, err)
		assert.Equal(t, msg, string(written))
		_, _, err = d.Queue(1).Used(ctx)
		require.NoError(t, err)
	}
	echo("before")
	before := openFDs(t)
	// QEMU resends the table on memory hotplug without stopping the rings.
	require.NoError(t, d.SetMemTable())
	echo("after")
	starts, stops := dev.Counts()
	assert.Equal(t, 1, starts)
	assert.Zero(t, stops, "the device keeps running across a new memory table")
	assert.Equal(t, before, openFDs(t), "the table's fds are closed once mapped")
}
