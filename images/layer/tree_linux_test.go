package layer

import (
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// sparse makes a file of size bytes that takes no disk space.
func sparse(t *testing.T, path string, size int64) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	f, err := os.Create(path)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(size))
	require.NoError(t, f.Close())
}

func TestScanRefuses(t *testing.T) {
	tests := []struct {
		name     string
		rootOnly bool
		make     func(t *testing.T, root string)
		want     string
	}{
		{name: "fifo", make: func(t *testing.T, root string) {
			require.NoError(t, os.MkdirAll(filepath.Join(root, "usr/share"), 0o755))
			require.NoError(t, syscall.Mkfifo(filepath.Join(root, "usr/share/pipe"), 0o644))
		}, want: "the install tree has /usr/share/pipe, a fifo; a layer holds only regular files, directories and symlinks"},
		{name: "socket", make: func(t *testing.T, root string) {
			require.NoError(t, os.MkdirAll(filepath.Join(root, "usr/share"), 0o755))
			l, err := net.Listen("unix", filepath.Join(root, "usr/share/sock"))
			require.NoError(t, err)
			t.Cleanup(func() { l.Close() })
		}, want: "/usr/share/sock, a socket"},
		{name: "device node", rootOnly: true, make: func(t *testing.T, root string) {
			require.NoError(t, os.MkdirAll(filepath.Join(root, "usr/share"), 0o755))
			require.NoError(t, syscall.Mknod(filepath.Join(root, "usr/share/null"), syscall.S_IFCHR|0o666, 1<<8|3))
		}, want: "/usr/share/null, a character device"},
		{name: "proc", make: func(t *testing.T, root string) {
			writeFile(t, filepath.Join(root, "proc/x"), "x", 0o644)
		}, want: "the install tree has /proc, but /proc is procfs in the guest; a layer cannot hold it"},
		{name: "sys", make: func(t *testing.T, root string) {
			writeFile(t, filepath.Join(root, "sys/kernel/x"), "x", 0o644)
		}, want: "/sys is sysfs in the guest"},
		{name: "dev", make: func(t *testing.T, root string) {
			require.NoError(t, os.MkdirAll(filepath.Join(root, "dev"), 0o755))
		}, want: "/dev is devtmpfs in the guest"},
		{name: "run", make: func(t *testing.T, root string) {
			writeFile(t, filepath.Join(root, "run/hello/pid"), "1", 0o644)
		}, want: "/run is a tmpfs in the guest"},
		{name: "tmp", make: func(t *testing.T, root string) {
			writeFile(t, filepath.Join(root, "tmp/x"), "x", 0o644)
		}, want: "/tmp is a tmpfs in the guest"},
		{name: "var/run", make: func(t *testing.T, root string) {
			writeFile(t, filepath.Join(root, "var/run/hello.pid"), "1", 0o644)
		}, want: "the install tree has /var/run, but /var/run is a symlink to /run (a tmpfs) in the guest"},
		{name: "file too big", make: func(t *testing.T, root string) {
			sparse(t, filepath.Join(root, "usr/share/big"), MaxFileBytes+1)
		}, want: "the install tree has /usr/share/big of 512 MiB, over the layer's limit of 512 MiB per file"},
		{name: "tree too big", make: func(t *testing.T, root string) {
			for _, n := range []string{"a", "b", "c", "d", "e"} {
				sparse(t, filepath.Join(root, "usr/share", n), MaxFileBytes)
			}
		}, want: "the install tree has 2560 MiB of files, over the layer's limit of 2048 MiB"},
		{name: "merged usr clash", make: func(t *testing.T, root string) {
			writeFile(t, filepath.Join(root, "lib/udev/rules.d/99-x.rules"), "a", 0o644)
			writeFile(t, filepath.Join(root, "usr/lib/udev/rules.d/99-x.rules"), "b", 0o644)
		}, want: "the install tree has both /lib/udev/rules.d/99-x.rules and /usr/lib/udev/rules.d/99-x.rules, which are one path in the guest"},
		{name: "merged usr link itself", make: func(t *testing.T, root string) {
			require.NoError(t, os.Symlink("usr/bin", filepath.Join(root, "bin")))
		}, want: "the install tree has /bin as a symlink, but in the guest /bin is the merged-/usr symlink to usr/bin; install below /usr instead"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.rootOnly && os.Geteuid() != 0 {
				t.Skip("making a device node needs root")
			}
			root := t.TempDir()
			writeFile(t, filepath.Join(root, "usr/bin/fine"), "x", 0o755)
			tt.make(t, root)
			_, err := scan(root)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestScanMergedUsrDirectoriesMerge(t *testing.T) {
	root := t.TempDir()
	writeFile(t, filepath.Join(root, "lib/systemd/system/a.service"), "a", 0o644)
	writeFile(t, filepath.Join(root, "usr/lib/systemd/system/b.service"), "b", 0o644)
	writeFile(t, filepath.Join(root, "sbin/tool"), "t", 0o755)
	tr, err := scan(root)
	require.NoError(t, err)
	var names []string
	for _, e := range tr.entries {
		names = append(names, e.name)
	}
	assert.Equal(t, []string{"usr/lib/systemd/system/a.service", "usr/lib/systemd/system/b.service", "usr/sbin/tool"}, names)
	assert.Equal(t, 3, tr.files)
	assert.EqualValues(t, 3, tr.bytes)
}
