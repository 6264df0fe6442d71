package images

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vmharness/vmharness/images/layer"
	"github.com/vmharness/vmharness/internal/flock"
)

// A run that boots a cached image holds a shared flock on the image's lock
// file (the one builders take exclusively) until QEMU has exited; Prune
// takes the lock exclusively without waiting and skips an image it cannot
// get. QEMU keeps the backing file open anyway, but a run that has found
// the image and not yet started QEMU would otherwise lose it.

// Acquire is Resolve for a run: besides finding (or building) the image,
// it holds a shared lock on a cached image until release is called, so that
// Prune leaves it alone while a VM boots from it. An image named by
// $VMHARNESS_IMAGE_DIR is locked only if it has a lock file beside it (that
// is, it is a cache directory).
func Acquire(ctx context.Context, getenv func(string) string, r *Recipe, progress io.Writer) (img *Image, release func(), err error) {
	// Prune may remove the image between Resolve finding it and the lock:
	// then look again, which builds it anew.
	for attempt := 0; attempt < 3; attempt++ {
		img, err := Resolve(ctx, getenv, r, progress)
		if err != nil {
			return nil, nil, err
		}
		release, err := holdShared(img.Dir+".lock", getenv(ImageDirEnv) == "")
		if err != nil {
			return nil, nil, err
		}
		if _, err := os.Stat(img.Rootfs); err == nil {
			return img, release, nil
		}
		release()
	}
	return nil, nil, errors.New("image cache: the image was removed three times while this run started; is `vmharness image prune --all` running in a loop?")
}

// holdShared takes a shared flock on path, creating the file if create is
// set and otherwise doing nothing when it does not exist.
func holdShared(path string, create bool) (release func(), err error) {
	flags := os.O_RDONLY
	if create {
		flags = os.O_RDWR | os.O_CREATE
	}
	f, err := os.OpenFile(path, flags, 0o644)
	if errors.Is(err, fs.ErrNotExist) && !create {
		return func() {}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("image lock: %w", err)
	}
	// A builder holds the lock exclusively only while the image does not
	// exist yet, so this wait is short or none.
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH); err != nil {
		f.Close()
		return nil, fmt.Errorf("image lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// PruneReport is what Prune did, one line per cache entry it looked at.
type PruneReport struct {
	Removed []PrunedEntry
	Kept    []PrunedEntry
}

// PrunedEntry is one image or leftover build directory in the cache.
type PrunedEntry struct {
	Dir    string
	Bytes  int64
	Reason string // why it was kept; empty for removed entries
}

// imageDirName matches the cache's image directories (<recipe>-<16 hex>)
// and its leftover build directories (.tmp-<recipe>-<16 hex>-<random>).
var (
	imageDirName = regexp.MustCompile(`^([A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{16})$`)
	tmpDirName   = regexp.MustCompile(`^\.tmp-([A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{16})-[0-9]+$`)
)

// SnapshotsDir is the cache's directory of snapshot templates (`run
// --snapshot`): <image directory name>-<16 hex>/ per template, next to
// its .lock file, its build's .tmp-<pid>/ directory and, after a failed
// build, its .failed-console.log.
const SnapshotsDir = "snapshots"

// Prune removes the images in the cache at cacheDir except those whose
// directories are listed in keep, the build-tree layers no run holds
// (layer.Prune), the snapshot templates of images that are gone, and the
// leftovers of killed builds. Images, layers and templates a run is using
// and builds in progress are kept and reported. Lock files stay: deleting
// a lock file others may have open would let two builders of one key run
// at once.
func Prune(cacheDir string, keep []string) (*PruneReport, error) {
	rep, err := pruneImages(cacheDir, keep)
	if rep == nil {
		rep = &PruneReport{}
	}
	snapErr := pruneSnapshots(cacheDir, rep)
	err = errors.Join(err, snapErr)
	removed, kept, layerErr := layer.Prune(cacheDir)
	for _, e := range removed {
		rep.Removed = append(rep.Removed, PrunedEntry{Dir: e.Path, Bytes: e.Bytes})
	}
	for _, e := range kept {
		rep.Kept = append(rep.Kept, PrunedEntry{Dir: e.Path, Bytes: e.Bytes, Reason: e.Reason})
	}
	return rep, errors.Join(err, layerErr)
}

func pruneImages(cacheDir string, keep []string) (*PruneReport, error) {
	imagesDir := filepath.Join(cacheDir, "images")
	entries, err := os.ReadDir(imagesDir)
	if errors.Is(err, fs.ErrNotExist) {
		return &PruneReport{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("image cache: %w", err)
	}
	keepSet := map[string]bool{}
	for _, k := range keep {
		keepSet[filepath.Clean(k)] = true
	}
	rep := &PruneReport{}
	var errs []error
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(imagesDir, e.Name())
		var base string
		if m := imageDirName.FindStringSubmatch(e.Name()); m != nil {
			base = m[1]
		} else if m := tmpDirName.FindStringSubmatch(e.Name()); m != nil {
			base = m[1]
		} else {
			continue // not ours
		}
		size := layer.DiskUsage(dir)
		if keepSet[dir] {
			rep.Kept = append(rep.Kept, PrunedEntry{Dir: dir, Bytes: size, Reason: "current recipe"})
			continue
		}
		reason, err := removeIfUnused(dir, filepath.Join(imagesDir, base+".lock"))
		switch {
		case err != nil:
			errs = append(errs, err)
		case reason != "":
			rep.Kept = append(rep.Kept, PrunedEntry{Dir: dir, Bytes: size, Reason: reason})
		default:
			rep.Removed = append(rep.Removed, PrunedEntry{Dir: dir, Bytes: size})
		}
	}
	sort.Slice(rep.Removed, func(i, j int) bool { return rep.Removed[i].Dir < rep.Removed[j].Dir })
	sort.Slice(rep.Kept, func(i, j int) bool { return rep.Kept[i].Dir < rep.Kept[j].Dir })
	return rep, errors.Join(errs...)
}

// templateName matches snapshot template directories (<image directory
// name>-<16 hex>, the image's directory a cache entry or any directory
// VMHARNESS_IMAGE_DIR named) and the build directories of templates
// (.tmp-<pid>).
var templateName = regexp.MustCompile(`^(([^.].*)-[0-9a-f]{16})(\.tmp-[0-9]+)?$`)

// pruneSnapshots removes the snapshot templates whose image directory is
// no longer in the cache (pruned now or before, or an image outside the
// cache named by VMHARNESS_IMAGE_DIR), unless a run holds the template's
// lock, and the build directories no builder holds. A template of an
// image that stays is kept: runs of that image reuse it.
func pruneSnapshots(cacheDir string, rep *PruneReport) error {
	root := filepath.Join(cacheDir, SnapshotsDir)
	entries, err := os.ReadDir(root)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("snapshot template cache: %w", err)
	}
	var errs []error
	for _, e := range entries {
		if name, ok := strings.CutSuffix(e.Name(), ".failed-console.log"); ok && e.Type().IsRegular() {
			// A failed build's console, kept for its image's next runs.
			if m := templateName.FindStringSubmatch(name); m != nil && m[3] == "" && !isDir(filepath.Join(cacheDir, "images", m[2])) {
				path := filepath.Join(root, e.Name())
				size := layer.DiskUsage(path)
				if err := os.Remove(path); err != nil {
					errs = append(errs, err)
				} else {
					rep.Removed = append(rep.Removed, PrunedEntry{Dir: path, Bytes: size})
				}
			}
			continue
		}
		m := templateName.FindStringSubmatch(e.Name())
		if !e.IsDir() || m == nil {
			continue // lock files and what is not ours
		}
		template, image, building := m[1], m[2], m[3] != ""
		dir := filepath.Join(root, e.Name())
		size := layer.DiskUsage(dir)
		if !building && isDir(filepath.Join(cacheDir, "images", image)) {
			rep.Kept = append(rep.Kept, PrunedEntry{Dir: dir, Bytes: size, Reason: "snapshot template of a kept image"})
			continue
		}
		reason, err := removeIfUnused(dir, filepath.Join(root, template+".lock"))
		switch {
		case err != nil:
			errs = append(errs, err)
		case reason != "" && building:
			rep.Kept = append(rep.Kept, PrunedEntry{Dir: dir, Bytes: size, Reason: "a snapshot template is being built"})
		case reason != "":
			rep.Kept = append(rep.Kept, PrunedEntry{Dir: dir, Bytes: size, Reason: "snapshot template in use by a run"})
		default:
			rep.Removed = append(rep.Removed, PrunedEntry{Dir: dir, Bytes: size})
		}
	}
	sort.Slice(rep.Removed, func(i, j int) bool { return rep.Removed[i].Dir < rep.Removed[j].Dir })
	sort.Slice(rep.Kept, func(i, j int) bool { return rep.Kept[i].Dir < rep.Kept[j].Dir })
	return errors.Join(errs...)
}

func isDir(path string) bool {
	info, err := os.Stat(path)
	return err == nil && info.IsDir()
}

// removeIfUnused removes dir if it can take lockPath exclusively at once;
// otherwise it returns why dir stays.
func removeIfUnused(dir, lockPath string) (keptBecause string, err error) {
	unlock, taken, err := flock.TryExclusive(lockPath)
	if err != nil {
		return "", fmt.Errorf("image lock: %w", err)
	}
	if !taken {
		if strings.HasPrefix(filepath.Base(dir), ".tmp-") {
			return "a build is in progress", nil
		}
		return "in use by a run (or being built)", nil
	}
	defer unlock()
	return "", removeTree(dir)
}
