package layer

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// makeTree builds the install tree the archive tests use. Each call makes
// fresh inodes and mtimes, so two calls give equal trees that differ in
// everything a layer must not depend on.
func makeTree(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	writeFile(t, filepath.Join(root, "usr/bin/hello"), "#!/bin/sh\necho hello\n", 0o755)
	writeFile(t, filepath.Join(root, "usr/bin/suid"), "setuid", 0o4755)
	writeFile(t, filepath.Join(root, "usr/bin/sgid"), "setgid", 0o2711)
	writeFile(t, filepath.Join(root, "etc/hello.conf"), "greeting=hi\n", 0o640)
	writeFile(t, filepath.Join(root, "etc/empty"), "", 0o600)
	writeFile(t, filepath.Join(root, "usr/share/hello/data"), strings.Repeat("0123456789", 1000), 0o644)
	writeFile(t, filepath.Join(root, "lib/systemd/system/hello.service"), "[Service]\nExecStart=/usr/bin/hello\n", 0o644)
	require.NoError(t, os.Link(filepath.Join(root, "usr/bin/hello"), filepath.Join(root, "usr/bin/hello-again")))
	require.NoError(t, os.Symlink("hello", filepath.Join(root, "usr/bin/hi")))
	require.NoError(t, os.Symlink("/usr/lib/../bin/hello", filepath.Join(root, "usr/bin/abs")))
	require.NoError(t, os.Symlink("does-not-exist", filepath.Join(root, "usr/bin/dangling")))
	require.NoError(t, os.MkdirAll(filepath.Join(root, "var/lib/hello/private"), 0o755))
	chmod(t, filepath.Join(root, "var/lib/hello/private"), 0o700)
	writeFile(t, filepath.Join(root, "var/lib/hello/private/secret"), "s", 0o600)
	require.NoError(t, os.MkdirAll(filepath.Join(root, "var/lib/hello/empty"), 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(root, "var/spool/hello"), 0o755))
	chmod(t, filepath.Join(root, "var/spool/hello"), 0o1777)
	// A name that sorts between a directory and its contents ("-" < "/").
	writeFile(t, filepath.Join(root, "etc/hello.d/x.conf"), "x", 0o644)
	writeFile(t, filepath.Join(root, "etc/hello.d-old"), "old", 0o644)
	return root
}

func archiveOf(t *testing.T, root string) []byte {
	t.Helper()
	tr, err := scan(root)
	require.NoError(t, err)
	var buf bytes.Buffer
	n, err := writeArchive(&buf, tr.entries)
	require.NoError(t, err)
	require.EqualValues(t, buf.Len(), n)
	return buf.Bytes()
}

func TestArchiveHeaders(t *testing.T) {
	data := archiveOf(t, makeTree(t))
	assert.Zero(t, len(data)%sectorSize, "padded to whole sectors for the guest's disk")
	hs := readArchive(t, data)
	byName := map[string]header{}
	var names []string
	for _, h := range hs {
		assert.Zero(t, h.uid, "%s uid", h.name)
		assert.Zero(t, h.gid, "%s gid", h.name)
		assert.Zero(t, h.mtime, "%s mtime", h.name)
		byName[h.name] = h
		names = append(names, h.name)
	}
	assert.Equal(t, trailerName, names[len(names)-1])

	tests := []struct {
		name   string
		mode   uint32
		data   string
		absent bool
	}{
		{name: "usr/bin/hello", mode: 0o100755, data: ""}, // a hard link before the one with the data
		{name: "usr/bin/hello-again", mode: 0o100755, data: "#!/bin/sh\necho hello\n"},
		{name: "usr/bin/suid", mode: 0o104755, data: "setuid"},
		{name: "usr/bin/sgid", mode: 0o102711, data: "setgid"},
		{name: "etc/hello.conf", mode: 0o100640, data: "greeting=hi\n"},
		{name: "etc/empty", mode: 0o100600},
		{name: "usr/bin/hi", mode: 0o120777, data: "hello"},
		{name: "usr/bin/abs", mode: 0o120777, data: "/usr/lib/../bin/hello"},
		{name: "usr/bin/dangling", mode: 0o120777, data: "does-not-exist"},
		{name: "usr/lib/systemd/system/hello.service", mode: 0o100644, data: "[Service]\nExecStart=/usr/bin/hello\n"},
		{name: "lib/systemd/system/hello.service", absent: true}, // merged /usr
		{name: "var/lib/hello/private", mode: 0o040700},
		{name: "var/lib/hello/empty", mode: 0o040755},
		{name: "var/spool/hello", mode: 0o041777},
		{name: "usr", absent: true}, // 0755 with contents: left to cpio, base keeps its own
		{name: "etc", absent: true},
		{name: "etc/hello.d", absent: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, ok := byName[tt.name]
			if tt.absent {
				assert.False(t, ok)
				return
			}
			require.True(t, ok, "missing from %v", names)
			assert.Equal(t, tt.mode, h.mode, "mode %o", h.mode)
			assert.Equal(t, tt.data, h.data)
		})
	}
	// One hard-link group: same inode, nlink 2, data once and last.
	a, b := byName["usr/bin/hello-again"], byName["usr/bin/hello"]
	assert.Equal(t, a.ino, b.ino)
	assert.EqualValues(t, 2, a.nlink)
	assert.EqualValues(t, 2, b.nlink)
	assert.Less(t, indexOf(names, "usr/bin/hello"), indexOf(names, "usr/bin/hello-again"),
		"newc: the member carrying the data is the group's last in the archive")
	// Depth first: a directory's contents right after it.
	assert.Less(t, indexOf(names, "etc/hello.d/x.conf"), indexOf(names, "etc/hello.d-old"))
}

func indexOf(names []string, name string) int {
	for i, n := range names {
		if n == name {
			return i
		}
	}
	return -1
}

func TestArchiveDeterministic(t *testing.T) {
	first := archiveOf(t, makeTree(t))
	time.Sleep(10 * time.Millisecond) // other mtimes, other inodes
	second := archiveOf(t, makeTree(t))
	assert.True(t, bytes.Equal(first, second), "the same tree must give the same bytes")
}

// TestArchiveGNUCpio checks the archive with the extractor the guest uses.
func TestArchiveGNUCpio(t *testing.T) {
	cpio := gnuCpio(t)
	archive := filepath.Join(t.TempDir(), "layer.cpio")
	require.NoError(t, os.WriteFile(archive, archiveOf(t, makeTree(t)), 0o444))

	list, err := exec.Command(cpio, "-it", "--quiet", "-F", archive).CombinedOutput()
	require.NoError(t, err, "%s", list)
	assert.Contains(t, strings.Fields(string(list)), "usr/lib/systemd/system/hello.service")

	// A base like the guest's: merged /usr, a directory with its own mode.
	dst := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dst, "usr/lib"), 0o755))
	require.NoError(t, os.Symlink("usr/lib", filepath.Join(dst, "lib")))
	require.NoError(t, os.Mkdir(filepath.Join(dst, "etc"), 0o750))
	chmod(t, filepath.Join(dst, "etc"), 0o750)
	writeFile(t, filepath.Join(dst, "etc/hello.conf"), "the base's", 0o644)

	// The guest's command line, but -D instead of running from the root.
	cmd := exec.Command(cpio, "-idu", "--quiet", "--no-absolute-filenames", "-C", "1048576", "-D", dst)
	f, err := os.Open(archive)
	require.NoError(t, err)
	defer f.Close()
	cmd.Stdin = f
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err)
	require.Empty(t, string(out), "any message from cpio is a failure in the guest")

	lstat := func(p string) os.FileInfo {
		fi, err := os.Lstat(filepath.Join(dst, p))
		require.NoError(t, err)
		return fi
	}
	assert.Equal(t, os.ModeSymlink, lstat("lib").Mode()&os.ModeType, "the base's /lib symlink survives")
	assert.Equal(t, os.FileMode(0o750), lstat("etc").Mode().Perm(), "the base's /etc keeps its mode")
	content, err := os.ReadFile(filepath.Join(dst, "etc/hello.conf"))
	require.NoError(t, err)
	assert.Equal(t, "greeting=hi\n", string(content), "the layer's file replaces the base's")
	assert.Equal(t, os.FileMode(0o640), lstat("etc/hello.conf").Mode().Perm())
	assert.Equal(t, os.ModeSetuid|0o755, lstat("usr/bin/suid").Mode()&(os.ModeSetuid|os.ModePerm))
	assert.Equal(t, os.ModeSetgid|0o711, lstat("usr/bin/sgid").Mode()&(os.ModeSetgid|os.ModePerm))
	assert.Equal(t, os.ModeDir|os.ModeSticky|0o777, lstat("var/spool/hello").Mode()&(os.ModeDir|os.ModeSticky|os.ModePerm))
	assert.Equal(t, os.ModeDir|0o700, lstat("var/lib/hello/private").Mode()&(os.ModeDir|os.ModePerm))
	assert.True(t, lstat("var/lib/hello/empty").IsDir())
	for link, target := range map[string]string{"usr/bin/hi": "hello", "usr/bin/abs": "/usr/lib/../bin/hello", "usr/bin/dangling": "does-not-exist"} {
		got, err := os.Readlink(filepath.Join(dst, link))
		require.NoError(t, err)
		assert.Equal(t, target, got, link)
	}
	assert.True(t, os.SameFile(lstat("usr/bin/hello"), lstat("usr/bin/hello-again")), "hard links stay linked")
	hello, err := os.ReadFile(filepath.Join(dst, "usr/bin/hello-again"))
	require.NoError(t, err)
	assert.Equal(t, "#!/bin/sh\necho hello\n", string(hello))
	service, err := os.ReadFile(filepath.Join(dst, "usr/lib/systemd/system/hello.service"))
	require.NoError(t, err)
	assert.Contains(t, string(service), "ExecStart=/usr/bin/hello")
	if os.Geteuid() == 0 {
		var uids []uint32
		_ = filepath.Walk(dst, func(_ string, fi os.FileInfo, _ error) error {
			uids = append(uids, fi.Sys().(*syscall.Stat_t).Uid)
			return nil
		})
		sort.Slice(uids, func(i, j int) bool { return uids[i] < uids[j] })
		assert.Zero(t, uids[len(uids)-1], "everything extracted as root is owned by root")
	}
}

func gnuCpio(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("cpio")
	if err != nil {
		t.Fatalf("GNU cpio is needed to check archives (scripts/install-deps installs it): %v", err)
	}
	return p
}
