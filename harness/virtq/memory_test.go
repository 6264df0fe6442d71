package virtq

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNewMemoryValidation(t *testing.T) {
	buf := func(n int) []byte { return make([]byte, n) }
	tests := []struct {
		name    string
		regions []MemoryRegion
		wantErr string
	}{
		{"single", []MemoryRegion{{GuestAddr: 0, UserAddr: 0x1000, Data: buf(4096)}}, ""},
		{"disjoint", []MemoryRegion{{GuestAddr: 0x10000, UserAddr: 0x10000, Data: buf(16)}, {GuestAddr: 0, UserAddr: 0, Data: buf(16)}}, ""},
		{"adjacent", []MemoryRegion{{GuestAddr: 0, UserAddr: 0, Data: buf(16)}, {GuestAddr: 16, UserAddr: 16, Data: buf(16)}}, ""},
		{"empty region", []MemoryRegion{{Data: nil}}, "empty"},
		{"guest overflow", []MemoryRegion{{GuestAddr: ^uint64(0) - 7, Data: buf(16)}}, "overflows"},
		{"user overflow", []MemoryRegion{{UserAddr: ^uint64(0) - 7, Data: buf(16)}}, "overflows"},
		{"ends at top", []MemoryRegion{{GuestAddr: ^uint64(0) - 15, UserAddr: ^uint64(0) - 15, Data: buf(16)}}, ""},
		{"guest overlap", []MemoryRegion{{GuestAddr: 0, UserAddr: 0, Data: buf(16)}, {GuestAddr: 15, UserAddr: 100, Data: buf(16)}}, "overlap at guest"},
		{"same base", []MemoryRegion{{GuestAddr: 0, UserAddr: 0, Data: buf(16)}, {GuestAddr: 0, UserAddr: 100, Data: buf(16)}}, "overlap at guest"},
		{"user overlap", []MemoryRegion{{GuestAddr: 0, UserAddr: 0, Data: buf(16)}, {GuestAddr: 100, UserAddr: 8, Data: buf(16)}}, "overlap at user"},
		{"too many", make([]MemoryRegion, MaxRegions+1), "limit"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := NewMemory(tt.regions)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			require.NoError(t, m.Close())
		})
	}
}

func TestMemoryTranslate(t *testing.T) {
	low := make([]byte, 0x1000)
	high := make([]byte, 0x1000)
	next := make([]byte, 0x1000)
	for i := range low {
		low[i], high[i], next[i] = 1, 2, 3
	}
	m, err := NewMemory([]MemoryRegion{
		{GuestAddr: 0, UserAddr: 0x7000_0000, Data: low},
		{GuestAddr: 0x1_0000_0000, UserAddr: 0x7100_0000, Data: high},
		{GuestAddr: 0x1_0000_1000, UserAddr: 0x7200_0000, Data: next}, // guest-adjacent to high
	})
	require.NoError(t, err)

	tests := []struct {
		name      string
		addr, n   uint64
		user      bool
		wantFirst byte
		wantErr   bool
	}{
		{"guest start", 0, 16, false, 1, false},
		{"guest end exact", 0xff0, 16, false, 1, false},
		{"guest crosses end", 0xff8, 16, false, 0, true},
		{"guest in hole", 0x2000, 1, false, 0, true},
		{"guest high", 0x1_0000_0010, 8, false, 2, false},
		{"guest spanning regions refused", 0x1_0000_0ff0, 0x20, false, 0, true},
		{"guest huge length", 0, ^uint64(0), false, 0, true},
		{"guest top of address space", ^uint64(0), 1, false, 0, true},
		{"user low", 0x7000_0100, 8, true, 1, false},
		{"user below", 0x6fff_ffff, 1, true, 0, true},
		{"user high", 0x7100_0000, 0x1000, true, 2, false},
		{"user gap", 0x7000_1000, 1, true, 0, true},
		{"zero length inside", 0x10, 0, false, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b []byte
			var err error
			if tt.user {
				b, err = m.User(tt.addr, tt.n)
			} else {
				b, err = m.Guest(tt.addr, tt.n)
			}
			if tt.wantErr {
				require.ErrorIs(t, err, ErrOutOfRange)
				return
			}
			require.NoError(t, err)
			require.Len(t, b, int(tt.n))
			require.Equal(t, int(tt.n), cap(b), "translated slices must not reach past the buffer")
			if tt.n > 0 {
				assert.Equal(t, tt.wantFirst, b[0])
			}
		})
	}
}

func TestMemoryAppendGuestSpansRegions(t *testing.T) {
	a, b := make([]byte, 16), make([]byte, 16)
	m, err := NewMemory([]MemoryRegion{{GuestAddr: 0, UserAddr: 0, Data: a}, {GuestAddr: 16, UserAddr: 100, Data: b}})
	require.NoError(t, err)

	segs, err := m.AppendGuest(nil, 8, 16)
	require.NoError(t, err)
	require.Len(t, segs, 2)
	assert.Len(t, segs[0], 8)
	assert.Len(t, segs[1], 8)

	_, err = m.AppendGuest(nil, 8, 32)
	require.ErrorIs(t, err, ErrOutOfRange)

	segs, err = m.AppendGuest(nil, 40, 0)
	require.NoError(t, err, "a zero-length buffer needs no memory")
	assert.Empty(t, segs)
}
