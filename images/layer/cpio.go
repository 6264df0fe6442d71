package layer

import (
	"fmt"
	"io"
	"os"
)

// Type bits of a newc c_mode (the same as st_mode's on Linux).
const (
	modeDir     = 0o040000
	modeRegular = 0o100000
	modeSymlink = 0o120000
	modeType    = 0o170000
)

// entry is one member of the archive.
type entry struct {
	// name is the slash-separated path relative to the guest's root, without
	// a leading "/" or "./".
	name string
	// mode is the newc c_mode: type bits and permissions, including the
	// setuid, setgid and sticky bits.
	mode uint32
	// target is a symlink's target, stored verbatim.
	target string
	// src is the file a regular entry's data is read from; size is its
	// length. A hard link that does not carry its group's data has no src
	// and size 0.
	src  string
	size int64
	// ino and nlink tie the members of a hard-link group together: newc
	// stores the data once, with the group's last member, and extractors
	// link the earlier members to it.
	ino, nlink uint32
}

// trailerName ends every newc archive.
const trailerName = "TRAILER!!!"

// sectorSize is what the archive's length is padded to: QEMU shows the file
// to the guest as a disk of whole sectors.
const sectorSize = 512

// writeArchive writes entries as a newc cpio archive to w, in order, owned by
// uid and gid 0, with mtime 0, and returns the number of bytes written.
func writeArchive(w io.Writer, entries []entry) (int64, error) {
	cw := &countingWriter{w: w}
	for i := range entries {
		if err := writeEntry(cw, &entries[i]); err != nil {
			return cw.n, err
		}
	}
	if err := writeHeader(cw, &entry{name: trailerName, nlink: 1}, 0); err != nil {
		return cw.n, err
	}
	if err := writePad(cw, sectorSize); err != nil {
		return cw.n, err
	}
	return cw.n, nil
}

func writeEntry(w *countingWriter, e *entry) error {
	switch e.mode & modeType {
	case modeSymlink:
		if err := writeHeader(w, e, int64(len(e.target))); err != nil {
			return err
		}
		if _, err := io.WriteString(w, e.target); err != nil {
			return err
		}
	case modeRegular:
		if err := writeHeader(w, e, e.size); err != nil {
			return err
		}
		if e.src != "" {
			if err := copyFile(w, e.src, e.size); err != nil {
				return err
			}
		}
	default:
		if err := writeHeader(w, e, 0); err != nil {
			return err
		}
	}
	return writePad(w, 4)
}

// writeHeader writes the 110-byte newc header and the NUL-terminated name,
// padded to a multiple of four bytes.
func writeHeader(w *countingWriter, e *entry, size int64) error {
	if size > 0xffffffff {
		return fmt.Errorf("%s: %d bytes do not fit a cpio archive", e.name, size)
	}
	_, err := fmt.Fprintf(w, "070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%s\x00",
		e.ino, e.mode, 0, 0, e.nlink, 0, size, 0, 0, 0, 0, len(e.name)+1, 0, e.name)
	if err != nil {
		return err
	}
	return writePad(w, 4)
}

// copyFile copies the size bytes of path into w and fails if the file has
// another length than it had when the tree was scanned.
func copyFile(w io.Writer, path string, size int64) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := io.Copy(w, io.LimitReader(f, size))
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	var extra [1]byte
	if m, _ := f.Read(extra[:]); n != size || m != 0 {
		return fmt.Errorf("%s changed while the layer was written (%d bytes, expected %d)", path, n, size)
	}
	return nil
}

var zeros [sectorSize]byte

// writePad pads the output to a multiple of align bytes.
func writePad(w *countingWriter, align int64) error {
	if r := w.n % align; r != 0 {
		_, err := w.Write(zeros[:align-r])
		return err
	}
	return nil
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	return n, err
}
