package images

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vmharness/vmharness/images/vmlinux"
)

// buildWithMmdebstrap is the real build: mmdebstrap makes the tree, the
// kernel and initrd are copied out of its /boot, and mkfs.ext4 -d turns the
// tree into rootfs.img without mounting anything.
//
// As root, mmdebstrap writes a directory (--mode=root) whose ownership is
// already right. Otherwise it runs in --mode=unshare and writes a tarball
// (bit for bit what root mode would write), which is unpacked and turned
// into the file system in a user namespace where the tree's owners have
// their own ids (see userNamespace); the device nodes in it, which nothing
// but real root can create, are then written into the image with debugfs.
// No step needs root, a loop device or an e2fsprogs newer than Debian 12's.
func buildWithMmdebstrap(ctx context.Context, r *Recipe, key, out string, log *progressLog) (*Manifest, error) {
	mmdebstrap, err := findTool("mmdebstrap", "install it with apt-get install mmdebstrap")
	if err != nil {
		return nil, err
	}
	mkfs, err := findTool("mkfs.ext4", "install it with apt-get install e2fsprogs")
	if err != nil {
		return nil, err
	}
	work := filepath.Dir(out)
	mode := "root"
	var ns *userNamespace
	var debugfs string
	if os.Geteuid() != 0 {
		mode = "unshare"
		// Checked before mmdebstrap's minutes, not after.
		if debugfs, err = findTool("debugfs", "install it with apt-get install e2fsprogs"); err != nil {
			return nil, err
		}
		if ns, err = newUserNamespace(ctx); err != nil {
			return nil, err
		}
	}

	var filesTar string
	if r.hasFilesTar() {
		filesTar = filepath.Join(work, "files.tar")
		var buf bytes.Buffer
		if err := r.writeFilesTar(&buf); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filesTar, buf.Bytes(), 0o644); err != nil {
			return nil, err
		}
	}

	tree := filepath.Join(work, "tree")
	target := tree
	if mode == "unshare" {
		target = filepath.Join(work, "rootfs.tar")
	}
	args := mmdebstrapArgs(r, mode, filesTar, target)
	logPath := filepath.Join(work, "mmdebstrap.log")
	err = log.step(fmt.Sprintf("mmdebstrap --mode=%s %s (log %s)", mode, r.Distribution, logPath), func() error {
		return runLogged(ctx, logPath, mmdebstrap, args...)
	})
	if err != nil {
		return nil, withLogTail(fmt.Errorf("mmdebstrap: %w", err), logPath)
	}

	var boot *bootFiles
	err = log.step("copy kernel, initrd and package list out of the tree", func() error {
		var err error
		if mode == "root" {
			boot, err = bootFilesFromTree(target, out)
		} else {
			boot, err = bootFilesFromTar(target, out)
		}
		return err
	})
	if err != nil {
		return nil, err
	}

	kernelELF := KernelELFFile
	err = log.step("take the uncompressed kernel out of "+KernelFile+" for a PVH boot", func() error {
		err := vmlinux.ExtractFile(filepath.Join(out, KernelFile), filepath.Join(out, KernelELFFile))
		if errors.Is(err, vmlinux.ErrUnsupported) {
			// Not every kernel can be booted this way; it still boots
			// through its decompressor, only slower.
			log.printf("runs will boot %s through its decompressor: %v", KernelFile, err)
			kernelELF = ""
			return nil
		}
		return err
	})
	if err != nil {
		return nil, err
	}

	img := filepath.Join(out, RootfsFile)
	mkfsLog := filepath.Join(work, "mkfs.log")
	if mode == "root" {
		err = log.step(fmt.Sprintf("mkfs.ext4 -d (%s)", r.RootfsSize), func() error {
			return runLogged(ctx, mkfsLog, mkfs, mkfsArgs(tree, img, r.RootfsSize)...)
		})
		if err != nil {
			return nil, withLogTail(fmt.Errorf("mkfs.ext4: %w", err), mkfsLog)
		}
		if err := log.step("remove the tree", func() error { return removeTree(tree) }); err != nil {
			return nil, err
		}
	} else {
		if !ns.maps(boot.maxUID, boot.maxGID) {
			return nil, fmt.Errorf("the tree has files of uid %d or gid %d, beyond your %d subordinate uids and %d gids: widen the ranges in /etc/subuid and /etc/subgid",
				boot.maxUID, boot.maxGID, ns.uid.count, ns.gid.count)
		}
		err = log.step(fmt.Sprintf("unpack the tree and mkfs.ext4 -d (%s) in a user namespace", r.RootfsSize), func() error {
			return ns.mkfsFromTar(ctx, mkfsLog, mkfs, target, tree, img, r.RootfsSize, boot.devices)
		})
		if err != nil {
			return nil, withLogTail(fmt.Errorf("mkfs.ext4 in a user namespace: %w", err), mkfsLog)
		}
		err = log.step(fmt.Sprintf("add %d device nodes with debugfs", len(boot.devices)), func() error {
			return addDeviceNodes(ctx, mkfsLog, debugfs, img, boot.devices)
		})
		if err != nil {
			return nil, withLogTail(err, mkfsLog)
		}
	}
	// Keep the build's log with the image: it says which package versions
	// went in and what the hooks printed.
	if err := copyFile(logPath, filepath.Join(out, BuildLogFile)); err != nil {
		return nil, err
	}
	return &Manifest{
		BuildMode:     mode,
		KernelVersion: boot.kernelVersion,
		Kernel:        KernelFile,
		KernelELF:     kernelELF,
		Initrd:        InitrdFile,
		Rootfs:        RootfsFile,
		RootfsFormat:  "raw",
		RootDevice:    r.RootDevice,
		KernelCmdline: r.KernelCmdline,
		BootInitrd:    r.Initrd,
		Packages:      boot.packages,
	}, nil
}

// mkfsArgs is mkfs.ext4's command line, the same for both modes.
func mkfsArgs(tree, img, size string) []string {
	return []string{"-q", "-F", "-L", "root", "-E", "root_owner=0:0", "-d", tree, img, size}
}

// unpackAndMkfs is what mkfsFromTar runs as root of the user namespace:
// unpack the tarball with owners, modes and extended attributes (but not
// the device nodes, which mknod refuses there), drop it, make the file
// system from the tree and remove the tree, whose files only this
// namespace may remove. Arguments: tree, tarball, exclude list, mkfs and
// its arguments.
const unpackAndMkfs = `set -e
mkdir -- "$1"
tar -C "$1" -xpf "$2" --numeric-owner --xattrs --xattrs-include='*' --anchored --no-wildcards --exclude-from="$3"
rm -f -- "$2" "$3"
tree=$1
shift 3
"$@"
rm -rf -- "$tree"
`

// mkfsFromTar makes img from mmdebstrap's tarball in the user namespace.
func (ns *userNamespace) mkfsFromTar(ctx context.Context, logPath, mkfs, tarPath, tree, img, size string, devices []deviceNode) error {
	exclude := tarPath + ".exclude"
	var names bytes.Buffer
	for _, d := range devices {
		names.WriteString(d.name + "\n")
	}
	if err := os.WriteFile(exclude, names.Bytes(), 0o644); err != nil {
		return err
	}
	argv := append([]string{"sh", "-c", unpackAndMkfs, "sh", tree, tarPath, exclude, mkfs}, mkfsArgs(tree, img, size)...)
	return runLogged(ctx, logPath, ns.unshare, ns.args(argv...)...)
}

// deviceNode is a character or block device of the tree.
type deviceNode struct {
	name         string // as in the tarball, e.g. ./dev/null
	block        bool
	major, minor int64
	perm         int64 // permission bits, setuid and the like included
	uid, gid     int
}

// debugfsScript writes the device nodes into the image: debugfs's mknod
// makes an inode of the type and numbers, set_inode_field gives it the
// tree's mode and owner.
func debugfsScript(devices []deviceNode) (string, error) {
	var b strings.Builder
	for _, d := range devices {
		p := "/" + strings.TrimPrefix(strings.TrimPrefix(d.name, "./"), "/")
		if strings.ContainsAny(p, "\"\\\n") {
			return "", fmt.Errorf("device node %q: a name debugfs cannot take", d.name)
		}
		kind, typ := "c", int64(0o020000)
		if d.block {
			kind, typ = "b", 0o060000
		}
		// debugfs 1.47.0's mknod links its whole argument, slashes and
		// all, into the current directory: so from the parent.
		fmt.Fprintf(&b, "cd \"%s\"\nmknod \"%s\" %s %d %d\ncd /\n", path.Dir(p), path.Base(p), kind, d.major, d.minor)
		fmt.Fprintf(&b, "set_inode_field \"%s\" mode 0%o\n", p, typ|d.perm&0o7777)
		fmt.Fprintf(&b, "set_inode_field \"%s\" uid %d\n", p, d.uid)
		fmt.Fprintf(&b, "set_inode_field \"%s\" gid %d\n", p, d.gid)
	}
	return b.String(), nil
}

// addDeviceNodes runs the debugfs script on img and checks the file
// system. debugfs exits 0 whatever a command in a script does, so anything
// it says on stderr but its banner is taken as a failure.
func addDeviceNodes(ctx context.Context, logPath, debugfs, img string, devices []deviceNode) error {
	if len(devices) == 0 {
		return nil
	}
	script, err := debugfsScript(devices)
	if err != nil {
		return err
	}
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close()
	fmt.Fprintf(logFile, "+ %s -w -f - %s <<EOF\n%sEOF\n", debugfs, img, script)
	cmd := exec.CommandContext(ctx, debugfs, "-w", "-f", "-", img)
	cmd.Stdin = strings.NewReader(script)
	var stderr bytes.Buffer
	cmd.Stdout = logFile
	cmd.Stderr = io.MultiWriter(logFile, &stderr)
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("debugfs: %w", err)
	}
	for _, line := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
		if line != "" && !strings.HasPrefix(line, "debugfs ") {
			return fmt.Errorf("debugfs could not add the device nodes: %s", line)
		}
	}
	// debugfs writes inodes and directories itself, not through mke2fs's
	// tested path: a read-only e2fsck (a second or two) proves the result
	// consistent before anything boots it.
	e2fsck, err := findTool("e2fsck", "install it with apt-get install e2fsprogs")
	if err != nil {
		return err
	}
	check := exec.CommandContext(ctx, e2fsck, "-f", "-n", img)
	check.Stdout, check.Stderr = logFile, logFile
	fmt.Fprintf(logFile, "+ %s -f -n %s\n", e2fsck, img)
	if err := check.Run(); err != nil {
		return fmt.Errorf("e2fsck -f -n after adding the device nodes: %w", err)
	}
	return nil
}

// mmdebstrapArgs builds mmdebstrap's command line. No mirror is given:
// mmdebstrap's own default (or the host's apt configuration) applies.
func mmdebstrapArgs(r *Recipe, mode, filesTar, target string) []string {
	args := []string{
		"--mode=" + mode,
		"--variant=" + r.Variant,
		"--include=" + strings.Join(r.Packages, ","),
	}
	if filesTar != "" {
		args = append(args, "--customize-hook=tar-in "+filesTar+" /")
	}
	// Hook scripts run as sh -c SCRIPT exec ROOT, so "$1" is the tree.
	// Whatever resolves paths in the tree runs chrooted, so that an
	// absolute symlink in the tree cannot lead it to the host's files.
	var script []string
	script = append(script, "set -e")
	for _, p := range sortedKeys(r.Symlinks) {
		script = append(script,
			`chroot "$1" mkdir -p -- `+shellQuote(path.Dir("/"+p)),
			// -T: a directory in the way is an error, not a place to put
			// the link into.
			`chroot "$1" ln -sfT -- `+shellQuoteAll([]string{r.Symlinks[p], "/" + p}))
	}
	if len(r.Sysusers) > 0 {
		// The tree's own systemd-sysusers, which knows the syntax of the
		// tree's systemd; the host's may be older.
		script = append(script, `chroot "$1" systemd-sysusers `+shellQuote("/"+SysusersConf))
	}
	for _, u := range r.homesToCreate() {
		script = append(script, `chroot "$1" sh -c 'test -e "$1" || install -d -m 0700 -o "$2" -g "$(id -g "$2")" -- "$1"' sh `+
			shellQuoteAll([]string{u.home, u.name}))
	}
	if len(r.EnableUnits) > 0 {
		script = append(script, `chroot "$1" systemctl enable `+shellQuoteAll(r.EnableUnits))
	}
	if len(r.DisableUnits) > 0 {
		// A unit the packages did not install is not an error worth failing
		// the image for; systemctl disable is quiet about missing ones.
		script = append(script, `chroot "$1" systemctl disable `+shellQuoteAll(r.DisableUnits))
	}
	script = append(script,
		// apt gives its download directories to its sandbox user _apt, as
		// on any Debian system, unless mmdebstrap finds that _apt cannot
		// read the tree's path (a root build in a 0700 cache directory)
		// and turns the sandbox off. The same owner whatever the path and
		// mode, so that a root and a rootless build agree.
		`if chroot "$1" id -u _apt >/dev/null 2>&1; then for d in /var/cache/apt/archives/partial /var/lib/apt/lists/partial; do if [ -d "$1$d" ]; then chroot "$1" chown _apt:root "$d"; fi; done; fi`,
		// The host's resolv.conf must not leak into a shared image.
		`rm -f "$1/etc/resolv.conf"`,
		// The files may have changed /etc/initramfs-tools.
		`chroot "$1" update-initramfs -u -k all`,
		// kmod-static-nodes.service's list, made now (see staticNodesScript).
		`chroot "$1" sh -c `+shellQuote(staticNodesScript)+` sh`,
		// Mark /etc and /var as up to date with /usr, so every boot of the
		// pristine image does not run ldconfig, hwdb and catalog updates
		// (ConditionNeedsUpdate).
		`chroot "$1" /usr/lib/systemd/systemd-update-done`,
	)
	args = append(args, "--customize-hook="+strings.Join(script, "\n"))
	return append(args, r.Distribution, target)
}

// StaticNodesFile is where the build writes the static device nodes of
// the image's kernel modules, in tmpfiles.d format.
const StaticNodesFile = "etc/tmpfiles.d/static-nodes.conf"

// staticNodesScript writes StaticNodesFile under the root "$1" (empty:
// "/") from the kernel's modules.devname: what `kmod static-nodes
// --format=tmpfiles` writes to /run/tmpfiles.d/static-nodes.conf at every
// boot (the device nodes whose opening loads a module, such as
// /dev/net/tun or /dev/loop-control), but once per image and without the
// kmod of the running kernel, which a build has not got: kmod reads the
// modules of `uname -r`. So an image can mask kmod-static-nodes.service,
// one unit less on the boot's critical path. The file has the same name
// as the unit's, so /etc's copy takes the place of /run's if a recipe
// unmasks the unit: the nodes are the same as long as the kernel that
// boots is the image's. Without a kernel or a modules.devname it writes
// nothing; a recipe's own file at that path is replaced.
const staticNodesScript = `set -e
for k in "$1"/boot/vmlinuz-*; do v=${k##*/vmlinuz-}; done
f="$1/usr/lib/modules/$v/modules.devname"
test -s "$f" || exit 0
mkdir -p "$1/etc/tmpfiles.d"
{
echo "# The static device nodes of kernel $v (kmod static-nodes), written by vmharness's image build."
while read -r mod dev node || test -n "$mod"; do
  case $mod in ""|"#"*) continue;; esac
  case $node in [bc][0-9]*:[0-9]*) ;; *) continue;; esac
  case $dev in */*) echo "d /dev/${dev%/*} 0755 - - -";; esac
  echo "${node%"${node#?}"}! /dev/$dev 0600 - - - ${node#?}"
done <"$f"
} >"$1/` + StaticNodesFile + `"
`

func shellQuoteAll(words []string) string {
	q := make([]string, len(words))
	for i, w := range words {
		q[i] = shellQuote(w)
	}
	return strings.Join(q, " ")
}

func shellQuote(word string) string {
	return "'" + strings.ReplaceAll(word, "'", `'\''`) + "'"
}

// findTool looks a program up on PATH and in the sbin directories, which
// are often missing from a user's PATH.
func findTool(name, hint string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(dir, name)
		if info, err := os.Stat(p); err == nil && info.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found: %s", name, hint)
}

// runLogged runs a command in its own process group with its output
// appended to logPath. Cancelling ctx sends the group SIGTERM (mmdebstrap
// then unmounts what it mounted in the tree), and vmharness dying sends the
// command SIGTERM; if it has not exited 30 s after a cancel, it gets SIGKILL.
// Whatever it left running in its group is killed after it exits.
func runLogged(ctx context.Context, logPath, name string, args ...string) error {
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close()
	fmt.Fprintf(logFile, "+ %s %s\n", name, strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = nil
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	// The whole group gets SIGTERM: mmdebstrap's main process only waits
	// for its setup process, and that one holds the mounts to undo.
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	err = cmd.Run()
	if cmd.Process != nil {
		// Reap anything the command left running in its group.
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("interrupted: %w", context.Cause(ctx))
	}
	return err
}

// withLogTail appends the last 30 lines of a log file to err.
func withLogTail(err error, logPath string) error {
	data, rerr := os.ReadFile(logPath)
	if rerr != nil {
		return err
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return fmt.Errorf("%w\n--- last lines of %s ---\n%s", err, logPath, strings.Join(lines, "\n"))
}

// bootFiles is what a build takes out of the tree besides the file system.
type bootFiles struct {
	kernelVersion string
	packages      []Package
	// From a tarball only: its device nodes and its highest ids.
	devices        []deviceNode
	maxUID, maxGID int
}

const (
	kernelPrefix = "boot/vmlinuz-"
	initrdPrefix = "boot/initrd.img-"
	dpkgStatus   = "var/lib/dpkg/status"
)

// bootFilesFromTree copies boot/vmlinuz-V and boot/initrd.img-V out of a
// tree into out and reads the package list.
func bootFilesFromTree(tree, out string) (*bootFiles, error) {
	kernels, err := filepath.Glob(filepath.Join(tree, kernelPrefix+"*"))
	if err != nil {
		return nil, err
	}
	if len(kernels) != 1 {
		return nil, fmt.Errorf("want exactly one kernel in the tree's /boot, found %d (%v): install exactly one linux-image package", len(kernels), kernels)
	}
	version := strings.TrimPrefix(filepath.Base(kernels[0]), "vmlinuz-")
	initrd := filepath.Join(tree, initrdPrefix+version)
	if err := copyFile(kernels[0], filepath.Join(out, KernelFile)); err != nil {
		return nil, err
	}
	if err := copyFile(initrd, filepath.Join(out, InitrdFile)); err != nil {
		return nil, fmt.Errorf("initrd for kernel %s: %w (is initramfs-tools installed?)", version, err)
	}
	f, err := os.Open(filepath.Join(tree, dpkgStatus))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	pkgs, err := parseDpkgStatus(f)
	if err != nil {
		return nil, err
	}
	return &bootFiles{kernelVersion: version, packages: pkgs}, nil
}

// bootFilesFromTar does what bootFilesFromTree does, reading mmdebstrap's
// tarball in one pass.
func bootFilesFromTar(tarPath, out string) (*bootFiles, error) {
	f, err := os.Open(tarPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var (
		kernels, initrds []string
		pkgs             []Package
		sawStatus        bool
		devices          []deviceNode
		maxUID, maxGID   int
	)
	tr := tar.NewReader(bufio.NewReaderSize(f, 1<<20))
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", tarPath, err)
		}
		name := strings.TrimPrefix(hdr.Name, "./")
		maxUID, maxGID = max(maxUID, hdr.Uid), max(maxGID, hdr.Gid)
		if hdr.Typeflag == tar.TypeChar || hdr.Typeflag == tar.TypeBlock {
			devices = append(devices, deviceNode{
				name: hdr.Name, block: hdr.Typeflag == tar.TypeBlock,
				major: hdr.Devmajor, minor: hdr.Devminor,
				perm: hdr.Mode & 0o7777, uid: hdr.Uid, gid: hdr.Gid,
			})
		}
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		switch {
		case strings.HasPrefix(name, kernelPrefix) && !strings.Contains(name[len(kernelPrefix):], "/"):
			version := name[len(kernelPrefix):]
			kernels = append(kernels, version)
			if err := writeFrom(tr, filepath.Join(out, KernelFile)); err != nil {
				return nil, err
			}
		case strings.HasPrefix(name, initrdPrefix) && !strings.Contains(name[len(initrdPrefix):], "/"):
			initrds = append(initrds, name[len(initrdPrefix):])
			if err := writeFrom(tr, filepath.Join(out, InitrdFile)); err != nil {
				return nil, err
			}
		case name == dpkgStatus:
			sawStatus = true
			if pkgs, err = parseDpkgStatus(tr); err != nil {
				return nil, err
			}
		}
	}
	if len(kernels) != 1 || len(initrds) != 1 || kernels[0] != initrds[0] {
		return nil, fmt.Errorf("want exactly one kernel and its initrd in the tree's /boot, found kernels %v and initrds %v", kernels, initrds)
	}
	if !sawStatus {
		return nil, fmt.Errorf("%s: no %s in the tree", tarPath, dpkgStatus)
	}
	return &bootFiles{kernelVersion: kernels[0], packages: pkgs, devices: devices, maxUID: maxUID, maxGID: maxGID}, nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	return writeFrom(in, dst)
}

func writeFrom(r io.Reader, dst string) error {
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, r); err != nil {
		out.Close()
		return fmt.Errorf("write %s: %w", dst, err)
	}
	return out.Close()
}
