// Command diskfs-ext4 is bench/rootless-ext4.sh's helper for the two
// rootless ways of writing an ext4 image that vmharness does not use. It
// is its own module, so that vmharness itself does not depend on go-diskfs.
//
//	diskfs-ext4 write ROOTFS.TAR IMAGE SIZE_BYTES
//
// writes the tarball with github.com/diskfs/go-diskfs v1.9.4's ext4
// writer: every directory, regular file and symlink with its owner and
// mode, counting what the library cannot write (device nodes, hard links,
// extended attributes).
//
//	diskfs-ext4 debugfs-script ROOTFS.TAR XATTR_DIR
//
// prints a debugfs script that gives every path of an image made by
// mkfs.ext4 -d from the tarball unpacked without root the tarball's
// owner, group and mode, creates its device nodes and sets its extended
// attributes (values written to files in XATTR_DIR for ea_set -f).
package main

import (
	"archive/tar"
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	diskfs "github.com/diskfs/go-diskfs"
	"github.com/diskfs/go-diskfs/disk"
	"github.com/diskfs/go-diskfs/filesystem"
)

func main() {
	if len(os.Args) == 4 && os.Args[1] == "debugfs-script" {
		if err := debugfsScript(os.Args[2], os.Args[3]); err != nil {
			fail(err)
		}
		return
	}
	if len(os.Args) != 5 || os.Args[1] != "write" {
		fmt.Fprintln(os.Stderr, "usage: diskfs-ext4 write ROOTFS.TAR IMAGE SIZE_BYTES | debugfs-script ROOTFS.TAR XATTR_DIR")
		os.Exit(2)
	}
	size, err := strconv.ParseInt(os.Args[4], 10, 64)
	if err != nil {
		fail(err)
	}
	start := time.Now()
	counts, err := write(os.Args[2], os.Args[3], size)
	if err != nil {
		fail(err)
	}
	fmt.Printf("go-diskfs: %.1f s; written: %d dirs, %d files, %d symlinks; not written: %d device nodes, %d hard links (Link not implemented; written as copies), %d extended attributes; %d chown/chmod errors\n",
		time.Since(start).Seconds(), counts["dir"], counts["file"], counts["symlink"], counts["device"], counts["hardlink"], counts["xattr"], counts["attrerr"])
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "diskfs-ext4:", err)
	os.Exit(1)
}

func write(tarPath, img string, size int64) (map[string]int, error) {
	d, err := diskfs.Create(img, size, diskfs.SectorSizeDefault)
	if err != nil {
		return nil, err
	}
	fs, err := d.CreateFilesystem(disk.FilesystemSpec{Partition: 0, FSType: filesystem.TypeExt4, VolumeLabel: "root"})
	if err != nil {
		return nil, err
	}
	defer fs.Close()
	f, err := os.Open(tarPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	counts := map[string]int{}
	data := map[string][]byte{} // hard link targets' contents
	tr := tar.NewReader(bufio.NewReaderSize(f, 1<<20))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return counts, nil
		}
		if err != nil {
			return nil, err
		}
		// go-diskfs wants relative paths.
		name := strings.Trim(strings.TrimPrefix(h.Name, "./"), "/")
		if name == "" {
			continue
		}
		for k := range h.PAXRecords {
			if strings.HasPrefix(k, "SCHILY.xattr.") {
				counts["xattr"]++
			}
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := fs.Mkdir(name); err != nil {
				return nil, fmt.Errorf("mkdir %s: %w", name, err)
			}
			counts["dir"]++
		case tar.TypeReg, tar.TypeLink:
			var content []byte
			if h.Typeflag == tar.TypeLink {
				content = data[strings.Trim(strings.TrimPrefix(h.Linkname, "./"), "/")]
				counts["hardlink"]++
			} else {
				if content, err = io.ReadAll(tr); err != nil {
					return nil, err
				}
				data[name] = content
				counts["file"]++
			}
			out, err := fs.OpenFile(name, os.O_CREATE|os.O_RDWR)
			if err != nil {
				return nil, fmt.Errorf("create %s: %w", name, err)
			}
			if _, err := out.Write(content); err != nil {
				return nil, fmt.Errorf("write %s: %w", name, err)
			}
			out.Close()
		case tar.TypeSymlink:
			if err := fs.Symlink(h.Linkname, name); err != nil {
				return nil, fmt.Errorf("symlink %s: %w", name, err)
			}
			counts["symlink"]++
			continue // Chown and Chmod follow the link
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
			if err := fs.Mknod(name, uint32(h.Mode), int(h.Devmajor<<8|h.Devminor)); err == nil {
				return nil, fmt.Errorf("mknod %s worked: update this benchmark", name)
			}
			counts["device"]++
			continue
		}
		mode := os.FileMode(h.Mode & 0o777)
		for bit, m := range map[int64]os.FileMode{0o4000: os.ModeSetuid, 0o2000: os.ModeSetgid, 0o1000: os.ModeSticky} {
			if h.Mode&bit != 0 {
				mode |= m
			}
		}
		if err := fs.Chmod(name, mode); err != nil {
			counts["attrerr"]++
		}
		if err := fs.Chown(name, h.Uid, h.Gid); err != nil {
			counts["attrerr"]++
		}
	}
}

func debugfsScript(tarPath, xattrDir string) error {
	f, err := os.Open(tarPath)
	if err != nil {
		return err
	}
	defer f.Close()
	w := bufio.NewWriter(os.Stdout)
	defer w.Flush()
	tr := tar.NewReader(bufio.NewReaderSize(f, 1<<20))
	n := 0
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		p := "/" + strings.Trim(strings.TrimPrefix(h.Name, "./"), "/")
		if strings.ContainsAny(p, "\"\n") {
			return fmt.Errorf("%q: a name debugfs cannot take", p)
		}
		typ := map[byte]int64{tar.TypeDir: 0o040000, tar.TypeReg: 0o100000, tar.TypeLink: 0o100000,
			tar.TypeSymlink: 0o120000, tar.TypeChar: 0o020000, tar.TypeBlock: 0o060000, tar.TypeFifo: 0o010000}[h.Typeflag]
		if h.Typeflag == tar.TypeChar || h.Typeflag == tar.TypeBlock {
			kind := "c"
			if h.Typeflag == tar.TypeBlock {
				kind = "b"
			}
			i := strings.LastIndex(p, "/")
			fmt.Fprintf(w, "cd \"%s/\"\nmknod \"%s\" %s %d %d\ncd /\n", p[:i], p[i+1:], kind, h.Devmajor, h.Devminor)
		}
		if h.Typeflag == tar.TypeLink {
			continue // the inode is its target's
		}
		fmt.Fprintf(w, "sif \"%s\" uid %d\nsif \"%s\" gid %d\n", p, h.Uid, p, h.Gid)
		if h.Typeflag != tar.TypeSymlink {
			fmt.Fprintf(w, "sif \"%s\" mode 0%o\n", p, typ|h.Mode&0o7777)
		}
		for k, v := range h.PAXRecords {
			name, ok := strings.CutPrefix(k, "SCHILY.xattr.")
			if !ok {
				continue
			}
			n++
			vf := fmt.Sprintf("%s/%d", xattrDir, n)
			if err := os.WriteFile(vf, []byte(v), 0o644); err != nil {
				return err
			}
			fmt.Fprintf(w, "ea_set -f %s \"%s\" %s\n", vf, p, name)
		}
	}
}
