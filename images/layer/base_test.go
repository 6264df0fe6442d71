package layer

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// The base image of the layer tests: a small ext4 file system, made
// without root by mkfs.ext4 -d, shaped like the guest's merged-/usr root.
var (
	baseOnce sync.Once
	basePath string
	baseErr  error
)

// testBase returns the path of the shared test base image. Tests never
// write it; TestBakeLeavesBaseAlone checks that.
func testBase(t *testing.T) string {
	t.Helper()
	for _, tool := range []string{"mkfs.ext4", "debugfs", "e2fsck", "qemu-img"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed (scripts/install-deps installs e2fsprogs and qemu-utils): %v", tool, err)
		}
	}
	baseOnce.Do(func() { basePath, baseErr = makeTestBase() })
	require.NoError(t, baseErr)
	return basePath
}

func makeTestBase() (string, error) {
	dir, err := os.MkdirTemp("", "vmharness-layer-base-")
	if err != nil {
		return "", err
	}
	root := filepath.Join(dir, "root")
	files := map[string]string{
		"usr/bin/hello.sh":                       "#!/bin/sh\necho base\n",
		"usr/bin/tool":                           "base tool\n",
		"usr/lib/systemd/system/base.service":    "[Service]\nExecStart=/bin/true\n",
		"usr/lib/systemd/system-generators/keep": "keep",
		"usr/share/doc/base/README":              "base",
		"etc/hostname":                           "base\n",
		"usr/share/alt/file":                     "alt",
		"usr/share/dir-with-files/inside":        "inside",
	}
	for name, content := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return "", err
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			return "", err
		}
	}
	for link, target := range map[string]string{
		"bin": "usr/bin", "lib": "usr/lib", "sbin": "usr/sbin",
		"etc/alt": "/usr/share/alt", "usr/bin/old-link": "tool",
	} {
		if err := os.Symlink(target, filepath.Join(root, link)); err != nil {
			return "", err
		}
	}
	if err := os.MkdirAll(filepath.Join(root, "usr/sbin"), 0o755); err != nil {
		return "", err
	}
	img := filepath.Join(dir, "rootfs.img")
	out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", root, "-E", "root_owner=0:0", img, "64M").CombinedOutput()
	if err != nil {
		return "", &exec.ExitError{Stderr: out}
	}
	return img, nil
}

// imageFS reads a file system in a qcow2 layer (or raw image) with
// debugfs, through a raw copy qemu-img makes.
type imageFS struct {
	t   *testing.T
	raw string
}

func openImage(t *testing.T, img string) *imageFS {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "image.raw")
	out, err := exec.Command("qemu-img", "convert", "-O", "raw", img, raw).CombinedOutput()
	require.NoError(t, err, "qemu-img convert: %s", out)
	return &imageFS{t: t, raw: raw}
}

func (f *imageFS) debugfs(cmd string) string {
	f.t.Helper()
	out, err := exec.Command("debugfs", "-R", cmd, f.raw).CombinedOutput()
	require.NoError(f.t, err, "debugfs -R %q: %s", cmd, out)
	return strings.TrimPrefix(string(out), "debugfs 1.47.0 (5-Feb-2023)\n")
}

// cat returns a file's contents.
func (f *imageFS) cat(p string) string {
	f.t.Helper()
	out, err := exec.Command("debugfs", "-R", "cat "+p, f.raw).Output()
	require.NoError(f.t, err)
	return string(out)
}

var statLine = regexp.MustCompile(`Inode: (\d+)\s+Type: (\w+)\s+Mode:\s+(\d+)[\s\S]*?User:\s+(\d+)\s+Group:\s+(\d+)[\s\S]*?Links: (\d+)`)

// inode is what stat says of a path; ok is false if it does not exist.
type inode struct {
	ino   int
	kind  string // regular, directory, symlink
	mode  uint32 // permission bits (with setuid, setgid, sticky)
	uid   int
	gid   int
	links int
	ok    bool
}

func (f *imageFS) stat(p string) inode {
	f.t.Helper()
	out, _ := exec.Command("debugfs", "-R", "stat "+p, f.raw).CombinedOutput()
	m := statLine.FindStringSubmatch(string(out))
	if m == nil {
		return inode{}
	}
	num := func(s string, base int) int {
		v, err := strconv.ParseInt(s, base, 64)
		require.NoError(f.t, err)
		return int(v)
	}
	return inode{ino: num(m[1], 10), kind: m[2], mode: uint32(num(m[3], 8)), uid: num(m[4], 10), gid: num(m[5], 10), links: num(m[6], 10), ok: true}
}

// fsck fails the test unless e2fsck finds the file system clean.
func (f *imageFS) fsck() {
	f.t.Helper()
	out, err := exec.Command("e2fsck", "-f", "-n", f.raw).CombinedOutput()
	require.NoError(f.t, err, "e2fsck: %s", out)
}

var linkDest = regexp.MustCompile(`Fast link dest: "(.*)"`)

// readlink returns a (short) symlink's target.
func (f *imageFS) readlink(p string) string {
	f.t.Helper()
	m := linkDest.FindStringSubmatch(f.debugfs("stat " + p))
	require.NotNil(f.t, m, "%s is not a fast symlink", p)
	return m[1]
}
