package layer

import (
	"fmt"
	"io/fs"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// Limits on what a layer holds. A layer must fit in the image's root file
// system (2 GiB for the default image), and a tree far beyond what a test
// needs is more likely a mistake (a build directory installed into itself,
// a core dump) than a wish.
const (
	MaxFileBytes  = 512 << 20
	MaxTotalBytes = 2 << 30
)

// refusedTops are top-level directories the guest mounts a file system on
// (proc, sysfs, devtmpfs, tmpfs), so that anything the layer put there
// would be hidden, or is not a place for files at all.
var refusedTops = map[string]string{
	"proc": "procfs", "sys": "sysfs", "dev": "devtmpfs", "run": "a tmpfs", "tmp": "a tmpfs",
}

// refusedPaths are symlinks into /run in the guest's base.
var refusedPaths = map[string]string{"var/run": "/run", "var/lock": "/run/lock"}

// mergedUsr are the guest's top-level symlinks into /usr (Debian trixie is
// merged-/usr). cpio replaces a symlink with a directory of the same name,
// which would cut /lib off from /usr/lib; so the layer puts what the project
// installs below them below /usr, where the symlinks lead.
var mergedUsr = map[string]bool{"bin": true, "sbin": true, "lib": true, "lib32": true, "lib64": true, "libx32": true}

// tree is a scanned install tree, ready to archive.
type tree struct {
	entries []entry
	files   int   // regular files, hard links counted once
	bytes   int64 // their data
}

// scan walks the staged install tree below root and returns the archive
// entries for it, or an error naming the first path a layer cannot hold.
func scan(root string) (*tree, error) {
	type linkKey struct{ dev, ino uint64 }
	byName := map[string]int{}
	installedAs := map[string]string{} // guest path -> path in the install tree
	links := map[linkKey][]int{}       // hard-link groups, by entry index
	t := &tree{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil || rel == "." {
			return err
		}
		rel = filepath.ToSlash(rel)
		shown := "/" + rel
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		top, rest, _ := strings.Cut(rel, "/")
		if what, ok := refusedTops[top]; ok {
			return fmt.Errorf("the install tree has %s, but /%s is %s in the guest; a layer cannot hold it", shown, top, what)
		}
		for prefix, target := range refusedPaths {
			if rel == prefix || strings.HasPrefix(rel, prefix+"/") {
				return fmt.Errorf("the install tree has %s, but /%s is a symlink to %s (a tmpfs) in the guest; a layer cannot hold it", shown, prefix, target)
			}
		}
		name := rel
		if mergedUsr[top] {
			if st.Mode&modeType != modeDir && rest == "" {
				return fmt.Errorf("the install tree has %s as a %s, but in the guest /%s is the merged-/usr symlink to usr/%s; install below /usr instead", shown, typeName(st.Mode), top, top)
			}
			name = "usr/" + rel
		}
		e := entry{name: name, mode: st.Mode & (modeType | 0o7777), ino: uint32(len(t.entries) + 1), nlink: 1}
		switch st.Mode & modeType {
		case modeDir:
			e.nlink = 2
		case modeSymlink:
			target, err := readlink(p)
			if err != nil {
				return err
			}
			e.target = target
		case modeRegular:
			if st.Size > MaxFileBytes {
				return fmt.Errorf("the install tree has %s of %d MiB, over the layer's limit of %d MiB per file", shown, st.Size>>20, MaxFileBytes>>20)
			}
			e.src, e.size = p, st.Size
		default:
			return fmt.Errorf("the install tree has %s, a %s; a layer holds only regular files, directories and symlinks", shown, typeName(st.Mode))
		}
		if i, dup := byName[name]; dup {
			// lib/x and usr/lib/x, one name in the guest: directories
			// merge, anything else is ambiguous.
			if e.mode&modeType == modeDir && t.entries[i].mode&modeType == modeDir {
				return nil
			}
			return fmt.Errorf("the install tree has both %s and %s, which are one path in the guest (merged /usr: /bin, /sbin and /lib* are symlinks into /usr)", installedAs[name], shown)
		}
		byName[name] = len(t.entries)
		installedAs[name] = shown
		if e.mode&modeType == modeRegular && st.Nlink > 1 {
			k := linkKey{st.Dev, st.Ino}
			links[k] = append(links[k], len(t.entries))
		}
		t.entries = append(t.entries, e)
		return nil
	})
	if err != nil {
		return nil, err
	}
	// Depth first, as the walk went, with lib/x sorted in among usr/...:
	// a directory right before its contents.
	order := make([]int, len(t.entries))
	keys := make([]string, len(t.entries))
	for i := range order {
		order[i] = i
		keys[i] = strings.ReplaceAll(t.entries[i].name, "/", "\x00")
	}
	sort.Slice(order, func(a, b int) bool { return keys[order[a]] < keys[order[b]] })
	rank := make([]int, len(order))
	for r, i := range order {
		rank[i] = r
	}
	for _, group := range links {
		if len(group) == 1 {
			continue
		}
		sort.Slice(group, func(a, b int) bool { return rank[group[a]] < rank[group[b]] })
		last := group[len(group)-1]
		for _, i := range group {
			e := &t.entries[i]
			e.ino, e.nlink = t.entries[last].ino, uint32(len(group))
			if i != last {
				e.src, e.size = "", 0
			}
		}
	}
	sorted := make([]entry, 0, len(order))
	for _, i := range order {
		sorted = append(sorted, t.entries[i])
	}
	t.entries = pruneImplicitDirs(sorted)
	for _, e := range t.entries {
		if e.src != "" {
			t.files++
			t.bytes += e.size
		}
	}
	if t.bytes > MaxTotalBytes {
		return nil, fmt.Errorf("the install tree has %d MiB of files, over the layer's limit of %d MiB", t.bytes>>20, MaxTotalBytes>>20)
	}
	return t, nil
}

// pruneImplicitDirs drops the entries of directories that have mode 0755
// and something in them. The layer creates those itself, root-owned and
// 0755, when it writes their contents; leaving them out means a directory the
// base already has (/etc, /usr/lib/systemd) keeps its owner and mode, as
// it would if meson install ran in the guest. Empty directories, and those
// with another mode (0700, sticky, setgid), are kept so they are made as
// installed. entries must be in depth-first order.
func pruneImplicitDirs(entries []entry) []entry {
	out := entries[:0]
	for i, e := range entries {
		hasChildren := i+1 < len(entries) && strings.HasPrefix(entries[i+1].name, e.name+"/")
		if e.mode == modeDir|0o755 && hasChildren {
			continue
		}
		out = append(out, e)
	}
	return out
}

func readlink(p string) (string, error) {
	buf := make([]byte, unix.PathMax)
	n, err := unix.Readlink(p, buf)
	if err != nil {
		return "", fmt.Errorf("read symlink %s: %w", p, err)
	}
	return string(buf[:n]), nil
}

func typeName(mode uint32) string {
	switch mode & modeType {
	case modeDir:
		return "directory"
	case modeRegular:
		return "regular file"
	case modeSymlink:
		return "symlink"
	case unix.S_IFIFO:
		return "fifo"
	case unix.S_IFSOCK:
		return "socket"
	case unix.S_IFCHR:
		return "character device"
	case unix.S_IFBLK:
		return "block device"
	}
	return fmt.Sprintf("file of type %#o", mode&modeType)
}
