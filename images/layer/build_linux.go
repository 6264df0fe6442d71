package layer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Options says which build directory to install, over which base image,
// and where the cache is.
type Options struct {
	// BuildDir is the Meson build directory (after meson setup and a build).
	BuildDir string
	// Base is the root file system the layer goes over: a cached image's
	// raw ext4 rootfs.img, which is only ever read.
	Base string
	// CacheDir is the vmharness cache directory; layers go to its layers/.
	CacheDir string
	// Logf receives progress lines; nil discards them.
	Logf func(format string, args ...any)
}

// Cache paths below CacheDir.
const (
	layersDir      = "layers"
	stagePrefix    = ".stage-"     // a run's meson install --destdir, flocked while in use
	newStagePrefix = ".new-stage-" // a staging directory not yet locked
	tmpPrefix      = ".tmp-"       // .tmp-<key>-<random>/: a layer being written
	layerExt       = ".qcow2"
	lockExt        = ".lock"
	buildLockExt   = ".build.lock"
)

// mesonTailLines is how much of a failed meson install's output an error
// carries: enough for the failing step, short enough for a test log.
const mesonTailLines = 10

// Build installs the build directory into a private staging directory,
// turns the installed tree into a layer over o.Base and returns the
// layer's path in the cache, a qcow2 image backed by o.Base. A layer of
// the same tree over the same base is reused, not rewritten.
// The layer is held against Prune until release is called; the caller
// must call it once the VM that uses the layer has exited.
func Build(ctx context.Context, o Options) (path string, release func(), err error) {
	logf := o.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	buildDir, err := checkBuildDir(o.BuildDir)
	if err != nil {
		return "", nil, err
	}
	baseID, err := baseIdentity(o.Base)
	if err != nil {
		return "", nil, err
	}
	dir := filepath.Join(o.CacheDir, layersDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", nil, fmt.Errorf("layer cache: %w", err)
	}
	removeStaleStages(dir)

	start := time.Now()
	stage, err := newStage(dir)
	if err != nil {
		return "", nil, err
	}
	defer stage.remove()
	if err := mesonInstall(ctx, buildDir, stage.dir); err != nil {
		return "", nil, err
	}
	t, err := scan(stage.dir)
	if err != nil {
		return "", nil, fmt.Errorf("build directory %s: %w", buildDir, err)
	}
	if len(t.entries) == 0 {
		return "", nil, fmt.Errorf("build directory %s: meson install installed nothing (does anything in the project have install: true?)", buildDir)
	}
	// The key is the hash of the tree's canonical archive (every byte of
	// every file, names, modes, links; owners and times fixed) and of the
	// base image's identity: a pass that writes nowhere costs a read of
	// the (page-cached) tree and spares a run whose layer is cached any
	// writing.
	h := sha256.New()
	if _, err := writeArchive(h, t.entries); err != nil {
		return "", nil, fmt.Errorf("build directory %s: %w", buildDir, err)
	}
	fmt.Fprintf(h, "\x00base %s", baseID)
	key := hex.EncodeToString(h.Sum(nil))
	installed := time.Since(start)

	l := layerPaths{dir: dir, key: key, base: o.Base}
	built, release, err := l.acquire(ctx, logf, t)
	if err != nil {
		return "", nil, err
	}
	verb := "reused"
	if built {
		verb = "built"
	}
	logf("layer %s %s: %d files, %.1f MB from %s (install and hash %s, total %s)",
		key[:16], verb, t.files, float64(t.bytes)/1e6, buildDir,
		installed.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	return l.layer(), release, nil
}

// baseIdentity names the base image file so that a layer is reused only
// over the very file it was made from: an image rebuilt under the same
// name (after a prune) is another file, with other blocks.
func baseIdentity(base string) (string, error) {
	if base == "" {
		return "", errors.New("no base image given for the layer")
	}
	abs, err := filepath.Abs(base)
	if err != nil {
		return "", err
	}
	var st unix.Stat_t
	if err := unix.Stat(abs, &st); err != nil {
		return "", fmt.Errorf("base image for the layer: %w", &fs.PathError{Op: "stat", Path: abs, Err: err})
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return "", fmt.Errorf("base image for the layer %s is not a regular file", abs)
	}
	return fmt.Sprintf("%s dev=%d ino=%d size=%d mtime=%d.%09d", abs, st.Dev, st.Ino, st.Size, st.Mtim.Sec, st.Mtim.Nsec), nil
}

// checkBuildDir returns dir made absolute if it is a configured Meson
// build directory.
func checkBuildDir(dir string) (string, error) {
	if dir == "" {
		return "", errors.New("no build directory given")
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("build directory %s: %w", dir, err)
	}
	if fi, err := os.Stat(abs); err != nil {
		return "", fmt.Errorf("build directory %s: %w", dir, err)
	} else if !fi.IsDir() {
		return "", fmt.Errorf("build directory %s is not a directory", dir)
	}
	for _, marker := range []string{"meson-private/coredata.dat", "meson-info"} {
		if _, err := os.Stat(filepath.Join(abs, marker)); err != nil {
			return "", fmt.Errorf("%s is not a Meson build directory (no %s); run meson setup first", dir, marker)
		}
	}
	return abs, nil
}

// mesonInstall runs meson install into destdir. The umask is fixed so a
// project with install_umask=preserve gives the same layer for every user.
func mesonInstall(ctx context.Context, buildDir, destdir string) error {
	meson, err := exec.LookPath("meson")
	if err != nil {
		return fmt.Errorf("meson install: %w (install meson)", err)
	}
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", `umask 022 && exec "$@"`, "sh",
		meson, "install", "-C", buildDir, "--destdir", destdir, "--no-rebuild", "--quiet")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("meson install -C %s: %w", buildDir, context.Cause(ctx))
		}
		return fmt.Errorf("meson install -C %s failed (%v); its last lines:\n%s", buildDir, err, tail(out.String(), mesonTailLines))
	}
	return nil
}

// tail returns the last n non-empty lines of s, indented.
func tail(s string, n int) string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if strings.TrimSpace(l) != "" {
			lines = append(lines, "    "+strings.TrimRight(l, "\r "))
		}
	}
	if len(lines) == 0 {
		return "    (no output)"
	}
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// stage is a private directory meson installs into, flocked while it is
// in use so Prune (and other runs) can tell it from a killed run's.
type stage struct {
	dir  string
	lock *os.File
}

func newStage(layers string) (*stage, error) {
	// Made under another name and renamed once locked, so that no other
	// run ever sees an unlocked staging directory and takes it for a
	// killed run's.
	tmp, err := os.MkdirTemp(layers, newStagePrefix)
	if err != nil {
		return nil, fmt.Errorf("layer staging directory: %w", err)
	}
	dir := filepath.Join(layers, stagePrefix+strings.TrimPrefix(filepath.Base(tmp), newStagePrefix))
	f, err := os.Open(tmp)
	if err == nil {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			err = os.Rename(tmp, dir)
		}
	}
	if err != nil {
		if f != nil {
			f.Close()
		}
		os.Remove(tmp)
		return nil, fmt.Errorf("layer staging directory %s: %w", dir, err)
	}
	return &stage{dir: dir, lock: f}, nil
}

func (s *stage) remove() {
	_ = removeAll(s.dir)
	s.lock.Close()
}

// removeStaleStages removes staging directories whose runs were killed.
// Failures only leave garbage for Prune, so they are not errors.
func removeStaleStages(layers string) {
	stale, _ := filepath.Glob(filepath.Join(layers, stagePrefix+"*"))
	for _, d := range stale {
		_, _ = removeStageIfUnused(d)
	}
}

// removeStageIfUnused removes a staging directory unless a live run holds
// its lock, and says whether it did.
func removeStageIfUnused(dir string) (removed bool, err error) {
	f, err := os.Open(dir)
	if err != nil {
		return false, err
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return false, nil
		}
		return false, fmt.Errorf("layer staging directory %s: %w", dir, err)
	}
	return true, removeAll(dir)
}

// removeAll removes a tree that may hold directories without write
// permission (install_mode 0555), which os.RemoveAll cannot empty unless
// the caller is root.
func removeAll(dir string) error {
	if err := os.RemoveAll(dir); err == nil {
		return nil
	}
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			_ = os.Chmod(p, 0o700)
		}
		return nil
	})
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	return nil
}
