package vsockdev

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestHeaderRoundTrip(t *testing.T) {
	tests := []Header{
		{},
		{SrcCID: 3, DstCID: 2, SrcPort: 1234, DstPort: 22, Type: TypeStream, Op: OpRequest, BufAlloc: 256 << 10},
		{SrcCID: 2, DstCID: 1<<64 - 1, SrcPort: 1<<32 - 1, DstPort: 1, Len: MaxPayload, Type: TypeStream, Op: OpRW, Flags: 0, BufAlloc: 1, FwdCnt: 1<<32 - 1},
		{SrcCID: 3, DstCID: 2, Type: TypeStream, Op: OpShutdown, Flags: ShutdownRcv | ShutdownSend},
	}
	for _, h := range tests {
		t.Run(h.String(), func(t *testing.T) {
			b := make([]byte, HeaderLen+3)
			h.Encode(b)
			got, err := DecodeHeader(b)
			require.NoError(t, err)
			assert.Equal(t, h, got)
		})
	}
}

func TestHeaderWireLayout(t *testing.T) {
	h := Header{SrcCID: 0x0102030405060708, DstCID: 2, SrcPort: 0xaabbccdd, DstPort: 5, Len: 6, Type: 1, Op: OpRW, Flags: 7, BufAlloc: 8, FwdCnt: 9}
	b := make([]byte, HeaderLen)
	h.Encode(b)
	want := []byte{
		8, 7, 6, 5, 4, 3, 2, 1, // src_cid
		2, 0, 0, 0, 0, 0, 0, 0, // dst_cid
		0xdd, 0xcc, 0xbb, 0xaa, // src_port
		5, 0, 0, 0, // dst_port
		6, 0, 0, 0, // len
		1, 0, // type
		5, 0, // op
		7, 0, 0, 0, // flags
		8, 0, 0, 0, // buf_alloc
		9, 0, 0, 0, // fwd_cnt
	}
	assert.Equal(t, want, b)
	_, err := DecodeHeader(b[:HeaderLen-1])
	assert.Error(t, err)
}

func TestCheckTx(t *testing.T) {
	good := Header{SrcCID: 3, DstCID: HostCID, SrcPort: 1000, DstPort: 22, Type: TypeStream, Op: OpRequest}
	tests := []struct {
		name       string
		edit       func(h *Header)
		payloadLen int
		want       verdict
	}{
		{"request", func(h *Header) {}, 0, accept},
		{"rw", func(h *Header) { h.Op, h.Len = OpRW, 100 }, 100, accept},
		{"rw max", func(h *Header) { h.Op, h.Len = OpRW, MaxPayload }, MaxPayload, accept},
		{"rw too big", func(h *Header) { h.Op, h.Len = OpRW, MaxPayload+1 }, MaxPayload + 1, drop},
		{"len larger than chain", func(h *Header) { h.Op, h.Len = OpRW, 100 }, 99, drop},
		{"len smaller than chain", func(h *Header) { h.Op, h.Len = OpRW, 100 }, 101, drop},
		{"wrong source cid", func(h *Header) { h.SrcCID = 4 }, 0, drop},
		{"host source cid", func(h *Header) { h.SrcCID = HostCID }, 0, drop},
		{"wrong destination cid", func(h *Header) { h.DstCID = 3 }, 0, reset},
		{"seqpacket", func(h *Header) { h.Type = 2 }, 0, reset},
		{"type zero", func(h *Header) { h.Type = 0 }, 0, reset},
		{"op invalid", func(h *Header) { h.Op = OpInvalid }, 0, reset},
		{"op unknown", func(h *Header) { h.Op = 8 }, 0, reset},
		{"control with payload", func(h *Header) { h.Op, h.Len = OpCreditUpdate, 4 }, 4, reset},
		{"rst", func(h *Header) { h.Op = OpRST }, 0, accept},
		{"shutdown", func(h *Header) { h.Op, h.Flags = OpShutdown, ShutdownSend }, 0, accept},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := good
			tt.edit(&h)
			got, why := checkTx(&h, 3, tt.payloadLen)
			assert.Equal(t, tt.want, got, why)
			if got != accept {
				assert.NotEmpty(t, why)
			}
		})
	}
}

func TestGatherScatter(t *testing.T) {
	data := []byte("0123456789abcdefghij")
	splits := [][]int{{20}, {1, 19}, {5, 0, 5, 10}, {3, 3, 3, 3, 3, 5}, {19, 1}}
	for _, split := range splits {
		var bufs [][]byte
		off := 0
		for _, n := range split {
			bufs = append(bufs, data[off:off+n])
			off += n
		}
		var first [7]byte
		idx, o, ok := gather(bufs, first[:])
		require.True(t, ok, "split %v", split)
		assert.Equal(t, data[:7], first[:])
		var rest []byte
		if idx < len(bufs) {
			rest = append(rest, bufs[idx][o:]...)
			for _, b := range bufs[idx+1:] {
				rest = append(rest, b...)
			}
		}
		assert.Equal(t, data[7:], rest, "split %v", split)

		var out [][]byte
		for _, n := range split {
			out = append(out, make([]byte, n))
		}
		s := scatter{bufs: out}
		assert.Equal(t, 7, s.write(data[:7]))
		assert.Equal(t, 13, s.write(data[7:]))
		assert.Equal(t, 0, s.write([]byte("x")), "no room left")
		assert.Equal(t, data, bytes.Join(out, nil))
	}
	_, _, ok := gather([][]byte{make([]byte, 3)}, make([]byte, 4))
	assert.False(t, ok)
}

func TestRing(t *testing.T) {
	r := ring{size: 8}
	assert.Equal(t, 0, r.write(nil))
	assert.Nil(t, r.buf, "storage is allocated lazily")
	assert.Equal(t, 5, r.write([]byte("abcde")))
	p := make([]byte, 3)
	assert.Equal(t, 3, r.read(p))
	assert.Equal(t, "abc", string(p))
	assert.Equal(t, 6, r.write([]byte("fghijklmn")), "bounded by free space")
	assert.Equal(t, 8, r.len())
	assert.Equal(t, 0, r.avail())
	a, b := r.peek(8)
	assert.Equal(t, "defghijk", string(a)+string(b))
	assert.NotEmpty(t, b, "the data wraps")
	r.discard(4)
	got := make([]byte, 10)
	n := r.read(got)
	assert.Equal(t, "hijk", string(got[:n]))
	r.free()
	assert.Equal(t, 0, r.len())
	assert.Nil(t, r.buf)
}
