package images

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseSubIDs(t *testing.T) {
	file := "# comment\nother:200000:65536\nci:100000:65536\n1001:300000:65536\nci:400000:65536\n"
	tests := []struct {
		name, user, uid, file string
		want                  subIDRange
		err                   string
	}{
		{"by name, first line wins", "ci", "1001", file, subIDRange{100000, 65536}, ""},
		{"by uid", "nobody-else", "1001", file, subIDRange{300000, 65536}, ""},
		{"missing", "alice", "1002", file, subIDRange{}, "no line for alice"},
		{"empty file", "ci", "1001", "", subIDRange{}, "no line for ci"},
		{"too small for a Debian tree", "ci", "1001", "ci:100000:1000\n", subIDRange{}, "fewer than the 65534"},
		{"malformed", "ci", "1001", "ci:x:65536\n", subIDRange{}, "malformed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseSubIDs(strings.NewReader(tt.file), tt.user, tt.uid)
			if tt.err != "" {
				assert.ErrorContains(t, err, tt.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestUserNamespaceArgsAndMaps(t *testing.T) {
	ns := &userNamespace{unshare: "unshare", uid: subIDRange{100000, 65536}, gid: subIDRange{200000, 65535}}
	assert.Equal(t, []string{"--map-root-user", "--map-users=100000,1,65536", "--map-groups=200000,1,65535", "--", "id"}, ns.args("id"))
	assert.True(t, ns.maps(0, 0))
	assert.True(t, ns.maps(65534, 65534), "nobody")
	assert.True(t, ns.maps(65536, 65535))
	assert.False(t, ns.maps(65537, 0))
	assert.False(t, ns.maps(0, 65536))
}

func TestDebugfsScript(t *testing.T) {
	s, err := debugfsScript([]deviceNode{
		{name: "./dev/null", major: 1, minor: 3, perm: 0o666},
		{name: "./dev/vda", block: true, major: 254, minor: 0, perm: 0o660, gid: 6},
	})
	require.NoError(t, err)
	assert.Equal(t, `cd "/dev"
mknod "null" c 1 3
cd /
set_inode_field "/dev/null" mode 020666
set_inode_field "/dev/null" uid 0
set_inode_field "/dev/null" gid 0
cd "/dev"
mknod "vda" b 254 0
cd /
set_inode_field "/dev/vda" mode 060660
set_inode_field "/dev/vda" uid 0
set_inode_field "/dev/vda" gid 6
`, s)
	_, err = debugfsScript([]deviceNode{{name: "./dev/a\"b"}})
	assert.ErrorContains(t, err, "a name debugfs cannot take")
}

// capNetRaw is security.capability for cap_net_raw+ep (VFS_CAP_REVISION_2),
// as setcap writes it and a root build's image holds it.
const capNetRaw = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

// TestMkfsFromTarInUserNamespace runs the rootless path on a small tarball
// with everything a root build must keep (other owners in a 0700
// directory, setuid, a capability, hard links, fast and slow symlinks,
// device nodes) and reads the image back with debugfs. It needs what a
// rootless build needs: a user other than root with subordinate ids.
func TestMkfsFromTarInUserNamespace(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("tests the rootless path: run as a user with subordinate ids (scripts/test runs it as its CI user)")
	}
	ctx := context.Background()
	ns, err := newUserNamespace(ctx)
	if err != nil {
		t.Skipf("no user namespace for a rootless build here: %v", err)
	}
	mkfs, err := findTool("mkfs.ext4", "")
	require.NoError(t, err)
	debugfs, err := findTool("debugfs", "")
	require.NoError(t, err)

	long := "/usr/share/" + strings.Repeat("long/", 16) + "target"
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(h tar.Header, content string) {
		h.Format = tar.FormatPAX
		h.Size = int64(len(content))
		require.NoError(t, tw.WriteHeader(&h))
		_, err := tw.Write([]byte(content))
		require.NoError(t, err)
	}
	add(tar.Header{Name: "./", Typeflag: tar.TypeDir, Mode: 0o755}, "")
	add(tar.Header{Name: "./dev/", Typeflag: tar.TypeDir, Mode: 0o755}, "")
	add(tar.Header{Name: "./dev/null", Typeflag: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3}, "")
	add(tar.Header{Name: "./dev/tty", Typeflag: tar.TypeChar, Mode: 0o620, Gid: 5, Devmajor: 5, Devminor: 0}, "")
	add(tar.Header{Name: "./usr/", Typeflag: tar.TypeDir, Mode: 0o755}, "")
	add(tar.Header{Name: "./usr/bin/", Typeflag: tar.TypeDir, Mode: 0o755}, "")
	add(tar.Header{Name: "./usr/bin/ping", Typeflag: tar.TypeReg, Mode: 0o755,
		PAXRecords: map[string]string{"SCHILY.xattr.security.capability": capNetRaw}}, "ping")
	add(tar.Header{Name: "./usr/bin/su", Typeflag: tar.TypeReg, Mode: 0o4755}, "su")
	add(tar.Header{Name: "./usr/bin/su-link", Typeflag: tar.TypeLink, Linkname: "./usr/bin/su"}, "")
	add(tar.Header{Name: "./usr/bin/sh", Typeflag: tar.TypeSymlink, Linkname: "dash"}, "")
	add(tar.Header{Name: "./usr/bin/far", Typeflag: tar.TypeSymlink, Linkname: long}, "")
	add(tar.Header{Name: "./home/", Typeflag: tar.TypeDir, Mode: 0o755}, "")
	add(tar.Header{Name: "./home/testuser/", Typeflag: tar.TypeDir, Mode: 0o700, Uid: 4711, Gid: 4712}, "")
	add(tar.Header{Name: "./home/testuser/.profile", Typeflag: tar.TypeReg, Mode: 0o600, Uid: 4711, Gid: 4712}, "x")
	add(tar.Header{Name: "./var/", Typeflag: tar.TypeDir, Mode: 0o755}, "")
	add(tar.Header{Name: "./var/log/", Typeflag: tar.TypeDir, Mode: 0o2755, Gid: 101}, "")
	add(tar.Header{Name: "./var/empty/", Typeflag: tar.TypeDir, Mode: 0o555}, "")
	add(tar.Header{Name: "./tmp/", Typeflag: tar.TypeDir, Mode: 0o1777}, "")
	require.NoError(t, tw.Close())

	work := t.TempDir()
	tarPath := filepath.Join(work, "rootfs.tar")
	require.NoError(t, os.WriteFile(tarPath, buf.Bytes(), 0o644))
	out := filepath.Join(work, "out")
	require.NoError(t, os.Mkdir(out, 0o755))
	// The tarball has no kernel, so bootFilesFromTar fails; its devices
	// and ids are what this test needs of it.
	devices := []deviceNode{
		{name: "./dev/null", major: 1, minor: 3, perm: 0o666},
		{name: "./dev/tty", major: 5, minor: 0, perm: 0o620, gid: 5},
	}
	img := filepath.Join(out, RootfsFile)
	logPath := filepath.Join(work, "mkfs.log")
	tree := filepath.Join(work, "tree")
	err = ns.mkfsFromTar(ctx, logPath, mkfs, tarPath, tree, img, "16M", devices)
	if err != nil {
		log, _ := os.ReadFile(logPath)
		t.Fatalf("%v\n%s", err, log)
	}
	require.NoError(t, addDeviceNodes(ctx, logPath, debugfs, img, devices))

	_, err = os.Lstat(tree)
	assert.ErrorIs(t, err, os.ErrNotExist, "the tree is removed")
	_, err = os.Lstat(tarPath)
	assert.ErrorIs(t, err, os.ErrNotExist, "the tarball is removed")
	var st syscall.Stat_t
	require.NoError(t, syscall.Stat(img, &st))
	assert.Equal(t, uint32(os.Getuid()), st.Uid, "the image belongs to the caller")

	got := listExt4(t, debugfs, img)
	want := map[string]ext4Entry{
		"/dev/null":               {Mode: 0o20666, Links: 1, Device: "01:03"},
		"/dev/tty":                {Mode: 0o20620, GID: 5, Links: 1, Device: "05:00"},
		"/usr/bin/ping":           {Mode: 0o100755, Links: 1, Xattrs: "security.capability (20) = 01 00 00 02 00 20 00 00 00 00 00 00 00 00 00 00 00 00 00 00"},
		"/usr/bin/su":             {Mode: 0o104755, Links: 2},
		"/usr/bin/su-link":        {Mode: 0o104755, Links: 2},
		"/usr/bin/sh":             {Mode: 0o120777, Links: 1, Target: "dash"},
		"/usr/bin/far":            {Mode: 0o120777, Links: 1, Target: long},
		"/home/testuser":          {Mode: 0o40700, UID: 4711, GID: 4712, Links: 2},
		"/home/testuser/.profile": {Mode: 0o100600, UID: 4711, GID: 4712, Links: 1},
		"/var/log":                {Mode: 0o42755, GID: 101, Links: 2},
		"/var/empty":              {Mode: 0o40555, Links: 2},
		"/tmp":                    {Mode: 0o41777, Links: 2},
	}
	for p, w := range want {
		g, ok := got[p]
		if assert.True(t, ok, "%s in the image", p) {
			g.nodeInfo = false
			assert.Equal(t, w.String(), g.String(), p)
		}
	}
}

// TestRemoveTreeOfSubordinateIDs: what a rootless build killed while its
// tree was unpacked leaves (a 0700 directory of a subordinate id, with a
// file in it) is removed by the next build's removeTree.
func TestRemoveTreeOfSubordinateIDs(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("tests the rootless path: run as a user with subordinate ids (scripts/test runs it as its CI user)")
	}
	ns, err := newUserNamespace(context.Background())
	if err != nil {
		t.Skipf("no user namespace for a rootless build here: %v", err)
	}
	dir := filepath.Join(t.TempDir(), ".tmp-leftover")
	out, err := exec.Command(ns.unshare, ns.args("sh", "-c",
		`set -e; mkdir -p "$1/tree/home"; install -d -m 0700 -o 4711 -g 4711 "$1/tree/home/u"; echo x > "$1/tree/home/u/f"; chown 4711:4711 "$1/tree/home/u/f"`,
		"sh", dir)...).CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Error(t, os.RemoveAll(dir), "a plain removal cannot do it")
	require.NoError(t, removeTree(dir))
	_, err = os.Lstat(dir)
	assert.ErrorIs(t, err, os.ErrNotExist)
}
