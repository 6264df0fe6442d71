package vsockdev

import (
	"encoding/binary"
	"testing"
	"time"
)

// fuzzPackets turns fuzz input into tx chains: each is a split selector
// byte, a little-endian uint16 length and that many bytes, cut into
// buffers as the selector says.
func fuzzPackets(data []byte) [][][]byte {
	var chains [][][]byte
	for len(data) >= 3 {
		sel := data[0]
		n := min(int(binary.LittleEndian.Uint16(data[1:])), len(data)-3)
		pkt := data[3 : 3+n]
		data = data[3+n:]
		var bufs [][]byte
		switch sel % 4 {
		case 0:
			bufs = [][]byte{pkt}
		case 1:
			k := min(HeaderLen, len(pkt))
			bufs = [][]byte{pkt[:k], pkt[k:]}
		default:
			// Cut at offsets taken from the selector.
			a := min(int(sel>>2)%64, len(pkt))
			b := min(a+int(sel>>4), len(pkt))
			bufs = [][]byte{pkt[:a], pkt[a:b], pkt[b:]}
		}
		chains = append(chains, bufs)
	}
	return chains
}

// fuzzSeed encodes packets in the fuzzPackets format.
func fuzzSeed(pkts ...[]byte) []byte {
	var out []byte
	for i, p := range pkts {
		out = append(out, byte(i*37))
		out = binary.LittleEndian.AppendUint16(out, uint16(len(p)))
		out = append(out, p...)
	}
	return out
}

func fuzzHeader(op Op, srcPort, dstPort, length, flags, bufAlloc, fwdCnt uint32, payload []byte) []byte {
	h := Header{SrcCID: 3, DstCID: HostCID, SrcPort: srcPort, DstPort: dstPort, Len: length, Type: TypeStream, Op: op, Flags: flags, BufAlloc: bufAlloc, FwdCnt: fwdCnt}
	b := make([]byte, HeaderLen, HeaderLen+len(payload))
	h.Encode(b)
	return append(b, payload...)
}

// FuzzPacket feeds arbitrary tx chains to a device with a listener (whose
// connections the host writes to) and checks that it never panics and only
// emits well-formed packets.
func FuzzPacket(f *testing.F) {
	f.Add(fuzzSeed(
		fuzzHeader(OpRequest, 5000, 1000, 0, 0, 4096, 0, nil),
		fuzzHeader(OpRW, 5000, 1000, 5, 0, 4096, 0, []byte("hello")),
		fuzzHeader(OpCreditRequest, 5000, 1000, 0, 0, 4096, 0, nil),
		fuzzHeader(OpCreditUpdate, 5000, 1000, 0, 0, 4096, 100, nil),
		fuzzHeader(OpShutdown, 5000, 1000, 0, ShutdownSend, 4096, 0, nil),
		fuzzHeader(OpShutdown, 5000, 1000, 0, ShutdownRcv, 4096, 0, nil),
	))
	f.Add(fuzzSeed(
		fuzzHeader(OpRequest, 5001, 1000, 0, 0, 0, 0, nil),
		fuzzHeader(OpRW, 5001, 1000, 3, 0, 0, 0, []byte("abc")),
		fuzzHeader(OpRST, 5001, 1000, 0, 0, 0, 0, nil),
		fuzzHeader(OpRW, 5001, 1000, 3, 0, 0, 0, []byte("abc")),
	))
	f.Add(fuzzSeed(
		fuzzHeader(OpRequest, 5002, 1000, 0, 0, 1<<31, 1<<31, nil),
		fuzzHeader(OpRequest, 5002, 1000, 0, 0, 1<<31, 1<<31, nil),
		fuzzHeader(OpResponse, 5003, 1000, 0, 0, 0, 0, nil),
		fuzzHeader(8, 5004, 1000, 0, 0, 0, 0, nil),
		fuzzHeader(OpRW, 5002, 1000, 10, 0, 0, 0, []byte("short")),
	))
	f.Add(fuzzSeed(fuzzHeader(OpRequest, 1, 2, 0, 0, 0, 0, nil)[:30]))
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, data []byte) {
		dev := New(Config{GuestCID: 3, BufferSize: 8192})
		defer dev.Close()
		rx := newFakeQueue(func() {})
		tx := newFakeQueue(func() {})
		ln, err := dev.Listen(1000)
		if err != nil {
			t.Fatal(err)
		}
		l := ln.(*listener)
		layouts := [][]int{{HeaderLen, 4096}, {HeaderLen + 100}, {7, 37, 9}, {HeaderLen}, {3}}
		for i := range 64 {
			rx.Add(nil, layouts[i%len(layouts)])
		}
		var accepted []*Conn
		check := func() {
			for {
				select {
				case u := <-rx.used:
					checkEmitted(t, u.written)
					rx.Add(nil, layouts[int(u.head)%len(layouts)])
				default:
					return
				}
			}
		}
		for _, chain := range fuzzPackets(data) {
			tx.Add(chain, nil)
			if _, err := dev.serveTx(tx); err != nil {
				t.Fatal(err)
			}
			for {
				select {
				case c := <-l.accept:
					accepted = append(accepted, c)
					c.SetWriteDeadline(time.Unix(1, 0)) // never block the fuzz loop
					c.Write([]byte("host data"))
					continue
				default:
				}
				break
			}
			if _, err := dev.serveRx(rx); err != nil {
				t.Fatal(err)
			}
			check()
		}
		for _, c := range accepted {
			c.Close()
		}
		dev.serveRx(rx)
		check()
	})
}

// checkEmitted fails unless b is one well-formed packet from the host.
func checkEmitted(t *testing.T, b []byte) {
	t.Helper()
	if len(b) == 0 {
		return // a buffer too small for a header, returned unused
	}
	h, err := DecodeHeader(b)
	if err != nil {
		t.Fatalf("device wrote %d bytes: %v", len(b), err)
	}
	switch {
	case h.SrcCID != HostCID || h.DstCID != 3:
		t.Fatalf("%v: wrong CIDs", &h)
	case h.Type != TypeStream || !h.Op.Valid():
		t.Fatalf("%v: bad type or op", &h)
	case int(h.Len) != len(b)-HeaderLen:
		t.Fatalf("%v: len does not match the %d bytes written", &h, len(b)-HeaderLen)
	case (h.Op == OpRW) != (h.Len > 0):
		t.Fatalf("%v: payload on a control packet or an empty RW", &h)
	case h.Op == OpShutdown && (h.Flags == 0 || h.Flags&^shutdownBoth != 0):
		t.Fatalf("%v: bad shutdown flags", &h)
	case h.Op != OpShutdown && h.Flags != 0:
		t.Fatalf("%v: flags on a packet other than SHUTDOWN", &h)
	}
}
