package layer

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmharness/vmharness/internal/flock"
)

// layerPaths are the cache files of one layer key.
type layerPaths struct {
	dir, key string
	base     string // the base image the layer goes over
}

func (l layerPaths) layer() string      { return filepath.Join(l.dir, l.key+layerExt) }
func (l layerPaths) lockFile() string   { return filepath.Join(l.dir, l.key+lockExt) }
func (l layerPaths) tmpPattern() string { return tmpPrefix + l.key + "-*" }

// acquire makes sure the layer file exists, writing it from t if it does
// not, and returns with a shared lock on the key's lock file that release
// drops. Writers hold the lock exclusively, so the shared lock waits for a
// concurrent writer of the same key and then finds its layer; Prune takes
// it exclusively without waiting, so it never removes a layer in use.
func (l layerPaths) acquire(ctx context.Context, logf func(string, ...any), t *tree) (built bool, release func(), err error) {
	f, err := os.OpenFile(l.lockFile(), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return false, nil, fmt.Errorf("layer lock: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	// Prune may remove the layer between a writer publishing it and this
	// run's shared lock; then write it again.
	for attempt := 0; attempt < 3; attempt++ {
		if err := l.flock(ctx, f, unix.LOCK_SH, logf); err != nil {
			return false, nil, err
		}
		if _, err := os.Stat(l.layer()); err == nil {
			return built, func() { f.Close() }, nil
		}
		// Two runs that both hold the shared lock and both ask for the
		// exclusive one would wait for each other forever: let go first.
		if err := unix.Flock(int(f.Fd()), unix.LOCK_UN); err != nil {
			return false, nil, fmt.Errorf("layer lock %s: %w", l.lockFile(), err)
		}
		if err := l.flock(ctx, f, unix.LOCK_EX, logf); err != nil {
			return false, nil, err
		}
		if _, err := os.Stat(l.layer()); errors.Is(err, fs.ErrNotExist) {
			if err := l.write(ctx, t); err != nil {
				return false, nil, err
			}
			built = true
		}
	}
	return false, nil, fmt.Errorf("layer %s was removed three times while this run started; is `vmharness image prune` running in a loop?", l.layer())
}

// flock takes the lock how (LOCK_SH or LOCK_EX) on f, polling so ctx can
// end the wait, and says once that it waits for another builder.
func (l layerPaths) flock(ctx context.Context, f *os.File, how int, logf func(string, ...any)) error {
	err := flock.Wait(ctx, f, how, 50*time.Millisecond, func() {
		logf("layer %s: waiting for another run writing it (lock %s)", l.key[:16], l.lockFile())
	})
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return fmt.Errorf("waiting for layer lock %s: %w", l.lockFile(), err)
	}
	return fmt.Errorf("layer lock %s: %w", l.lockFile(), err)
}

// write makes the layer in a temporary directory and renames it into
// place. The caller holds the key's lock exclusively, so temporary
// directories of the same key are leftovers of killed runs.
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
