package runner

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vmharness/vmharness/internal/flock"
)

// pruneCanTake reports whether a prune could take the template's lock
// now (exclusively, without waiting), as images.Prune does.
func pruneCanTake(t *testing.T, dir string) bool {
	t.Helper()
	unlock, taken, err := flock.TryExclusive(dir + ".lock")
	require.NoError(t, err)
	if taken {
		unlock()
	}
	return taken
}

// TestHoldTemplate checks holdTemplate's wiring of flock.Entry, whose own
// tests cover concurrent runs: the first run builds the missing template
// and holds <dir>.lock, where a prune looks; a run that finds the
// template needs no build lock; a prune can take the template once both
// have released it.
func TestHoldTemplate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "default-0123456789abcdef-fedcba9876543210")
	built := false
	open := func() error {
		if !built {
			return errors.New("no template")
		}
		return nil
	}
	builds := 0
	build := func() error { builds++; built = true; return nil }
	first, err := holdTemplate(context.Background(), dir, open, build, nil)
	require.NoError(t, err)
	assert.Equal(t, 1, builds)
	assert.False(t, pruneCanTake(t, dir), "a prune must not take a template a run holds")

	b, err := os.OpenFile(dir+".build.lock", os.O_RDWR|os.O_CREATE, 0o644)
	require.NoError(t, err)
	defer b.Close()
	require.NoError(t, unix.Flock(int(b.Fd()), unix.LOCK_EX|unix.LOCK_NB), "the first run let go of the build lock")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	second, err := holdTemplate(ctx, dir, open, build, nil)
	require.NoError(t, err, "a built template is used without the build lock")
	assert.Equal(t, 1, builds)

	first()
	assert.False(t, pruneCanTake(t, dir), "the second run still holds it")
	second()
	assert.True(t, pruneCanTake(t, dir), "once the runs are over, a prune may take it")
}

func TestHoldTemplateBuildFails(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "default-0123456789abcdef-fedcba9876543210")
	boom := errors.New("template VM did not boot")
	_, err := holdTemplate(context.Background(), dir,
		func() error { return errors.New("no template") },
		func() error { return boom }, nil)
	require.ErrorIs(t, err, boom)
	assert.True(t, pruneCanTake(t, dir), "a failed build leaves no lock held")
}

func TestHoldTemplateCancelled(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "default-0123456789abcdef-fedcba9876543210")
	// Another run is building: it holds the build lock.
	f, err := os.OpenFile(dir+".build.lock", os.O_RDWR|os.O_CREATE, 0o644)
	require.NoError(t, err)
	defer f.Close()
	require.NoError(t, unix.Flock(int(f.Fd()), unix.LOCK_EX))
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = holdTemplate(ctx, dir, func() error { return errors.New("no template") },
		func() error { t.Error("built while another run held the build lock"); return nil }, nil)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Contains(t, err.Error(), "waiting for snapshot template lock")
	assert.True(t, pruneCanTake(t, dir), "a cancelled wait leaves no lock held")
}
