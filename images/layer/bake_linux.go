package layer

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmharness/vmharness/images/qcow2"
)

// bake writes the tree t into a scratch copy of the base image (a raw
// ext4 file system) with debugfs and stores the clusters that changed as
// a qcow2 image over base at out, so that a VM whose overlay is backed by
// out boots the base with the project's files in place. scratch is a
// directory for the copy, removed by the caller. No root, no mounts: the
// copy is an ordinary file e2fsprogs edits.
func bake(ctx context.Context, t *tree, base, scratch, out string) error {
	base, err := filepath.Abs(base)
	if err != nil {
		return err
	}
	for _, tool := range []string{"debugfs", "e2fsck"} {
		if _, err := lookTool(tool); err != nil {
			return err
		}
	}
	dirs := parentDirs(t.entries)
	listing, err := listBase(ctx, base, dirs, filepath.Join(scratch, "list.debugfs"))
	if err != nil {
		return err
	}
	cmds, err := debugfsScript(t.entries, listing)
	if err != nil {
		return err
	}
	work := filepath.Join(scratch, "rootfs.raw")
	if err := sparseCopy(base, work); err != nil {
		return fmt.Errorf("copying the base image for the layer: %w", err)
	}
	script := filepath.Join(scratch, "write.debugfs")
	if err := os.WriteFile(script, []byte(strings.Join(cmds, "\n")+"\n"), 0o644); err != nil {
		return err
	}
	if err := runDebugfs(ctx, "-w", "-f", script, work); err != nil {
		if strings.Contains(err.Error(), "Could not allocate") {
			return fmt.Errorf("writing the install tree into the layer: %w (the base image's file system is full: the install tree does not fit in it)", err)
		}
		return fmt.Errorf("writing the install tree into the layer: %w", err)
	}
	// debugfs is a file system debugger: check that what it left is a
	// file system the guest can mount before any run uses it.
	if out, err := runTool(ctx, "e2fsck", "-f", "-n", work); err != nil {
		return fmt.Errorf("the layer's file system does not check clean (e2fsck -fn: %v); its last lines:\n%s", err, tail(out, mesonTailLines))
	}
	return writeOverlay(base, work, out)
}

// listBase returns the entries of the base image's directories dirs, read
// with debugfs, read-only.
func listBase(ctx context.Context, base string, dirs []string, script string) (baseDirs, error) {
	var b strings.Builder
	for _, d := range dirs {
		fmt.Fprintf(&b, "ls -p %s\n", quote("/"+d))
	}
	if err := os.WriteFile(script, []byte(b.String()), 0o644); err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, "debugfs", "-f", script, base)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("reading the base image %s with debugfs: %v: %s", base, err, strings.TrimSpace(stderr.String()))
	}
	// Errors ("not found", "not a directory") go to stderr and are what
	// they say: that path is not a directory of the base.
	return parseListing(stdout.String(), dirs)
}

// lsLine is one entry of debugfs's `ls -p`: /inode/mode/uid/gid/name/size/.
var lsLine = regexp.MustCompile(`^/[0-9]+/([0-7]+)/[0-9]+/[0-9]+/(.*)/[0-9]*/$`)

// parseListing splits the output of debugfs -f running one `ls -p` per
// dir into the directories' entries. debugfs echoes each command as
// "debugfs: ls -p ..." before its output; a directory that is missing or
// not a directory lists nothing, not even "." and "..".
func parseListing(out string, dirs []string) (baseDirs, error) {
	listing := baseDirs{}
	i := -1
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "debugfs: ") {
			i++
			continue
		}
		m := lsLine.FindStringSubmatch(line)
		if m == nil || i < 0 {
			continue
		}
		if i >= len(dirs) {
			return nil, fmt.Errorf("debugfs listed more directories than it was asked for")
		}
		name := m[2]
		if name == "." || name == ".." {
			if listing[dirs[i]] == nil {
				listing[dirs[i]] = map[string]uint32{}
			}
			continue
		}
		mode, err := strconv.ParseUint(m[1], 8, 32)
		if err != nil {
			return nil, fmt.Errorf("debugfs listing: %q: %w", line, err)
		}
		if listing[dirs[i]] == nil {
			listing[dirs[i]] = map[string]uint32{}
		}
		listing[dirs[i]][name] = uint32(mode)
	}
	if i != len(dirs)-1 {
		return nil, fmt.Errorf("debugfs answered %d of %d directory listings", i+1, len(dirs))
	}
	return listing, nil
}

// runDebugfs runs debugfs and fails on any message: debugfs reports a
// failed command on stderr and goes on, exiting 0.
func runDebugfs(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, "debugfs", args...)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = io.Discard, &stderr
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	var msgs []string
	for _, l := range strings.Split(stderr.String(), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "debugfs ") {
			msgs = append(msgs, l)
		}
	}
	if err == nil && len(msgs) == 0 {
		return nil
	}
	if err == nil {
		err = errors.New("debugfs reported errors")
	}
	if len(msgs) > mesonTailLines {
		msgs = append(msgs[:mesonTailLines], fmt.Sprintf("(and %d more)", len(msgs)-mesonTailLines))
	}
	return fmt.Errorf("%v: %s", err, strings.Join(msgs, "; "))
}

func runTool(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	return out.String(), err
}

func lookTool(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("%s not found (install e2fsprogs): %w", name, err)
	}
	return p, nil
}

// sparseCopy copies the regular file from to a new file to, copying only
// its data extents (the kernel copies them, without a round trip through
// user space) and leaving holes as holes.
func sparseCopy(from, to string) error {
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	fi, err := src.Stat()
	if err != nil {
		return err
	}
	dst, err := os.OpenFile(to, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if err := dst.Truncate(fi.Size()); err != nil {
		dst.Close()
		return err
	}
	extents, err := dataExtents(src, fi.Size())
	if err == nil {
		for _, x := range extents {
			if err = copyRange(src, dst, x.off, x.len); err != nil {
				break
			}
		}
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	return err
}

func copyRange(src, dst *os.File, off, n int64) error {
	for n > 0 {
		roff, woff := off, off
		c, err := unix.CopyFileRange(int(src.Fd()), &roff, int(dst.Fd()), &woff, int(min(n, 1<<30)), 0)
		if err != nil {
			return fmt.Errorf("copy_file_range: %w", err)
		}
		if c == 0 {
			return io.ErrUnexpectedEOF
		}
		off += int64(c)
		n -= int64(c)
	}
	return nil
}

type extent struct{ off, len int64 }

// dataExtents returns where f (of size bytes) has data, by SEEK_DATA and
// SEEK_HOLE; a file system without them reports one extent for all.
func dataExtents(f *os.File, size int64) ([]extent, error) {
	var out []extent
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole from off to the end
		}
		if err != nil {
			return nil, fmt.Errorf("SEEK_DATA %s: %w", f.Name(), err)
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("SEEK_HOLE %s: %w", f.Name(), err)
		}
		out = append(out, extent{data, hole - data})
		off = hole
	}
	return out, nil
}

// changedClusters returns the qcow2 clusters in which the files a and b,
// of equal size, differ. Only where either has data can they differ.
func changedClusters(a, b *os.File, size int64) ([]int64, error) {
	xa, err := dataExtents(a, size)
	if err != nil {
		return nil, err
	}
	xb, err := dataExtents(b, size)
	if err != nil {
		return nil, err
	}
	const cs = qcow2.ClusterSize
	var spans []extent // in clusters
	for _, x := range mergeExtents(append(xa, xb...)) {
		first, end := x.off/cs, (x.off+x.len+cs-1)/cs
		spans = append(spans, extent{first, end - first})
	}
	const chunk = 16 // clusters read at once
	bufA, bufB := make([]byte, chunk*cs), make([]byte, chunk*cs)
	var clusters []int64
	for _, s := range mergeExtents(spans) {
		for c := s.off; c < s.off+s.len; c += chunk {
			n := min(chunk, s.off+s.len-c) * cs
			n = min(n, size-c*cs)
			if _, err := a.ReadAt(bufA[:n], c*cs); err != nil {
				return nil, fmt.Errorf("reading %s: %w", a.Name(), err)
			}
			if _, err := b.ReadAt(bufB[:n], c*cs); err != nil {
				return nil, fmt.Errorf("reading %s: %w", b.Name(), err)
			}
			for i := int64(0); i < n; i += cs {
				end := min(i+cs, n)
				if !bytes.Equal(bufA[i:end], bufB[i:end]) {
					clusters = append(clusters, c+i/cs)
				}
			}
		}
	}
	return clusters, nil
}

// mergeExtents sorts extents and joins those that overlap or touch.
func mergeExtents(xs []extent) []extent {
	if len(xs) == 0 {
		return nil
	}
	sorted := append([]extent(nil), xs...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].off < sorted[j].off })
	out := []extent{sorted[0]}
	for _, x := range sorted[1:] {
		l := &out[len(out)-1]
		if x.off <= l.off+l.len {
			l.len = max(l.len, x.off+x.len-l.off)
			continue
		}
		out = append(out, x)
	}
	return out
}

// writeOverlay writes the clusters in which work differs from base as a
// qcow2 image over base at out.
func writeOverlay(base, work, out string) error {
	b, err := os.Open(base)
	if err != nil {
		return err
	}
	defer b.Close()
	w, err := os.Open(work)
	if err != nil {
		return err
	}
	defer w.Close()
	fi, err := b.Stat()
	if err != nil {
		return err
	}
	clusters, err := changedClusters(b, w, fi.Size())
	if err != nil {
		return err
	}
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	err = qcow2.Write(bw, qcow2.Overlay{Size: fi.Size(), BackingFile: base, BackingFormat: "raw", Clusters: clusters, Data: w})
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing the layer image %s: %w", out, err)
	}
	return nil
}
