package images

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"time"
)

// FormatVersion identifies the build procedure. Bump it whenever a change to
// the builder would produce a different image from the same recipe, so caches
// built by older binaries are not reused.
const FormatVersion = 1

// Key returns the recipe's cache key: a hex SHA-256 over FormatVersion, the
// recipe's fields and every file under its files directory (path, type, mode
// and contents, in lexical path order).
func (r *Recipe) Key() (string, error) {
	h := sha256.New()
	writeField(h, fmt.Sprintf("vmharness image format %d", FormatVersion))
	// encoding/json writes struct fields in declaration order and map keys
	// sorted, so this encoding is stable.
	spec, err := json.Marshal(r)
	if err != nil {
		return "", fmt.Errorf("image recipe %s: encode: %w", r.source, err)
	}
	writeField(h, string(spec))
	err = r.walkFiles(func(rel string, d fs.DirEntry, mode fs.FileMode) error {
		writeField(h, rel)
		writeField(h, fmt.Sprintf("%o", uint32(mode)))
		if d.IsDir() {
			return nil
		}
		f, err := r.files.Open(rel)
		if err != nil {
			return err
		}
		defer f.Close()
		info, err := f.Stat()
		if err != nil {
			return err
		}
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(info.Size()))
		h.Write(n[:])
		_, err = io.Copy(h, f)
		return err
	})
	if err != nil {
		return "", fmt.Errorf("image recipe %s: hash files: %w", r.source, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// writeField writes s length-prefixed, so adjacent fields cannot run into
// each other and collide.
func writeField(h hash.Hash, s string) {
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(s)))
	h.Write(n[:])
	h.Write([]byte(s))
}

// walkFiles calls fn for every directory and regular file under the recipe's
// files directory, in lexical order, with the mode it gets in the image.
// Anything else (symlinks, devices) is rejected: the image would depend on
// how the checkout stores it.
func (r *Recipe) walkFiles(fn func(rel string, d fs.DirEntry, mode fs.FileMode) error) error {
	if r.files == nil {
		return nil
	}
	return fs.WalkDir(r.files, ".", func(rel string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if rel == "." {
			return nil
		}
		switch {
		case d.IsDir():
			return fn(rel, d, fs.ModeDir|0o755)
		case d.Type().IsRegular():
			mode, err := r.fileMode(rel)
			if err != nil {
				return err
			}
			return fn(rel, d, mode)
		default:
			return fmt.Errorf("%s: only regular files and directories are supported (type %v); create links with enable_units or a package", rel, d.Type())
		}
	})
}

// writeFilesTar writes the recipe's regular files as a tar archive rooted at
// "/", every entry owned by root, for mmdebstrap's tar-in hook. Directories
// get no entries of their own: an entry for ./etc/ would reset the tree's
// existing directories' modes and times; tar creates missing ones as 0755.
func (r *Recipe) writeFilesTar(w io.Writer) error {
	tw := tar.NewWriter(w)
	// A fixed time keeps the tree independent of the checkout's mtimes.
	epoch := time.Unix(0, 0)
	err := r.walkFiles(func(rel string, d fs.DirEntry, mode fs.FileMode) error {
		hdr := &tar.Header{Name: "./" + rel, Mode: int64(mode.Perm()), ModTime: epoch, Uname: "root", Gname: "root", Format: tar.FormatPAX}
		if d.IsDir() {
			return nil
		}
		data, err := fs.ReadFile(r.files, rel)
		if err != nil {
			return err
		}
		hdr.Typeflag = tar.TypeReg
		hdr.Size = int64(len(data))
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		_, err = tw.Write(data)
		return err
	})
	if err != nil {
		return fmt.Errorf("image recipe %s: pack files: %w", r.source, err)
	}
	return tw.Close()
}
