package vmlinux

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testELF is a minimal ELF64 executable whose one PT_NOTE segment holds
// the given notes, followed by filler so it compresses to something.
func testELF(t *testing.T, notes ...note) []byte {
	t.Helper()
	var seg bytes.Buffer
	for _, n := range notes {
		binary.Write(&seg, binary.LittleEndian, []uint32{uint32(len(n.name) + 1), uint32(len(n.desc)), n.typ})
		seg.WriteString(n.name + "\x00")
		seg.Write(make([]byte, align4(uint64(len(n.name)+1))-uint64(len(n.name)+1)))
		seg.Write(n.desc)
		seg.Write(make([]byte, align4(uint64(len(n.desc)))-uint64(len(n.desc))))
	}
	const ehsize, phentsize = 64, 56
	var b bytes.Buffer
	ident := [16]byte{0x7f, 'E', 'L', 'F', 2 /* 64-bit */, 1 /* LSB */, 1 /* version */}
	b.Write(ident[:])
	le := binary.LittleEndian
	binary.Write(&b, le, uint16(2))    // e_type: EXEC
	binary.Write(&b, le, uint16(0x3e)) // e_machine: x86-64
	binary.Write(&b, le, uint32(1))    // e_version
	binary.Write(&b, le, uint64(0x1000000))
	binary.Write(&b, le, uint64(ehsize)) // e_phoff
	binary.Write(&b, le, uint64(0))      // e_shoff
	binary.Write(&b, le, uint32(0))      // e_flags
	binary.Write(&b, le, []uint16{ehsize, phentsize, 1, 64, 0, 0})
	// The one program header: PT_NOTE right after it.
	off := uint64(ehsize + phentsize)
	binary.Write(&b, le, []uint32{4 /* PT_NOTE */, 4 /* PF_R */})
	binary.Write(&b, le, []uint64{off, 0, 0, uint64(seg.Len()), uint64(seg.Len()), 4})
	require.Equal(t, int(off), b.Len())
	b.Write(seg.Bytes())
	b.Write(bytes.Repeat([]byte("kernel text "), 1000))
	return b.Bytes()
}

type note struct {
	name string
	typ  uint32
	desc []byte
}

var pvhNote = note{"Xen", xenNotePhys32Entry, []byte{0, 0, 0, 1}}

func gzipped(t *testing.T, data []byte) []byte {
	var b bytes.Buffer
	w := gzip.NewWriter(&b)
	_, err := w.Write(data)
	require.NoError(t, err)
	require.NoError(t, w.Close())
	return b.Bytes()
}

func zstded(t *testing.T, data []byte) []byte {
	w, err := zstd.NewWriter(nil)
	require.NoError(t, err)
	defer w.Close()
	return w.EncodeAll(data, nil)
}

// corruptCRC flips a bit in the compressed stream's last 4 bytes before
// any appended size: gzip's CRC32 is in its trailer's first half, zstd's
// content checksum ends the frame.
func corruptCRC(compressed []byte) []byte {
	c := append([]byte(nil), compressed...)
	if c[0] == 0x1f { // gzip: CRC32, then ISIZE
		c[len(c)-8] ^= 1
	} else {
		c[len(c)-1] ^= 1
	}
	return c
}

// truncatedNotes is elf with its note segment's size field pointing past
// the file's end (and far beyond).
func truncatedNotes(t *testing.T, elfFile []byte) []byte {
	t.Helper()
	c := append([]byte(nil), elfFile...)
	const phoff = 64
	// p_filesz is at offset 32 of the 64-bit program header.
	binary.LittleEndian.PutUint64(c[phoff+32:], 1<<40)
	return c
}

// bzImage lays out a setup header with setupSects sectors of setup
// before the protected-mode code, which starts with the payload after
// 16 bytes of decompressor stub, then a tail.
func bzImage(payload []byte, version uint16, setupSects byte) []byte {
	pm := (int(max(setupSects, 1)) + 1) * 512
	if setupSects == 0 {
		pm = 5 * 512
	}
	bz := make([]byte, pm+16+len(payload)+64)
	bz[offSetupSects] = setupSects
	copy(bz[offHeaderMagic:], "HdrS")
	binary.LittleEndian.PutUint16(bz[offVersion:], version)
	binary.LittleEndian.PutUint32(bz[offPayloadOffset:], 16)
	binary.LittleEndian.PutUint32(bz[offPayloadLength:], uint32(len(payload)))
	copy(bz[pm+16:], payload)
	return bz
}

// withSize appends the uncompressed size as the kernel's build does.
func withSize(compressed []byte, size int) []byte {
	return binary.LittleEndian.AppendUint32(append([]byte(nil), compressed...), uint32(size))
}

func TestExtract(t *testing.T) {
	kernel := testELF(t, note{"Linux", 6, []byte("6.12")}, pvhNote)
	noPVH := testELF(t, note{"Xen", 17, []byte{1, 2, 3, 4}}, note{"Linux", xenNotePhys32Entry, []byte{0, 0, 0, 1}})
	tests := []struct {
		name    string
		bz      []byte
		want    []byte
		wantErr string
	}{
		{"zstd", bzImage(withSize(zstded(t, kernel), len(kernel)), 0x020f, 27), kernel, ""},
		// The kernel's build appends no size to a gzip payload: gzip's
		// own trailer ends with it.
		{"gzip", bzImage(gzipped(t, kernel), 0x020f, 27), kernel, ""},
		{"gzip with a bad CRC", bzImage(corruptCRC(gzipped(t, kernel)), 0x020f, 27), nil, "at its end"},
		{"zstd with a bad checksum", bzImage(withSize(corruptCRC(zstded(t, kernel)), len(kernel)), 0x020f, 27), nil, "zstd payload"},
		{"note segment past the end", bzImage(withSize(zstded(t, truncatedNotes(t, kernel)), len(kernel)), 0x020f, 27), nil, "runs past the file's end"},
		{"setup_sects 0 means 4", bzImage(withSize(zstded(t, kernel), len(kernel)), 0x0208, 0), kernel, ""},
		{"no PVH note", bzImage(withSize(zstded(t, noPVH), len(noPVH)), 0x020f, 27), nil, "no PVH entry point"},
		{"not ELF", bzImage(withSize(zstded(t, []byte("plain text, no ELF header at all")), 32), 0x020f, 1), nil, "not an ELF file"},
		{"xz is not read", bzImage(withSize([]byte{0xfd, '7', 'z', 'X', 'Z', 0, 1, 2, 3}, 100), 0x020f, 1), nil, "compression (xz)"},
		{"unknown compression", bzImage(withSize([]byte("????????"), 100), 0x020f, 1), nil, "compression (unknown)"},
		{"size field too small", bzImage(withSize(zstded(t, kernel), len(kernel)-1), 0x020f, 1), nil, "longer than"},
		{"size field too large", bzImage(withSize(zstded(t, kernel), len(kernel)+1), 0x020f, 1), nil, "decompressing the zstd payload"},
		{"size field beyond the bound", bzImage(withSize(zstded(t, kernel), MaxKernelSize+1), 0x020f, 1), nil, "claims"},
		{"corrupt zstd", bzImage(withSize(append([]byte{0x28, 0xb5, 0x2f, 0xfd}, bytes.Repeat([]byte{0xff}, 64)...), 1000), 0x020f, 1), nil, "zstd"},
		{"old boot protocol", bzImage(withSize(zstded(t, kernel), len(kernel)), 0x0207, 1), nil, "2.08"},
		{"not a bzImage", kernel, nil, "not a bzImage"},
		{"short file", []byte("HdrS"), nil, "not a bzImage"},
		{"empty payload", bzImage(nil, 0x020f, 1), nil, "payload is 0 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Extract(tt.bz)
			if tt.wantErr != "" {
				require.ErrorIs(t, err, ErrUnsupported)
				assert.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestExtractPayloadPastEnd(t *testing.T) {
	bz := bzImage(withSize(zstded(t, []byte("x")), 1), 0x020f, 1)
	binary.LittleEndian.PutUint32(bz[offPayloadLength:], 0xffffffff)
	_, err := Extract(bz)
	require.ErrorIs(t, err, ErrUnsupported)
	assert.ErrorContains(t, err, "runs past the bzImage's end")
}

func TestHasNote(t *testing.T) {
	le := binary.LittleEndian
	hdr := func(namesz, descsz, typ uint32) []byte {
		return le.AppendUint32(le.AppendUint32(le.AppendUint32(nil, namesz), descsz), typ)
	}
	tests := []struct {
		name string
		data []byte
		want bool
	}{
		{"match", append(hdr(4, 4, 18), "Xen\x00\x01\x02\x03\x04"...), true},
		{"second note", append(append(hdr(6, 0, 1), "Linux\x00\x00\x00"...), append(hdr(4, 0, 18), "Xen\x00"...)...), true},
		{"wrong type", append(hdr(4, 4, 17), "Xen\x00\x01\x02\x03\x04"...), false},
		{"name not terminated", append(hdr(3, 0, 18), "Xen\x00"...), false},
		{"descsz past the end", append(hdr(4, 0xfffffff0, 18), "Xen\x00"...), false},
		{"namesz past the end", append(hdr(0xffffffff, 0, 18), "Xen\x00"...), false},
		{"truncated header", []byte{4, 0, 0}, false},
		{"empty", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, hasNote(tt.data, le, xenNoteName, xenNotePhys32Entry))
		})
	}
}

func TestExtractFile(t *testing.T) {
	kernel := testELF(t, pvhNote)
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "vmlinux")
	require.NoError(t, os.WriteFile(src, bzImage(withSize(zstded(t, kernel), len(kernel)), 0x020f, 27), 0o644))
	require.NoError(t, ExtractFile(src, dst))
	got, err := os.ReadFile(dst)
	require.NoError(t, err)
	assert.Equal(t, kernel, got)

	err = ExtractFile(filepath.Join(dir, "missing"), dst)
	require.Error(t, err)
	assert.NotErrorIs(t, err, ErrUnsupported, "a missing file is an I/O error, not an unsupported kernel")
}

// TestExtractRealKernel checks a distribution kernel when one is given
// (VMHARNESS_TEST_BZIMAGE, e.g. a built image's vmlinuz).
func TestExtractRealKernel(t *testing.T) {
	path := os.Getenv("VMHARNESS_TEST_BZIMAGE")
	if path == "" {
		t.Skip("set VMHARNESS_TEST_BZIMAGE to a bzImage to check a real kernel")
	}
	bz, err := os.ReadFile(path)
	require.NoError(t, err)
	kernel, err := Extract(bz)
	require.NoError(t, err)
	assert.Greater(t, len(kernel), len(bz), "the kernel is bigger than its compressed image")
}
