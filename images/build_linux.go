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
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// buildWithMmdebstrap is the real build: mmdebstrap makes the tree, the
// kernel and initrd are copied out of its /boot, and mkfs.ext4 -d turns the
// tree into rootfs.img without mounting anything.
//
// As root, mmdebstrap writes a directory (--mode=root) whose ownership is
// already right. Otherwise it runs in --mode=unshare and writes a tarball,
// which mke2fs 1.47.1 and later can read with -d directly, so no step needs
// root or a loop device.
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
	if os.Geteuid() != 0 {
		mode = "unshare"
		if err := requireTarCapableMke2fs(ctx, mkfs); err != nil {
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

	target := filepath.Join(work, "tree")
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

	mkfsLog := filepath.Join(work, "mkfs.log")
	err = log.step(fmt.Sprintf("mkfs.ext4 -d (%s)", r.RootfsSize), func() error {
		return runLogged(ctx, mkfsLog, mkfs, "-q", "-F", "-L", "root", "-E", "root_owner=0:0",
			"-d", target, filepath.Join(out, RootfsFile), r.RootfsSize)
	})
	if err != nil {
		return nil, withLogTail(fmt.Errorf("mkfs.ext4: %w", err), mkfsLog)
	}
	if err := log.step("remove the tree", func() error { return removeTree(target) }); err != nil {
		return nil, err
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
		Initrd:        InitrdFile,
		Rootfs:        RootfsFile,
		RootfsFormat:  "raw",
		RootDevice:    r.RootDevice,
		KernelCmdline: r.KernelCmdline,
		BootInitrd:    r.Initrd,
		Packages:      boot.packages,
	}, nil
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
		// The host's resolv.conf must not leak into a shared image.
		`rm -f "$1/etc/resolv.conf"`,
		// The files may have changed /etc/initramfs-tools.
		`chroot "$1" update-initramfs -u -k all`,
		// Mark /etc and /var as up to date with /usr, so every boot of the
		// pristine image does not run ldconfig, hwdb and catalog updates
		// (ConditionNeedsUpdate).
		`chroot "$1" /usr/lib/systemd/systemd-update-done`,
	)
	args = append(args, "--customize-hook="+strings.Join(script, "\n"))
	return append(args, r.Distribution, target)
}

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

var mke2fsVersionRE = regexp.MustCompile(`mke2fs (\d+)\.(\d+)(?:\.(\d+))?`)

// requireTarCapableMke2fs checks that mke2fs can read a tarball with -d
// (e2fsprogs 1.47.1), which the rootless build depends on.
func requireTarCapableMke2fs(ctx context.Context, mkfs string) error {
	out, _ := exec.CommandContext(ctx, mkfs, "-V").CombinedOutput()
	m := mke2fsVersionRE.FindSubmatch(out)
	if m == nil {
		return fmt.Errorf("cannot tell the version of %s (output %q)", mkfs, out)
	}
	v := [3]int{}
	for i := range v {
		v[i], _ = strconv.Atoi(string(m[i+1]))
	}
	if v[0] > 1 || v[0] == 1 && (v[1] > 47 || v[1] == 47 && v[2] >= 1) {
		return nil
	}
	return fmt.Errorf("building an image without root needs mke2fs 1.47.1 or later (tarball input for -d); %s is %d.%d.%d: run the build as root or install a newer e2fsprogs", mkfs, v[0], v[1], v[2])
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
	return &bootFiles{kernelVersion: kernels[0], packages: pkgs}, nil
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
