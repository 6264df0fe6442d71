package vsockdev

import (
	"testing"

	"github.com/vmharness/vmharness/harness/virtq"
)

// BenchmarkHotPath measures the device's per-packet work in both directions
// over in-memory queues driven synchronously: a 64 KiB RW packet from the
// guest copied into the connection and read out, and 4 KiB RW packets
// from a host writer into guest rx buffers.
func BenchmarkHotPath(b *testing.B) {
	const guestPort, hostPort = 5000, 1000
	b.Run("guest to host", func(b *testing.B) {
		dev := New(Config{GuestCID: 3})
		defer dev.Close()
		rx, tx := newFakeQueue(func() {}), newFakeQueue(func() {})
		ln, err := dev.Listen(hostPort)
		if err != nil {
			b.Fatal(err)
		}
		tx.Add(encodeChain(Header{SrcCID: 3, DstCID: 2, SrcPort: guestPort, DstPort: hostPort, Type: TypeStream, Op: OpRequest, BufAlloc: 1 << 20}, nil), nil)
		dev.serveTx(tx)
		c, _ := ln.Accept()
		payload := make([]byte, MaxPayload)
		h := Header{SrcCID: 3, DstCID: 2, SrcPort: guestPort, DstPort: hostPort, Type: TypeStream, Op: OpRW, Len: MaxPayload, BufAlloc: 1 << 20}
		chain := encodeChain(h, payload)
		buf := make([]byte, MaxPayload)
		rx.Add(nil, []int{HeaderLen + 4096})
		vc := &virtq.Chain{Readable: chain}
		b.SetBytes(MaxPayload)
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			tx.avail = append(tx.avail[:0], vc)
			dev.serveTx(tx)
			<-tx.used
			for n := 0; n < MaxPayload; {
				k, _ := c.Read(buf)
				n += k
			}
		}
	})
	b.Run("host to guest", func(b *testing.B) {
		dev := New(Config{GuestCID: 3})
		defer dev.Close()
		rx, tx := newFakeQueue(func() {}), newFakeQueue(func() {})
		ln, err := dev.Listen(hostPort)
		if err != nil {
			b.Fatal(err)
		}
		tx.Add(encodeChain(Header{SrcCID: 3, DstCID: 2, SrcPort: guestPort, DstPort: hostPort, Type: TypeStream, Op: OpRequest, BufAlloc: 1 << 30}, nil), nil)
		dev.serveTx(tx)
		c, _ := ln.Accept()
		// Fills with the RESPONSE.
		rx.Add(nil, []int{HeaderLen + 4096})
		dev.serveRx(rx)
		<-rx.used
		data := make([]byte, 4096)
		vc := &virtq.Chain{Writable: [][]byte{make([]byte, HeaderLen), make([]byte, 4096)}}
		b.SetBytes(4096)
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			c.Write(data)
			rx.avail = append(rx.avail[:0], vc)
			dev.serveRx(rx)
			<-rx.used
			// The guest consumed it all.
			hc := c.(*Conn)
			hc.mu.Lock()
			hc.peerFwdCnt = hc.txCnt
			hc.mu.Unlock()
		}
	})
}
