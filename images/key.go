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
const FormatVersion = 3

// Key returns the recipe's cache key: a hex SHA-256 over FormatVersion, the
// merged recipe's fields and every file of the merged files directories
// (path, type, mode and contents, in lexical path order). It covers the
// whole chain of bases, since everything they give is merged in, and no
// path of the machine, so copies of a recipe share one image.
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
	err = r.walkFiles(func(rel string, e treeEntry, mode fs.FileMode) error {
		writeField(h, rel)
		writeField(h, fmt.Sprintf("%o", uint32(mode)))
		if e.dir {
			return nil
		}
		f, err := e.fsys.Open(rel)
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

// walkFiles calls fn for every directory and regular file of the merged
// files directories, in lexical path order, with the mode it gets in the
// image.
func (r *Recipe) walkFiles(fn func(rel string, e treeEntry, mode fs.FileMode) error) error {
	for _, rel := range sortedKeys(r.tree) {
		e := r.tree[rel]
		mode := fs.ModeDir | 0o755
		if !e.dir {
			var err error
			if mode, err = r.fileMode(rel); err != nil {
				return err
			}
		}
		if err := fn(rel, e, mode); err != nil {
			return err
		}
	}
	return nil
}

// hasFilesTar says whether the build has files to copy into the tree.
func (r *Recipe) hasFilesTar() bool {
	if len(r.Sysusers) > 0 {
		return true
	}
	for _, e := range r.tree {
		if !e.dir {
			return true
		}
	}
	return false
}

// writeFilesTar writes the recipe's regular files, and SysusersConf if it
// has sysusers lines, as a tar archive rooted at "/", every entry owned by
// root, for mmdebstrap's tar-in hook. Directories get no entries of their
// own: an entry for ./etc/ would reset the tree's existing directories'
// modes and times; tar creates missing ones as 0755.
func (r *Recipe) writeFilesTar(w io.Writer) error {
	tw := tar.NewWriter(w)
	// A fixed time keeps the tree independent of the checkout's mtimes.
	epoch := time.Unix(0, 0)
	add := func(rel string, mode fs.FileMode, data []byte) error {
		hdr := &tar.Header{Name: "./" + rel, Typeflag: tar.TypeReg, Mode: int64(mode.Perm()), Size: int64(len(data)),
			ModTime: epoch, Uname: "root", Gname: "root", Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	err := r.walkFiles(func(rel string, e treeEntry, mode fs.FileMode) error {
		if e.dir {
			return nil
		}
		data, err := fs.ReadFile(e.fsys, rel)
		if err != nil {
			return err
		}
		return add(rel, mode, data)
	})
	if err == nil && len(r.Sysusers) > 0 {
		err = add(SysusersConf, 0o644, r.sysusersConf())
	}
	if err != nil {
		return fmt.Errorf("image recipe %s: pack files: %w", r.source, err)
	}
	return tw.Close()
}
