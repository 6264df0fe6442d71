package vsockdev

import (
	"encoding/binary"
	"fmt"
)

// HeaderLen is the size of the virtio-vsock packet header on the wire.
const HeaderLen = 44

// MaxPayload is the largest payload the device accepts in one packet. It is
// the limit Linux guests use (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); larger packets
// are dropped without being copied.
const MaxPayload = 64 << 10

// HostCID is the context ID the guest uses to reach the host.
const HostCID = 2

// TypeStream is the only socket type the device supports (the SEQPACKET
// feature is not offered).
const TypeStream uint16 = 1

// Shutdown flags carried by OpShutdown.
const (
	ShutdownRcv  uint32 = 1 // the sender will receive no more data
	ShutdownSend uint32 = 2 // the sender will send no more data
	shutdownBoth        = ShutdownRcv | ShutdownSend
)

// Op is a virtio-vsock packet operation.
type Op uint16

// Operations defined by the virtio 1.2 socket device.
const (
	OpInvalid       Op = 0
	OpRequest       Op = 1
	OpResponse      Op = 2
	OpRST           Op = 3
	OpShutdown      Op = 4
	OpRW            Op = 5
	OpCreditUpdate  Op = 6
	OpCreditRequest Op = 7
)

var opNames = [...]string{"INVALID", "REQUEST", "RESPONSE", "RST", "SHUTDOWN", "RW", "CREDIT_UPDATE", "CREDIT_REQUEST"}

func (o Op) String() string {
	if int(o) < len(opNames) {
		return opNames[o]
	}
	return fmt.Sprintf("Op(%d)", uint16(o))
}

// Valid reports whether o is one of the defined operations other than
// OpInvalid.
func (o Op) Valid() bool { return o >= OpRequest && o <= OpCreditRequest }

// Header is a decoded virtio-vsock packet header. All fields are
// little-endian on the wire.
type Header struct {
	SrcCID   uint64
	DstCID   uint64
	SrcPort  uint32
	DstPort  uint32
	Len      uint32 // payload length; non-zero only for OpRW
	Type     uint16
	Op       Op
	Flags    uint32 // shutdown flags for OpShutdown
	BufAlloc uint32 // sender's receive buffer size
	FwdCnt   uint32 // bytes the sender's reader has consumed, wrapping
}

// Encode writes h into b, which must be at least HeaderLen bytes long.
func (h *Header) Encode(b []byte) {
	_ = b[HeaderLen-1]
	binary.LittleEndian.PutUint64(b[0:], h.SrcCID)
	binary.LittleEndian.PutUint64(b[8:], h.DstCID)
	binary.LittleEndian.PutUint32(b[16:], h.SrcPort)
	binary.LittleEndian.PutUint32(b[20:], h.DstPort)
	binary.LittleEndian.PutUint32(b[24:], h.Len)
	binary.LittleEndian.PutUint16(b[28:], h.Type)
	binary.LittleEndian.PutUint16(b[30:], uint16(h.Op))
	binary.LittleEndian.PutUint32(b[32:], h.Flags)
	binary.LittleEndian.PutUint32(b[36:], h.BufAlloc)
	binary.LittleEndian.PutUint32(b[40:], h.FwdCnt)
}

// DecodeHeader parses the first HeaderLen bytes of b.
func DecodeHeader(b []byte) (Header, error) {
	if len(b) < HeaderLen {
		return Header{}, fmt.Errorf("vsock packet header: got %d bytes, need %d", len(b), HeaderLen)
	}
	return Header{
		SrcCID:   binary.LittleEndian.Uint64(b[0:]),
		DstCID:   binary.LittleEndian.Uint64(b[8:]),
		SrcPort:  binary.LittleEndian.Uint32(b[16:]),
		DstPort:  binary.LittleEndian.Uint32(b[20:]),
		Len:      binary.LittleEndian.Uint32(b[24:]),
		Type:     binary.LittleEndian.Uint16(b[28:]),
		Op:       Op(binary.LittleEndian.Uint16(b[30:])),
		Flags:    binary.LittleEndian.Uint32(b[32:]),
		BufAlloc: binary.LittleEndian.Uint32(b[36:]),
		FwdCnt:   binary.LittleEndian.Uint32(b[40:]),
	}, nil
}

func (h *Header) String() string {
	return fmt.Sprintf("%s %d:%d->%d:%d len=%d type=%d flags=%#x buf_alloc=%d fwd_cnt=%d",
		h.Op, h.SrcCID, h.SrcPort, h.DstCID, h.DstPort, h.Len, h.Type, h.Flags, h.BufAlloc, h.FwdCnt)
}

// verdict is what the device does with a packet the guest sent.
type verdict int

const (
	accept verdict = iota // process it
	reset                 // answer with RST, process nothing
	drop                  // ignore it: it cannot be answered sensibly
)

// checkTx validates a guest→host packet header against the chain it came
// in. payloadLen is the number of readable bytes that followed the header.
// The reason is for logs.
func checkTx(h *Header, guestCID uint64, payloadLen int) (verdict, string) {
	switch {
	case h.SrcCID != guestCID:
		// A spoofed or confused source: an RST would go to an address
		// the guest does not own.
		return drop, fmt.Sprintf("src_cid %d is not the guest's CID %d", h.SrcCID, guestCID)
	case h.Len > MaxPayload:
		return drop, fmt.Sprintf("len %d exceeds the %d byte maximum", h.Len, MaxPayload)
	case int(h.Len) != payloadLen:
		return drop, fmt.Sprintf("len %d does not match the %d payload bytes in the chain", h.Len, payloadLen)
	case h.DstCID != HostCID:
		return reset, fmt.Sprintf("dst_cid %d is not the host", h.DstCID)
	case h.Type != TypeStream:
		return reset, fmt.Sprintf("unsupported socket type %d", h.Type)
	case !h.Op.Valid():
		return reset, fmt.Sprintf("unknown op %d", uint16(h.Op))
	case h.Op != OpRW && h.Len != 0:
		return reset, fmt.Sprintf("%s carries %d payload bytes", h.Op, h.Len)
	}
	return accept, ""
}

// gather copies the first len(dst) bytes of bufs into dst. It returns the
// position just after them (buffer index and offset) and whether bufs held
// enough bytes.
func gather(bufs [][]byte, dst []byte) (idx, off int, ok bool) {
	n := 0
	for idx < len(bufs) && n < len(dst) {
		c := copy(dst[n:], bufs[idx])
		n += c
		if c < len(bufs[idx]) {
			return idx, c, true
		}
		idx++
	}
	return idx, 0, n == len(dst)
}

// scatter writes bytes into a sequence of buffers, in order.
type scatter struct {
	bufs [][]byte
	idx  int
	off  int
	n    int // bytes written so far
}

// write copies as much of p as fits and returns how much that was.
func (s *scatter) write(p []byte) int {
	w := 0
	for len(p) > 0 && s.idx < len(s.bufs) {
		c := copy(s.bufs[s.idx][s.off:], p)
		p = p[c:]
		w += c
		s.off += c
		if s.off == len(s.bufs[s.idx]) {
			s.idx++
			s.off = 0
		}
	}
	s.n += w
	return w
}
