package images

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMmdebstrapArgs(t *testing.T) {
	r, err := Default()
	require.NoError(t, err)
	args := mmdebstrapArgs(r, "root", "/w/files.tar", "/w/tree")

	require.GreaterOrEqual(t, len(args), 5)
	assert.Equal(t, []string{"trixie", "/w/tree"}, args[len(args)-2:], "suite and target last, and no mirror after them")
	assert.Contains(t, args, "--mode=root")
	assert.Contains(t, args, "--variant=minbase")
	assert.Contains(t, args, "--include="+strings.Join(r.Packages, ","))
	assert.Contains(t, args, "--customize-hook=tar-in /w/files.tar /")

	var script string
	for _, a := range args {
		if s, ok := strings.CutPrefix(a, "--customize-hook="); ok && !strings.HasPrefix(s, "tar-in") {
			script = s
		}
	}
	assert.Contains(t, script, `chroot "$1" systemctl enable 'vsock-echo.socket'`)
	assert.Contains(t, script, `chroot "$1" systemctl disable 'ssh.service'`)
	assert.Contains(t, script, `chroot "$1" update-initramfs -u -k all`)
	assert.Contains(t, script, `chroot "$1" sh -c 'set -e`, "the static nodes are listed in the tree")
	assert.Less(t, strings.Index(script, "systemctl enable"), strings.Index(script, "update-initramfs"))
	assert.True(t, strings.HasSuffix(script, "systemd-update-done"), "marking /etc and /var up to date must come last")

	unshare := mmdebstrapArgs(r, "unshare", "", "/w/rootfs.tar")
	assert.Contains(t, unshare, "--mode=unshare")
	for _, a := range unshare {
		assert.NotContains(t, a, "tar-in", "no files, no tar-in hook")
	}
}

func TestMmdebstrapArgsSymlinksAndSysusers(t *testing.T) {
	r, err := LoadRecipe(filepath.Join("testdata", "child", "recipe.json"))
	require.NoError(t, err)
	args := mmdebstrapArgs(r, "root", "/w/files.tar", "/w/tree")
	assert.Contains(t, args, "--include="+strings.Join(r.Packages, ","))
	assert.True(t, strings.HasSuffix(args[2], ",jq"), "the child's package comes after the base's: %s", args[2])
	script := strings.TrimPrefix(args[len(args)-3], "--customize-hook=")
	want := []string{
		`chroot "$1" mkdir -p -- '/usr/local/bin'`,
		`chroot "$1" ln -sfT -- '../../bin/jq' '/usr/local/bin/jq-link'`,
		`chroot "$1" systemd-sysusers '/usr/lib/sysusers.d/vmharness-recipe.conf'`,
		`chroot "$1" sh -c 'test -e "$1" || install -d -m 0700 -o "$2" -g "$(id -g "$2")" -- "$1"' sh '/home/testuser' 'testuser'`,
		`chroot "$1" systemctl enable 'vsock-echo.socket'`,
	}
	last := -1
	for _, w := range want {
		i := strings.Index(script, w)
		require.GreaterOrEqual(t, i, 0, "script lacks %q:\n%s", w, script)
		assert.Greater(t, i, last, "%q out of order", w)
		last = i
	}
	assert.Less(t, strings.Index(script, "/home/testuser"), strings.Index(script, "update-initramfs"))
}

func TestStaticNodesScript(t *testing.T) {
	const devname = "# Device nodes to trigger on-demand module loading.\n" +
		"cuse cuse c10:203\n" +
		"tun net/tun c10:200\n" +
		"dm_mod mapper/control c10:236\n" +
		"nbd nbd0 b43:0\n" +
		"\n" +
		"odd odd x1:2\n" +
		"short\n"
	tests := []struct {
		name    string
		kernel  bool
		devname string
		want    string // "" for no file
	}{
		{"nodes", true, devname, "# The static device nodes of kernel 6.1-test (kmod static-nodes), written by vmharness's image build.\n" +
			"c! /dev/cuse 0600 - - - 10:203\n" +
			"d /dev/net 0755 - - -\n" +
			"c! /dev/net/tun 0600 - - - 10:200\n" +
			"d /dev/mapper 0755 - - -\n" +
			"c! /dev/mapper/control 0600 - - - 10:236\n" +
			"b! /dev/nbd0 0600 - - - 43:0\n"},
		{"last line without a newline", true, "# Device nodes\nloop loop-control c10:237", "# The static device nodes of kernel 6.1-test (kmod static-nodes), written by vmharness's image build.\n" +
			"c! /dev/loop-control 0600 - - - 10:237\n"},
		{"no kernel", false, devname, ""},
		{"empty modules.devname", true, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			if tt.kernel {
				require.NoError(t, os.MkdirAll(filepath.Join(root, "boot"), 0o755))
				require.NoError(t, os.WriteFile(filepath.Join(root, "boot", "vmlinuz-6.1-test"), nil, 0o644))
			}
			mods := filepath.Join(root, "usr", "lib", "modules", "6.1-test")
			require.NoError(t, os.MkdirAll(mods, 0o755))
			require.NoError(t, os.WriteFile(filepath.Join(mods, "modules.devname"), []byte(tt.devname), 0o644))

			out, err := exec.Command("/bin/sh", "-c", staticNodesScript, "sh", root).CombinedOutput()
			require.NoError(t, err, "%s", out)
			got, err := os.ReadFile(filepath.Join(root, StaticNodesFile))
			if tt.want == "" {
				assert.ErrorIs(t, err, os.ErrNotExist)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, string(got))
		})
	}
}

func TestParseDpkgStatus(t *testing.T) {
	status := `Package: zlib1g
Status: install ok installed
Version: 1:1.3.dfsg+really1.3.1-1+b1
Description: compression library
 a continuation line: with a colon

Package: removed
Status: deinstall ok config-files
Version: 1.0

Package: apt
Status: install ok installed
Priority: required
Version: 3.0.3
`
	pkgs, err := parseDpkgStatus(strings.NewReader(status))
	require.NoError(t, err)
	assert.Equal(t, []Package{{"apt", "3.0.3"}, {"zlib1g", "1:1.3.dfsg+really1.3.1-1+b1"}}, pkgs)
}

func TestBootFilesFromTar(t *testing.T) {
	type file struct{ name, content string }
	mkTar := func(files ...file) string {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		require.NoError(t, tw.WriteHeader(&tar.Header{Name: "./boot/", Typeflag: tar.TypeDir, Mode: 0o755}))
		require.NoError(t, tw.WriteHeader(&tar.Header{Name: "./vmlinuz", Typeflag: tar.TypeSymlink, Linkname: "boot/vmlinuz-6.1"}))
		for _, f := range files {
			require.NoError(t, tw.WriteHeader(&tar.Header{Name: f.name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(f.content))}))
			_, err := tw.Write([]byte(f.content))
			require.NoError(t, err)
		}
		require.NoError(t, tw.Close())
		p := filepath.Join(t.TempDir(), "rootfs.tar")
		require.NoError(t, os.WriteFile(p, buf.Bytes(), 0o644))
		return p
	}
	status := file{"./var/lib/dpkg/status", "Package: systemd\nStatus: install ok installed\nVersion: 257\n"}

	out := t.TempDir()
	bf, err := bootFilesFromTar(mkTar(file{"./boot/vmlinuz-6.1", "KERNEL"}, file{"./boot/initrd.img-6.1", "INITRD"}, status), out)
	require.NoError(t, err)
	assert.Equal(t, "6.1", bf.kernelVersion)
	assert.Equal(t, []Package{{"systemd", "257"}}, bf.packages)
	for name, want := range map[string]string{KernelFile: "KERNEL", InitrdFile: "INITRD"} {
		got, err := os.ReadFile(filepath.Join(out, name))
		require.NoError(t, err)
		assert.Equal(t, want, string(got))
	}

	_, err = bootFilesFromTar(mkTar(file{"./boot/vmlinuz-6.1", "K"}, status), t.TempDir())
	assert.ErrorContains(t, err, "exactly one kernel and its initrd")
	_, err = bootFilesFromTar(mkTar(file{"./boot/vmlinuz-6.1", "K"}, file{"./boot/vmlinuz-6.2", "K"}, file{"./boot/initrd.img-6.1", "I"}, status), t.TempDir())
	assert.ErrorContains(t, err, "exactly one kernel and its initrd")
	_, err = bootFilesFromTar(mkTar(file{"./boot/vmlinuz-6.1", "K"}, file{"./boot/initrd.img-6.1", "I"}), t.TempDir())
	assert.ErrorContains(t, err, "no var/lib/dpkg/status")
}

func TestRunLoggedCancelStopsTheCommand(t *testing.T) {
	logPath := filepath.Join(t.TempDir(), "log")
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := runLogged(ctx, logPath, "sh", "-c", "echo started; sleep 30")
	require.Error(t, err)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Less(t, time.Since(start), 10*time.Second, "SIGTERM ends the command")
	data, err := os.ReadFile(logPath)
	require.NoError(t, err)
	assert.Contains(t, string(data), "started")
}

func TestWithLogTail(t *testing.T) {
	logPath := filepath.Join(t.TempDir(), "log")
	var lines []string
	for i := range 50 {
		lines = append(lines, "line "+strings.Repeat("x", i%3)+string(rune('A'+i%26)))
	}
	require.NoError(t, os.WriteFile(logPath, []byte(strings.Join(lines, "\n")+"\n"), 0o644))
	err := withLogTail(assert.AnError, logPath)
	assert.ErrorIs(t, err, assert.AnError)
	tail := strings.SplitN(err.Error(), "---\n", 2)[1]
	assert.Equal(t, lines[20:], strings.Split(tail, "\n"))
}

// TestBuildDefaultImageE2E really builds the default image with mmdebstrap
// and inspects the result. It downloads packages and takes minutes.
func TestBuildDefaultImageE2E(t *testing.T) {
	if os.Getenv("VMHARNESS_E2E") != "1" {
		t.Skip("set VMHARNESS_E2E=1 to build the default image with mmdebstrap (needs network, takes 1-3 minutes)")
	}
	for _, tool := range []string{"mmdebstrap", "debugfs"} {
		if _, err := findTool(tool, ""); err != nil {
			t.Skipf("%v", err)
		}
	}
	r, err := Default()
	require.NoError(t, err)
	var progress syncBuffer
	img, err := NewBuilder(t.TempDir(), &progress).Ensure(context.Background(), r)
	require.NoError(t, err, "progress:\n%s", progress.String())
	t.Logf("progress:\n%s", progress.String())

	for _, f := range []string{img.Kernel, img.Initrd, img.Rootfs, filepath.Join(img.Dir, BuildLogFile)} {
		info, err := os.Stat(f)
		require.NoError(t, err)
		assert.Greater(t, info.Size(), int64(1000), f)
	}
	assert.Equal(t, "raw", img.RootfsFormat)
	assert.Contains(t, img.Manifest.KernelVersion, "cloud-amd64")
	names := map[string]bool{}
	for _, p := range img.Manifest.Packages {
		names[p.Name] = true
	}
	for _, want := range r.Packages {
		if !strings.HasPrefix(want, "linux-image") {
			assert.True(t, names[want], "package %s installed", want)
		}
	}

	debugfs, err := findTool("debugfs", "")
	require.NoError(t, err)
	stat := func(path string) string {
		out, err := exec.Command(debugfs, "-R", "stat "+path, img.Rootfs).CombinedOutput()
		require.NoError(t, err, "%s", out)
		require.NotContains(t, string(out), "File not found", path)
		return string(out)
	}
	sshd := stat("/usr/sbin/sshd")
	assert.Regexp(t, `User:\s+0\s+Group:\s+0`, sshd, "sshd is root-owned")
	assert.Regexp(t, `Mode:\s+0755`, sshd)
	assert.Regexp(t, `Mode:\s+04755`, stat("/usr/bin/su"), "setuid bits survive")
	assert.Regexp(t, `Type: symlink`, stat("/etc/systemd/system/sockets.target.wants/vsock-echo.socket"), "the echo socket is enabled")
	assert.Regexp(t, `Type: regular`, stat("/etc/modules-load.d/vsock.conf"))
	assert.Regexp(t, `Size: 0\b`, stat("/etc/machine-id"), "machine-id is empty so every boot gets its own")
	nodes, err := exec.Command(debugfs, "-R", "cat /"+StaticNodesFile, img.Rootfs).Output()
	require.NoError(t, err)
	assert.Contains(t, string(nodes), "c! /dev/net/tun 0600 - - - 10:200\n", "the kernel's static nodes are listed (the boot checks them against kmod: TestE2EBootUnits)")
	assert.Regexp(t, `Mode:\s+01777`, stat("/tmp"))
	out, err := exec.Command(debugfs, "-R", "cat /etc/hostname", img.Rootfs).Output()
	require.NoError(t, err)
	assert.Equal(t, "vmharness\n", string(out))
}

// TestBuildChildImageE2E really builds images/testdata/child, a recipe
// extending the built-in one, and looks into its rootfs.img with debugfs
// for what each of its fields adds.
func TestBuildChildImageE2E(t *testing.T) {
	if os.Getenv("VMHARNESS_E2E") != "1" {
		t.Skip("set VMHARNESS_E2E=1 to build the child test image with mmdebstrap (needs network, takes 1-3 minutes)")
	}
	debugfs, err := findTool("debugfs", "")
	if err != nil {
		t.Skipf("%v", err)
	}
	if _, err := findTool("mmdebstrap", ""); err != nil {
		t.Skipf("%v", err)
	}
	r, err := LoadRecipe(filepath.Join("testdata", "child", "recipe.json"))
	require.NoError(t, err)
	def, err := Default()
	require.NoError(t, err)
	key, err := r.Key()
	require.NoError(t, err)
	defKey, err := def.Key()
	require.NoError(t, err)
	require.NotEqual(t, defKey, key)

	var progress syncBuffer
	img, err := NewBuilder(t.TempDir(), &progress).Ensure(context.Background(), r)
	require.NoError(t, err, "progress:\n%s", progress.String())
	t.Logf("progress:\n%s", progress.String())
	t.Logf("key %s, built in %.1f s", img.Manifest.Key, img.Manifest.BuildSeconds)
	assert.Equal(t, key, img.Manifest.Key)
	assert.Equal(t, "vmharness-test-child", img.Manifest.Name)

	run := func(cmd string) string {
		var stdout, stderr bytes.Buffer
		c := exec.Command(debugfs, "-R", cmd, img.Rootfs)
		c.Stdout, c.Stderr = &stdout, &stderr
		require.NoError(t, c.Run(), "%s", stderr.String())
		require.NotContains(t, stderr.String(), "not found", cmd)
		return stdout.String()
	}
	assert.Regexp(t, `Type: regular`, run("stat /usr/bin/jq"), "the child's package is installed")
	link := run("stat /usr/local/bin/jq-link")
	assert.Regexp(t, `Type: symlink`, link)
	assert.Contains(t, link, `Fast link dest: "../../bin/jq"`)
	assert.Contains(t, run("cat /etc/passwd"), "\ntestuser:x:4711:4711:Test User:/home/testuser:/bin/bash\n")
	assert.Contains(t, run("cat /etc/group"), "\ntestgroup:x:4712:testuser\n")
	home := run("stat /home/testuser")
	assert.Regexp(t, `Type: directory`, home)
	assert.Regexp(t, `User:\s+4711\s+Group:\s+4711`, home)
	assert.Regexp(t, `Mode:\s+0700`, home)
	assert.Contains(t, run("cat "+SysusersConf), "u testuser 4711")
	assert.Equal(t, "written by the child recipe in images/testdata/child\n", run("cat /etc/vmharness-child.conf"))
	assert.Equal(t, "vmharness\n", run("cat /etc/hostname"), "the base's files are there too")
	assert.Regexp(t, `Type: symlink`, run("stat /etc/systemd/system/sockets.target.wants/vsock-echo.socket"), "and its units enabled")
}
