package layer

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vmharness/vmharness/internal/flock"
)

// layerPaths are the cache files of one layer key.
type layerPaths struct {
	dir, key string
	base     string // the base image the layer goes over
}

func (l layerPaths) layer() string         { return filepath.Join(l.dir, l.key+layerExt) }
func (l layerPaths) lockFile() string      { return filepath.Join(l.dir, l.key+lockExt) }
func (l layerPaths) buildLockFile() string { return filepath.Join(l.dir, l.key+buildLockExt) }
func (l layerPaths) tmpPattern() string    { return tmpPrefix + l.key + "-*" }

// acquire makes sure the layer file exists, writing it from t if it does
// not, and returns with a shared lock on the key's lock file that release
// drops (flock.Entry): Prune takes that lock exclusively without waiting,
// so it never removes a layer in use or being written. Writers serialise
// on the key's build lock, so a run that misses the layer while another
// writes it waits for that write alone, not for the runs using the layer.
func (l layerPaths) acquire(ctx context.Context, logf func(string, ...any), t *tree) (built bool, release func(), err error) {
	release, built, err = flock.Entry{
		What: "layer", Lock: l.lockFile(), BuildLock: l.buildLockFile(),
		Ready: func() bool { _, err := os.Stat(l.layer()); return err == nil },
		Build: func(ctx context.Context) error { return l.write(ctx, t) },
		Waiting: func() {
			logf("layer %s: waiting for another run writing it (lock %s)", l.key[:16], l.buildLockFile())
		},
	}.Hold(ctx)
	return built, release, err
}

// write makes the layer in a temporary directory and renames it into
// place. The caller holds the key's build lock, so temporary directories
// of the same key are leftovers of killed runs.
func (l layerPaths) write(ctx context.Context, t *tree) (err error) {
	stale, _ := filepath.Glob(filepath.Join(l.dir, l.tmpPattern()))
	for _, s := range stale {
		_ = os.RemoveAll(s)
	}
	tmp, err := os.MkdirTemp(l.dir, l.tmpPattern())
	if err != nil {
		return fmt.Errorf("layer cache: %w", err)
	}
	defer os.RemoveAll(tmp)
	img := filepath.Join(tmp, "layer"+layerExt)
	if err := bake(ctx, t, l.base, tmp, img); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("making the layer: %w", context.Cause(ctx))
		}
		return err
	}
	// Read-only: runs only ever use it as a backing file.
	if err := os.Chmod(img, 0o444); err != nil {
		return err
	}
	// The rename is what makes the layer visible.
	if err := os.Rename(img, l.layer()); err != nil {
		return fmt.Errorf("publish layer: %w", err)
	}
	d, err := os.Open(l.dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
