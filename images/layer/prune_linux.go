package layer

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"syscall"

	"github.com/vmharness/vmharness/internal/flock"
)

// Pruned is one layer-cache entry that Prune looked at.
type Pruned struct {
	Path   string
	Bytes  int64
	Reason string // why it was kept; empty for removed entries
}

var (
	// .cpio: the layers of vmharness before layers became qcow2 images.
	layerName = regexp.MustCompile(`^([0-9a-f]{64})\.(qcow2|cpio)$`)
	tmpName   = regexp.MustCompile(`^\.tmp-([0-9a-f]{64})-[0-9]+$`)
	stageName = regexp.MustCompile(`^\.stage-[0-9]+$`)
)

// Prune removes the layers in the cache at cacheDir that no run holds, and
// what killed runs left behind (staging directories, half-written layers).
// A layer a run holds, a layer being written and a live run's staging
// directory are kept and reported. Lock files stay: deleting one that
// another process has open would let two writers of one key run at once.
func Prune(cacheDir string) (removed, kept []Pruned, err error) {
	dir := filepath.Join(cacheDir, layersDir)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("layer cache: %w", err)
	}
	var errs []error
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		var reason string
		var err error
		size := DiskUsage(p)
		switch {
		case layerName.MatchString(e.Name()):
			key := layerName.FindStringSubmatch(e.Name())[1]
			reason, err = removeIfUnlocked(p, filepath.Join(dir, key+lockExt), "in use by a run (or being written)")
		case tmpName.MatchString(e.Name()):
			key := tmpName.FindStringSubmatch(e.Name())[1]
			reason, err = removeIfUnlocked(p, filepath.Join(dir, key+lockExt), "being written")
		case e.IsDir() && stageName.MatchString(e.Name()):
			var ok bool
			ok, err = removeStageIfUnused(p)
			if !ok && err == nil {
				reason = "a run is installing into it"
			}
		default:
			continue // lock files, and anything not ours
		}
		switch {
		case err != nil:
			errs = append(errs, err)
		case reason != "":
			kept = append(kept, Pruned{Path: p, Bytes: size, Reason: reason})
		default:
			removed = append(removed, Pruned{Path: p, Bytes: size})
		}
	}
	sort.Slice(removed, func(i, j int) bool { return removed[i].Path < removed[j].Path })
	sort.Slice(kept, func(i, j int) bool { return kept[i].Path < kept[j].Path })
	return removed, kept, errors.Join(errs...)
}

// removeIfUnlocked removes path if it can take lockPath exclusively at
// once; otherwise it returns keptBecause.
func removeIfUnlocked(path, lockPath, keptBecause string) (string, error) {
	unlock, taken, err := flock.TryExclusive(lockPath)
	if err != nil {
		return "", fmt.Errorf("layer lock: %w", err)
	}
	if !taken {
		return keptBecause, nil
	}
	defer unlock()
	if err := removeAll(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("remove layer: %w", err)
	}
	return "", nil
}

// DiskUsage is the bytes allocated to the regular files at or below p
// (less than their length for sparse files, such as a raw root file
// system). Image prune uses it too.
func DiskUsage(p string) int64 {
	var total int64
	_ = filepath.WalkDir(p, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		if info, err := d.Info(); err == nil {
			if st, ok := info.Sys().(*syscall.Stat_t); ok {
				total += st.Blocks * 512
			}
		}
		return nil
	})
	return total
}
