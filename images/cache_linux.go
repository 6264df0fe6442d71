package images

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmharness/vmharness/internal/flock"
)

// Environment variables that steer where images come from.
const (
	// CacheDirEnv overrides the cache directory.
	CacheDirEnv = "VMHARNESS_CACHE_DIR"
	// ImageDirEnv names a prebuilt image directory to use as is, skipping
	// the recipe and the cache.
	ImageDirEnv = "VMHARNESS_IMAGE_DIR"
)

// CacheDir returns the vmharness cache directory: $VMHARNESS_CACHE_DIR, else
// $XDG_CACHE_HOME/vmharness, else ~/.cache/vmharness.
func CacheDir(getenv func(string) string) (string, error) {
	if d := getenv(CacheDirEnv); d != "" {
		return filepath.Abs(d)
	}
	if d := getenv("XDG_CACHE_HOME"); d != "" && filepath.IsAbs(d) {
		return filepath.Join(d, "vmharness"), nil
	}
	home := getenv("HOME")
	if home == "" {
		var err error
		if home, err = os.UserHomeDir(); err != nil {
			return "", fmt.Errorf("find the cache directory: set %s or HOME: %w", CacheDirEnv, err)
		}
	}
	return filepath.Join(home, ".cache", "vmharness"), nil
}

// Resolve returns the image runs should boot: the directory named by
// $VMHARNESS_IMAGE_DIR if set, else the recipe's image from the cache, built
// on demand (progress goes to progress).
func Resolve(ctx context.Context, getenv func(string) string, r *Recipe, progress io.Writer) (*Image, error) {
	if d := getenv(ImageDirEnv); d != "" {
		img, err := Open(d)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", ImageDirEnv, err)
		}
		return img, nil
	}
	cache, err := CacheDir(getenv)
	if err != nil {
		return nil, err
	}
	return NewBuilder(cache, progress).Ensure(ctx, r)
}

// buildFunc builds the image for r into the empty directory dir and returns
// its manifest. Builder uses mmdebstrap; tests substitute their own.
type buildFunc func(ctx context.Context, r *Recipe, key, dir string, log *progressLog) (*Manifest, error)

// Builder finds images in a cache directory and builds missing ones.
type Builder struct {
	cacheDir string
	progress io.Writer
	build    buildFunc
}

// NewBuilder returns a Builder for the cache at cacheDir that writes progress
// lines to progress (nil discards them).
func NewBuilder(cacheDir string, progress io.Writer) *Builder {
	if progress == nil {
		progress = io.Discard
	}
	return &Builder{cacheDir: cacheDir, progress: progress, build: buildWithMmdebstrap}
}

// imagePaths are the cache paths that belong to one recipe key.
type imagePaths struct {
	dir       string // the finished image
	lock      string // serialises builders
	tmpPrefix string // prefix of temporary build directories
}

func pathsFor(cacheDir string, r *Recipe, key string) imagePaths {
	base := fmt.Sprintf("%s-%s", r.Name, key[:16])
	imagesDir := filepath.Join(cacheDir, "images")
	return imagePaths{
		dir:       filepath.Join(imagesDir, base),
		lock:      filepath.Join(imagesDir, base+".lock"),
		tmpPrefix: filepath.Join(imagesDir, ".tmp-"+base+"-"),
	}
}

// CacheImageDir is the directory the recipe's image has (or would have) in
// the cache at cacheDir.
func CacheImageDir(cacheDir string, r *Recipe) (string, error) {
	key, err := r.Key()
	if err != nil {
		return "", err
	}
	return pathsFor(cacheDir, r, key).dir, nil
}

// Lookup returns the recipe's image if it is already in the cache, and an
// error wrapping fs.ErrNotExist if it is not.
func Lookup(cacheDir string, r *Recipe) (*Image, error) {
	key, err := r.Key()
	if err != nil {
		return nil, err
	}
	return Open(pathsFor(cacheDir, r, key).dir)
}

// Ensure returns the recipe's image, building it first if the cache does not
// have it. Concurrent callers, in this process or others, build it once: the
// first takes the key's lock and builds, the rest wait for the lock and then
// find the finished image.
func (b *Builder) Ensure(ctx context.Context, r *Recipe) (*Image, error) {
	key, err := r.Key()
	if err != nil {
		return nil, err
	}
	p := pathsFor(b.cacheDir, r, key)
	if img, err := Open(p.dir); err == nil {
		return img, nil
	}
	if err := os.MkdirAll(filepath.Dir(p.dir), 0o755); err != nil {
		return nil, fmt.Errorf("image cache: %w", err)
	}
	unlock, err := b.lock(ctx, p.lock, r.Name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	// Whoever held the lock before us may have finished the image.
	if img, err := Open(p.dir); err == nil {
		return img, nil
	}
	if err := removeStaleBuilds(p.tmpPrefix); err != nil {
		return nil, err
	}
	if err := b.buildLocked(ctx, r, key, p); err != nil {
		return nil, fmt.Errorf("build image %s (%s): %w", r.Name, r.source, err)
	}
	return Open(p.dir)
}

// lock takes the exclusive flock on path, polling so ctx can interrupt the
// wait, and says once on the progress stream that it is waiting.
func (b *Builder) lock(ctx context.Context, path, name string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("image cache lock: %w", err)
	}
	err = flock.Wait(ctx, f, unix.LOCK_EX, 200*time.Millisecond, func() {
		fmt.Fprintf(b.progress, "vmharness: image %s: waiting for another process building image %s (lock %s)\n", name, name, path)
	})
	if err != nil {
		f.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("waiting for image %s lock: %w", name, err)
		}
		return nil, fmt.Errorf("image cache lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// buildLocked builds into a fresh temporary directory next to the final one
// and renames it into place; the caller holds the key's lock.
func (b *Builder) buildLocked(ctx context.Context, r *Recipe, key string, p imagePaths) (err error) {
	tmp, err := os.MkdirTemp(filepath.Dir(p.tmpPrefix), filepath.Base(p.tmpPrefix))
	if err != nil {
		return fmt.Errorf("image cache: %w", err)
	}
	defer func() {
		if err != nil {
			if rmErr := removeTree(tmp); rmErr != nil {
				err = errors.Join(err, rmErr)
			}
		}
	}()
	log := newProgressLog(b.progress, r.Name)
	start := time.Now()
	log.printf("building image %s (key %s) in %s", r.Name, key[:16], tmp)
	out := filepath.Join(tmp, "image")
	if err := os.Mkdir(out, 0o755); err != nil {
		return err
	}
	m, err := b.build(ctx, r, key, out, log)
	if err != nil {
		return err
	}
	m.Name, m.FormatVersion, m.Key, m.Recipe, m.RecipeSource = r.Name, FormatVersion, key, r, r.source
	m.BuiltAt = time.Now().UTC()
	m.BuildSeconds = time.Since(start).Seconds()
	if err := writeManifest(out, m); err != nil {
		return err
	}
	if err := syncDir(out); err != nil {
		return err
	}
	// The rename is what makes the image visible; nothing reads tmp.
	if err := os.Rename(out, p.dir); err != nil {
		return fmt.Errorf("publish image: %w", err)
	}
	if err := syncDir(filepath.Dir(p.dir)); err != nil {
		return err
	}
	log.printf("image ready in %s: %s", time.Since(start).Round(100*time.Millisecond), p.dir)
	return removeTree(tmp)
}

func writeManifest(dir string, m *Manifest) error {
	data, err := jsonIndent(m)
	if err != nil {
		return fmt.Errorf("encode manifest: %w", err)
	}
	return writeFileSync(filepath.Join(dir, ManifestFile), data, 0o644)
}

// syncDir fsyncs every regular file in dir and then dir itself, so a
// renamed-in image survives a crash complete or not at all.
func syncDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		if err := fsyncPath(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	return fsyncPath(dir)
}

func fsyncPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", path, err)
	}
	return nil
}

func writeFileSync(path string, data []byte, perm os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// removeStaleBuilds removes temporary directories left by builds of the same
// key that were killed; the caller holds the key's lock, so none is live.
func removeStaleBuilds(tmpPrefix string) error {
	stale, err := filepath.Glob(tmpPrefix + "*")
	if err != nil {
		return err
	}
	for _, d := range stale {
		if err := removeTree(d); err != nil {
			return fmt.Errorf("remove leftover build %s: %w", d, err)
		}
	}
	return nil
}

// removeTree deletes a build directory. A killed mmdebstrap can leave /proc,
// /sys or device bind mounts inside its tree; deleting through those would
// reach the host's files, so mounts below dir are detached first and the
// removal is refused if any remain.
func removeTree(dir string) error {
	dir = filepath.Clean(dir)
	for attempt := 0; ; attempt++ {
		mounts, err := mountsBelow(dir)
		if err != nil {
			return err
		}
		if len(mounts) == 0 {
			break
		}
		if attempt == 2 {
			return fmt.Errorf("refusing to delete %s: still mounted below it: %s", dir, strings.Join(mounts, ", "))
		}
		// Deepest first, so nested mounts go before their parents.
		for i := len(mounts) - 1; i >= 0; i-- {
			_ = unix.Unmount(mounts[i], unix.MNT_DETACH)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		if os.Geteuid() == 0 {
			return fmt.Errorf("remove %s: %w", dir, err)
		}
		// A rootless build killed while its tree was unpacked leaves
		// files of subordinate ids, which only its user namespace can
		// remove.
		ns, nsErr := newUserNamespace(context.Background())
		if nsErr != nil {
			return fmt.Errorf("remove %s: %w", dir, errors.Join(err, nsErr))
		}
		return ns.removeAll(dir)
	}
	return nil
}

// mountsBelow lists mount points strictly inside dir, shortest path first.
func mountsBelow(dir string) ([]string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	sortByLength(out)
	return out, nil
}

// unescapeMountinfo undoes the kernel's octal escaping of space, tab,
// newline and backslash in mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range []byte(s[i+1 : i+4]) {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + (c - '0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
