package vhostuser_test

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vmharness/vmharness/harness/vhostuser"
	"github.com/vmharness/vmharness/harness/vhostuser/vhostusertest"
	"github.com/vmharness/vmharness/harness/virtq"
)

// stopReader is a device with no worker goroutine: it takes one chain from
// each queue when it is stopped. Stop is the last moment the server keeps
// guest memory mapped for the device, so a queue the server left pointing
// into an unmapped table faults the test binary right there.
type stopReader struct {
	atStop func() // runs first thing in Stop

	mu     sync.Mutex
	queues []virtq.Queue
	stops  int
	got    []string // per queue: the readable bytes of the chain Stop took
}

func (d *stopReader) Features() uint64 { return 1 << virtq.FeatureVersion1 }
func (d *stopReader) Config() []byte   { return make([]byte, 8) }
func (d *stopReader) NumQueues() int   { return 2 }
func (d *stopReader) Kick(int)         {}

func (d *stopReader) Start(_ uint64, queues []virtq.Queue) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.queues = queues
	return nil
}

func (d *stopReader) Stop() {
	if d.atStop != nil {
		d.atStop()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stops++
	d.got = nil
	for _, q := range d.queues {
		c, err := q.Next()
		switch {
		case err != nil:
			d.got = append(d.got, "error: "+err.Error())
		case c == nil:
			d.got = append(d.got, "no chain")
		default:
			d.got = append(d.got, string(bytes.Join(c.Readable, nil)))
		}
	}
	d.queues = nil
}

func (d *stopReader) result() (stops int, got []string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.stops, d.got
}

// countMappings counts this process's mappings of the memfd called name,
// or returns -1. It may run outside the test goroutine, so it cannot stop
// the test.
func countMappings(t *testing.T, name string) int {
	t.Helper()
	maps, err := os.ReadFile("/proc/self/maps")
	if !assert.NoError(t, err) {
		return -1
	}
	return strings.Count(string(maps), "/memfd:"+name+" ")
}

// TestSetMemTableAllOrNothing sends a running device a new memory table
// that moves the rings into a second memfd whose buffers say "new" where
// the first one's say "old". A table that misses any part of any ring must
// leave every queue on the old table (and end the connection); one that
// covers them all must move every queue.
func TestSetMemTableAllOrNothing(t *testing.T) {
	const newMemfd = "memtable-new"
	// newRings derives the new table's rings region from the Driver's,
	// given both queues' ring addresses and the queue size.
	type newRings func(old vhostuser.MemRegion, q0, q1 virtq.RingAddresses, n uint64) vhostuser.MemRegion
	tests := []struct {
		name     string
		rings    newRings
		wantErr  string // "" if the table must be accepted
		want     string // what each queue reads when the device stops
		mappings int    // mappings of the new memfd left when the device stops
	}{
		{
			name: "covers queue 0 but not queue 1",
			rings: func(old vhostuser.MemRegion, _, q1 virtq.RingAddresses, _ uint64) vhostuser.MemRegion {
				old.Size = q1.Desc - old.UserAddr
				return old
			},
			wantErr: "queue 1: descriptor table",
			want:    "old",
		},
		{
			name: "ends one byte short of queue 1's used ring",
			rings: func(old vhostuser.MemRegion, _, q1 virtq.RingAddresses, n uint64) vhostuser.MemRegion {
				// flags, idx, n elements and avail_event (EVENT_IDX is on).
				old.Size = q1.Used + 4 + virtq.UsedElemSize*n + 2 - 1 - old.UserAddr
				return old
			},
			wantErr: "queue 1: used ring",
			want:    "old",
		},
		{
			name: "covers queue 1 but not queue 0",
			rings: func(old vhostuser.MemRegion, _, q1 virtq.RingAddresses, _ uint64) vhostuser.MemRegion {
				skip := q1.Desc - old.UserAddr
				return vhostuser.MemRegion{GuestAddr: old.GuestAddr + skip, Size: old.Size - skip, UserAddr: old.UserAddr + skip, MmapOffset: old.MmapOffset + skip}
			},
			wantErr: "queue 0: descriptor table",
			want:    "old",
		},
		{
			name: "covers every ring",
			rings: func(old vhostuser.MemRegion, _, _ virtq.RingAddresses, _ uint64) vhostuser.MemRegion {
				return old
			},
			want:     "new",
			mappings: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(t.TempDir(), "vu.sock"), Net: "unix"})
			require.NoError(t, err)
			defer ln.Close()
			dev := &stopReader{}
			mappingsAtStop := -1
			dev.atStop = func() { mappingsAtStop = countMappings(t, newMemfd) }
			served := make(chan error, 1)
			go func() {
				uc, err := ln.AcceptUnix()
				if err != nil {
					served <- err
					return
				}
				served <- (&vhostuser.Server{Logger: quietLogger()}).ServeConn(uc, dev)
			}()

			const queueSize = 8
			d := vhostusertest.NewDriver(t, ln.Addr().String(), vhostusertest.Options{QueueSize: queueSize, BufferSize: 64})
			require.NotZero(t, d.Features()&(1<<virtq.FeatureEventIdx), "the used ring sizes below assume EVENT_IDX")
			q0, q1 := d.Queue(0), d.Queue(1)

			var heads []uint16
			for _, q := range []*vhostusertest.DriverQueue{q0, q1} {
				head, err := q.Add([][]byte{[]byte("old")}, nil)
				require.NoError(t, err)
				heads = append(heads, head)
			}
			// The second memfd is a copy of guest memory, rings included,
			// with each queue's buffer rewritten, so a chain's bytes say
			// which table it was read through.
			fd, err := unix.MemfdCreate(newMemfd, unix.MFD_CLOEXEC)
			require.NoError(t, err)
			defer unix.Close(fd)
			_, err = unix.Pwrite(fd, d.Memory(), 0)
			require.NoError(t, err)
			data := d.MemRegions()[1]
			for i, q := range []*vhostusertest.DriverQueue{q0, q1} {
				_, err = unix.Pwrite(fd, []byte("new"), int64(data.MmapOffset+q.BufferAddr(heads[i])-data.GuestAddr))
				require.NoError(t, err)
			}

			table := []vhostuser.MemRegion{tt.rings(d.MemRegions()[0], q0.RingAddrs(), q1.RingAddrs(), queueSize), data}
			err = d.Ack(vhostuser.SetMemTable, vhostuser.AppendMemTable(nil, table), fd, fd)
			if tt.wantErr == "" {
				require.NoError(t, err)
			} else {
				require.Error(t, err, "the back-end ends the connection")
			}
			d.Close()

			var serveErr error
			select {
			case serveErr = <-served:
			case <-time.After(10 * time.Second):
				t.Fatal("the connection was not torn down")
			}
			if tt.wantErr == "" {
				require.NoError(t, serveErr)
			} else {
				require.ErrorIs(t, serveErr, vhostuser.ErrProtocol)
				require.ErrorIs(t, serveErr, virtq.ErrOutOfRange)
				assert.ErrorContains(t, serveErr, tt.wantErr)
			}
			stops, got := dev.result()
			assert.Equal(t, 1, stops)
			assert.Equal(t, []string{tt.want, tt.want}, got, "the chain each queue reads when the device stops")
			assert.Equal(t, tt.mappings, mappingsAtStop, "mappings of the new table while the device stops")
			assert.Zero(t, countMappings(t, newMemfd), "the connection unmaps every table it mapped")
		})
	}
}
