package vhostuser_test

import (
	"encoding/binary"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmharness/vmharness/harness/vhostuser"
	"github.com/vmharness/vmharness/harness/vhostuser/vhostusertest"
	"github.com/vmharness/vmharness/harness/virtq"
)

const fuzzMemSize = 64 << 10

// fuzzSetup is a message stream that brings an echo device up on 8-entry
// rings in a 64 KiB memfd mapped at guest address 0 / user address 1 MiB.
func fuzzSetup(extra ...[]byte) []byte {
	var b []byte
	msg := func(r vhostuser.Request, payload []byte) {
		b = vhostuser.AppendHeader(b, vhostuser.Header{Request: r, Flags: vhostuser.FlagVersion, Size: uint32(len(payload))})
		b = append(b, payload...)
	}
	u64 := func(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }
	msg(vhostuser.GetFeatures, nil)
	msg(vhostuser.GetProtocolFeatures, nil)
	msg(vhostuser.SetProtocolFeatures, u64(1<<vhostuser.ProtocolFeatureReplyAck|1<<vhostuser.ProtocolFeatureConfig))
	msg(vhostuser.SetOwner, nil)
	msg(vhostuser.GetConfig, vhostuser.AppendConfig(nil, vhostuser.ConfigHeader{Size: 8}, make([]byte, 8)))
	msg(vhostuser.SetFeatures, u64(1<<virtq.FeatureVersion1|1<<vhostuser.FeatureProtocolFeatures|virtq.RingFeatures))
	msg(vhostuser.SetMemTable, vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{{GuestAddr: 0, Size: fuzzMemSize, UserAddr: 1 << 20}}))
	for i := uint32(0); i < 2; i++ {
		base := uint64(1<<20) + uint64(i)*0x1000
		msg(vhostuser.SetVringNum, vhostuser.AppendVringState(nil, i, 8))
		msg(vhostuser.SetVringBase, vhostuser.AppendVringState(nil, i, 0))
		msg(vhostuser.SetVringAddr, vhostuser.AppendVringAddr(nil, vhostuser.VringAddr{Index: i, Desc: base, Avail: base + 0x200, Used: base + 0x400}))
		msg(vhostuser.SetVringKick, u64(uint64(i)))
		msg(vhostuser.SetVringCall, u64(uint64(i)))
		msg(vhostuser.SetVringEnable, vhostuser.AppendVringState(nil, i, 1))
	}
	for _, e := range extra {
		b = append(b, e...)
	}
	return b
}

// FuzzMessage feeds a fuzzed vhost-user message stream to a server with an
// echo device. Messages get the fds their request type calls for (a shared
// 64 KiB memfd for memory tables, eventfds for vring fds), so fuzzed memory
// tables are really mapped and fuzzed rings really run. The server must
// neither panic nor hang, and must release every fd.
func FuzzMessage(f *testing.F) {
	f.Add([]byte{})
	f.Add(fuzzSetup())
	f.Add(fuzzSetup(vhostuser.AppendHeader(nil, vhostuser.Header{Request: vhostuser.GetVringBase, Flags: 1, Size: 8}), make([]byte, 8)))
	f.Add(fuzzSetup(vhostuser.AppendHeader(nil, vhostuser.Header{Request: vhostuser.ResetDevice, Flags: 1 | vhostuser.FlagNeedReply})))
	// A new table that covers queue 0's rings but not queue 1's.
	partial := vhostuser.AppendMemTable(nil, []vhostuser.MemRegion{{GuestAddr: 0, Size: 0x1000, UserAddr: 1 << 20}})
	f.Add(fuzzSetup(vhostuser.AppendHeader(nil, vhostuser.Header{Request: vhostuser.SetMemTable, Flags: 1, Size: uint32(len(partial))}), partial))
	f.Add(vhostuser.AppendHeader(nil, vhostuser.Header{Request: vhostuser.GetFeatures, Flags: 2}))
	f.Add(append(vhostuser.AppendHeader(nil, vhostuser.Header{Request: vhostuser.SetMemTable, Flags: 1, Size: 40}), 1, 0, 0, 0))

	f.Fuzz(func(t *testing.T, stream []byte) {
		before := countFDs(t)
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		serverConn := fileConn(t, fds[0])
		client := fileConn(t, fds[1])

		memfd, err := unix.MemfdCreate("fuzz", unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Ftruncate(memfd, fuzzMemSize); err != nil {
			t.Fatal(err)
		}
		var eventfds []int

		srv := &vhostuser.Server{Logger: quietLogger()}
		done := make(chan error, 1)
		go func() { done <- srv.ServeConn(serverConn, &vhostusertest.EchoDevice{}) }()
		go io.Copy(io.Discard, client) // replies

		for len(stream) > 0 {
			n := len(stream)
			var attach []int
			if n >= vhostuser.HeaderSize {
				size := int(binary.LittleEndian.Uint32(stream[8:]))
				n = min(vhostuser.HeaderSize+size, len(stream))
				req := vhostuser.Request(binary.LittleEndian.Uint32(stream))
				payload := stream[vhostuser.HeaderSize:n]
				switch req {
				case vhostuser.SetMemTable:
					if len(payload) >= 4 {
						for i := 0; i < int(min(binary.LittleEndian.Uint32(payload), 8)); i++ {
							attach = append(attach, memfd)
						}
					}
				case vhostuser.SetVringKick, vhostuser.SetVringCall, vhostuser.SetVringErr:
					if len(payload) != 8 || payload[1]&1 == 0 {
						efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
						if err != nil {
							t.Fatal(err)
						}
						eventfds = append(eventfds, efd)
						attach = append(attach, efd)
						// Kick it, so the device looks at the fuzzed ring.
						unix.Write(efd, []byte{1, 0, 0, 0, 0, 0, 0, 0})
					}
				}
			}
			var oob []byte
			if len(attach) > 0 {
				oob = unix.UnixRights(attach...)
			}
			if _, _, err := client.WriteMsgUnix(stream[:n], oob, nil); err != nil {
				break // the server ended the connection
			}
			stream = stream[n:]
		}
		client.CloseWrite()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("server did not finish the connection after EOF")
		}
		client.Close()
		for _, fd := range eventfds {
			unix.Close(fd)
		}
		unix.Close(memfd)
		if after := countFDs(t); after > before {
			t.Fatalf("fd leak: %d open before, %d after", before, after)
		}
	})
}

func fileConn(t *testing.T, fd int) *net.UnixConn {
	f := os.NewFile(uintptr(fd), "socketpair")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.UnixConn)
}

func countFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
