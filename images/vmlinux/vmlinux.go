// Package vmlinux takes the uncompressed kernel out of an x86 bzImage and
// checks that it can be started through its PVH entry point.
//
// QEMU boots such an ELF kernel directly (-kernel vmlinux, through its
// pvh.bin option ROM), so the guest skips the bzImage's decompressor and
// real-mode setup. Under TCG the decompressor is slow: unpacking Debian's
// 57 MB zstd-compressed kernel took about 0.8 s of every boot on the
// machine this was written on (bench/README.md).
package vmlinux

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/klauspost/compress/zstd"
)

// ErrUnsupported is wrapped by every error that says the bzImage cannot
// be turned into a PVH kernel (not a bzImage, a compression this package
// does not read, no PVH entry point). The kernel still boots as a
// bzImage then; only I/O errors are worth failing a build for.
var ErrUnsupported = errors.New("no PVH kernel")

// MaxKernelSize bounds the uncompressed kernel the payload may claim,
// so a corrupt size field cannot make Extract allocate without limit.
const MaxKernelSize = 512 << 20

// Offsets in the bzImage's setup header (Documentation/arch/x86/boot.rst).
const (
	offSetupSects    = 0x1f1
	offHeaderMagic   = 0x202
	offVersion       = 0x206
	offPayloadOffset = 0x248
	offPayloadLength = 0x24c
	headerEnd        = 0x250
	// minVersion is the boot protocol that added payload_offset and
	// payload_length (2.08).
	minVersion = 0x0208
)

// compression formats the kernel's build may use, by payload magic.
var formats = []struct {
	name  string
	magic []byte
}{
	{"gzip", []byte{0x1f, 0x8b}},
	{"zstd", []byte{0x28, 0xb5, 0x2f, 0xfd}},
	{"xz", []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}},
	{"bzip2", []byte("BZh")},
	{"lz4", []byte{0x02, 0x21, 0x4c, 0x18}},
	{"lzo", []byte{0x89, 'L', 'Z', 'O'}},
	{"lzma", []byte{0x5d, 0x00}},
}

// Extract returns the ELF kernel inside bzImage after checking that it
// has a PVH entry point.
func Extract(bzImage []byte) ([]byte, error) {
	payload, err := payload(bzImage)
	if err != nil {
		return nil, err
	}
	if len(payload) < 8 {
		return nil, fmt.Errorf("%w: the bzImage's payload is %d bytes", ErrUnsupported, len(payload))
	}
	name := format(payload)
	// The last 4 bytes hold the uncompressed size, little-endian: the
	// kernel's build appends them to every payload but gzip's, whose own
	// trailer ends with the size (ISIZE, modulo 2^32).
	size := binary.LittleEndian.Uint32(payload[len(payload)-4:])
	compressed := payload
	if name != "gzip" {
		compressed = payload[:len(payload)-4]
	}
	if size == 0 || size > MaxKernelSize {
		return nil, fmt.Errorf("%w: the bzImage's payload claims %d bytes uncompressed (at most %d)", ErrUnsupported, size, MaxKernelSize)
	}
	r, err := decompressor(name, compressed)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	kernel := make([]byte, size)
	if _, err := io.ReadFull(r, kernel); err != nil {
		return nil, fmt.Errorf("%w: decompressing the %s payload: %v", ErrUnsupported, name, err)
	}
	// Exactly size bytes, and the stream's end, where the decoder checks
	// the payload's checksum.
	switch n, err := r.Read(make([]byte, 1)); {
	case n != 0:
		return nil, fmt.Errorf("%w: the %s payload is longer than the %d bytes its size field says", ErrUnsupported, name, size)
	case err != io.EOF:
		return nil, fmt.Errorf("%w: decompressing the %s payload: at its end: %v", ErrUnsupported, name, err)
	}
	ok, err := HasPVHEntry(kernel)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w: the kernel has no PVH entry point (a Xen ELF note of type XEN_ELFNOTE_PHYS32_ENTRY; the kernel needs CONFIG_PVH)", ErrUnsupported)
	}
	return kernel, nil
}

// ExtractFile writes the PVH kernel inside the bzImage at src to dst
// (mode 0644), replacing dst.
func ExtractFile(src, dst string) error {
	bz, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	kernel, err := Extract(bz)
	if err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	if err := os.WriteFile(dst, kernel, 0o644); err != nil {
		return fmt.Errorf("writing the uncompressed kernel: %w", err)
	}
	return nil
}

// payload returns the compressed kernel the setup header points at.
func payload(bz []byte) ([]byte, error) {
	if len(bz) < headerEnd || string(bz[offHeaderMagic:offHeaderMagic+4]) != "HdrS" {
		return nil, fmt.Errorf("%w: not a bzImage (no \"HdrS\" setup header)", ErrUnsupported)
	}
	if v := binary.LittleEndian.Uint16(bz[offVersion:]); v < minVersion {
		return nil, fmt.Errorf("%w: boot protocol %d.%02d has no payload fields (need 2.08)", ErrUnsupported, v>>8, v&0xff)
	}
	setupSects := uint64(bz[offSetupSects])
	if setupSects == 0 {
		setupSects = 4
	}
	start := (setupSects+1)*512 + uint64(binary.LittleEndian.Uint32(bz[offPayloadOffset:]))
	end := start + uint64(binary.LittleEndian.Uint32(bz[offPayloadLength:]))
	if end > uint64(len(bz)) {
		return nil, fmt.Errorf("%w: the payload (bytes %d-%d) runs past the bzImage's end (%d)", ErrUnsupported, start, end, len(bz))
	}
	return bz[start:end], nil
}

// format names the payload's compression by its magic, or "unknown".
func format(payload []byte) string {
	for _, f := range formats {
		if bytes.HasPrefix(payload, f.magic) {
			return f.name
		}
	}
	return "unknown"
}

// decompressor reads the compressed payload of the named format.
func decompressor(name string, compressed []byte) (io.ReadCloser, error) {
	switch name {
	case "gzip":
		r, err := gzip.NewReader(bytes.NewReader(compressed))
		if err != nil {
			return nil, fmt.Errorf("%w: gzip payload: %v", ErrUnsupported, err)
		}
		r.Multistream(false)
		return r, nil
	case "zstd":
		d, err := zstd.NewReader(bytes.NewReader(compressed), zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(MaxKernelSize))
		if err != nil {
			return nil, fmt.Errorf("%w: zstd payload: %v", ErrUnsupported, err)
		}
		return zstdReadCloser{d}, nil
	}
	return nil, fmt.Errorf("%w: the payload's compression (%s) is not one this harness reads (gzip, zstd)", ErrUnsupported, name)
}

// zstdReadCloser adapts zstd.Decoder, whose Close returns nothing.
type zstdReadCloser struct{ *zstd.Decoder }

// Close releases the decoder's buffers; it cannot fail.
func (z zstdReadCloser) Close() error { z.Decoder.Close(); return nil }

// Xen's ELF note for the 32-bit PVH entry point (xen/include/public/elfnote.h).
const (
	xenNoteName        = "Xen"
	xenNotePhys32Entry = 18
)

// HasPVHEntry reports whether the ELF file has a PVH entry point note.
// An input that is not an ELF file is an ErrUnsupported error.
func HasPVHEntry(elfFile []byte) (bool, error) {
	f, err := elf.NewFile(bytes.NewReader(elfFile))
	if err != nil {
		return false, fmt.Errorf("%w: the payload is not an ELF file: %v", ErrUnsupported, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		// A note segment lies inside the file: a larger size field is
		// corrupt, and must not decide how much is allocated.
		if p.Off > uint64(len(elfFile)) || p.Filesz > uint64(len(elfFile))-p.Off {
			return false, fmt.Errorf("%w: an ELF note segment (%d bytes at %d) runs past the file's end (%d)", ErrUnsupported, p.Filesz, p.Off, len(elfFile))
		}
		if hasNote(elfFile[p.Off:p.Off+p.Filesz], f.ByteOrder, xenNoteName, xenNotePhys32Entry) {
			return true, nil
		}
	}
	return false, nil
}

// hasNote walks a note segment (namesz, descsz, type, then name and desc
// each padded to 4 bytes) for a note of the given name and type.
func hasNote(data []byte, order binary.ByteOrder, name string, typ uint32) bool {
	for len(data) >= 12 {
		namesz, descsz, t := uint64(order.Uint32(data)), uint64(order.Uint32(data[4:])), order.Uint32(data[8:])
		data = data[12:]
		end := align4(namesz) + align4(descsz)
		if end > uint64(len(data)) {
			return false
		}
		if t == typ && namesz == uint64(len(name))+1 && string(data[:namesz]) == name+"\x00" {
			return true
		}
		data = data[end:]
	}
	return false
}

// align4 rounds n up to the 4-byte alignment of ELF note fields.
func align4(n uint64) uint64 { return (n + 3) &^ 3 }
