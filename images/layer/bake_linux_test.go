package layer

import (
	"context"
	"crypto/sha256"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// bakeTree scans the install tree below root and bakes it over the test
// base, returning the layer image.
func bakeTree(t *testing.T, root string) (string, error) {
	t.Helper()
	tr, err := scan(root)
	if err != nil {
		return "", err
	}
	scratch := t.TempDir()
	out := filepath.Join(t.TempDir(), "layer.qcow2")
	return out, bake(context.Background(), tr, testBase(t), scratch, out)
}

// TestBake writes an install tree the way meson install leaves one over
// the base and reads the result back as the guest would see it.
func TestBake(t *testing.T) {
	root := t.TempDir()
	writeFile(t, filepath.Join(root, "usr/bin/hello.sh"), "#!/bin/sh\necho layer\n", 0o755)
	writeFile(t, filepath.Join(root, "usr/bin/suid"), "setuid\n", 0o4755)
	writeFile(t, filepath.Join(root, "usr/bin/old-link"), "a file where the base has a symlink\n", 0o644)
	writeFile(t, filepath.Join(root, "lib/systemd/system-generators/gen"), "#!/bin/sh\n", 0o755)
	writeFile(t, filepath.Join(root, "usr/lib/systemd/system/new.service"), "[Service]\n", 0o644)
	writeFile(t, filepath.Join(root, "usr/share/new/deep/er/file"), "deep\n", 0o600)
	writeFile(t, filepath.Join(root, "usr/share/quoted/a \"b\" c"), "quoted\n", 0o644)
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc/private"), 0o755))
	chmod(t, filepath.Join(root, "etc/private"), 0o700)
	require.NoError(t, os.MkdirAll(filepath.Join(root, "usr/share/empty"), 0o755))
	require.NoError(t, os.Symlink("hello.sh", filepath.Join(root, "usr/bin/hello")))
	require.NoError(t, os.Symlink("/usr/share/new", filepath.Join(root, "usr/bin/tool"))) // replaces a base file
	writeFile(t, filepath.Join(root, "usr/lib/x/one"), "linked\n", 0o644)
	require.NoError(t, os.Link(filepath.Join(root, "usr/lib/x/one"), filepath.Join(root, "usr/lib/x/two")))

	img, err := bakeTree(t, root)
	require.NoError(t, err)
	check, err := exec.Command("qemu-img", "check", img).CombinedOutput()
	require.NoError(t, err, "%s", check)
	fs := openImage(t, img)
	fs.fsck()

	assert.Equal(t, "#!/bin/sh\necho layer\n", fs.cat("/usr/bin/hello.sh"), "a base file is replaced")
	for _, tt := range []struct {
		path string
		kind string
		mode uint32
	}{
		{"/usr/bin/hello.sh", "regular", 0o755},
		{"/usr/bin/suid", "regular", 0o4755},
		{"/usr/bin/old-link", "regular", 0o644},
		{"/usr/lib/systemd/system-generators/gen", "regular", 0o755},
		{"/usr/lib/systemd/system/new.service", "regular", 0o644},
		{"/usr/share/new", "directory", 0o755},
		{"/usr/share/new/deep/er", "directory", 0o755},
		{"/usr/share/new/deep/er/file", "regular", 0o600},
		{"/usr/share/quoted/a \"b\" c", "regular", 0o644},
		{"/etc/private", "directory", 0o700},
		{"/usr/share/empty", "directory", 0o755},
		{"/usr/bin/hello", "symlink", 0o777},
		{"/usr/bin/tool", "symlink", 0o777},
	} {
		ino := fs.stat(quote(tt.path))
		if assert.True(t, ino.ok, "%s exists", tt.path) {
			assert.Equal(t, tt.kind, ino.kind, tt.path)
			assert.Equal(t, tt.mode, ino.mode, "%s mode %o", tt.path, ino.mode)
			assert.Equal(t, 0, ino.uid, "%s is root's", tt.path)
			assert.Equal(t, 0, ino.gid, "%s is root's", tt.path)
		}
	}
	assert.Equal(t, "hello.sh", fs.readlink("/usr/bin/hello"))
	assert.Equal(t, "/usr/share/new", fs.readlink("/usr/bin/tool"))
	assert.Equal(t, "quoted\n", fs.cat(`"/usr/share/quoted/a ""b"" c"`))

	one, two := fs.stat("/usr/lib/x/one"), fs.stat("/usr/lib/x/two")
	assert.Equal(t, one.ino, two.ino, "hard links stay one file")
	assert.Equal(t, 2, one.links)
	assert.Equal(t, "linked\n", fs.cat("/usr/lib/x/two"))

	// The base's other files are there, untouched, and /bin is still the
	// merged-/usr symlink.
	assert.Equal(t, "base\n", fs.cat("/etc/hostname"))
	assert.Equal(t, "keep", fs.cat("/usr/lib/systemd/system-generators/keep"))
	assert.Equal(t, "usr/bin", fs.readlink("/bin"))
	assert.Equal(t, "usr/lib", fs.readlink("/lib"))
}

// TestBakeLeavesBaseAlone: the base image is only read, and the layer
// holds only what changed.
func TestBakeLeavesBaseAlone(t *testing.T) {
	base := testBase(t)
	before := fileHash(t, base)
	root := t.TempDir()
	writeFile(t, filepath.Join(root, "usr/share/big/blob"), strings.Repeat("y", 3<<20), 0o644)
	img, err := bakeTree(t, root)
	require.NoError(t, err)
	assert.Equal(t, before, fileHash(t, base), "the base image is never written")
	info, err := os.Stat(img)
	require.NoError(t, err)
	assert.Less(t, info.Size(), int64(6<<20), "a 3 MiB file makes a layer of a few MiB, not a copy of the 64 MiB base")
	out, err := exec.Command("qemu-img", "info", img).CombinedOutput()
	require.NoError(t, err)
	assert.Contains(t, string(out), "backing file: "+base)
}

func TestBakeRefuses(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, root string)
		want  string
	}{
		{"file over a base directory", func(t *testing.T, root string) {
			writeFile(t, filepath.Join(root, "usr/share/dir-with-files"), "x", 0o644)
		}, "the install tree has /usr/share/dir-with-files as a regular file, but the base image has a directory there"},
		{"directory over a base file", func(t *testing.T, root string) {
			require.NoError(t, os.MkdirAll(filepath.Join(root, "etc/hostname"), 0o700))
		}, "the install tree has the directory /etc/hostname, but the base image has a regular file there"},
		{"below a base file", func(t *testing.T, root string) {
			writeFile(t, filepath.Join(root, "etc/hostname/x"), "x", 0o644)
		}, "the install tree has /etc/hostname/x, but /etc/hostname is a regular file in the base image"},
		{"below a base symlink", func(t *testing.T, root string) {
			writeFile(t, filepath.Join(root, "etc/alt/x"), "x", 0o644)
		}, "the install tree has /etc/alt/x, but /etc/alt is a symlink in the base image; a layer cannot install below it"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			tt.setup(t, root)
			_, err := bakeTree(t, root)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

// TestBakeFull: a tree bigger than the base's free space fails with
// debugfs's message, not with a broken layer.
func TestBakeFull(t *testing.T) {
	root := t.TempDir()
	for _, name := range []string{"a", "b", "c"} {
		writeFile(t, filepath.Join(root, "usr/share/full", name), strings.Repeat("x", 30<<20), 0o644)
	}
	_, err := bakeTree(t, root)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "writing the install tree into the layer: debugfs reported errors")
	t.Log(err)
}

func fileHash(t *testing.T, p string) [32]byte {
	t.Helper()
	f, err := os.Open(p)
	require.NoError(t, err)
	defer f.Close()
	h := sha256.New()
	_, err = io.Copy(h, f)
	require.NoError(t, err)
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum
}
