package runner

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// pruneCanTake reports whether a prune could take the template's lock
// now (exclusively, without waiting), as images.Prune does.
func pruneCanTake(t *testing.T, dir string) bool {
	t.Helper()
	f, err := os.OpenFile(dir+".lock", os.O_RDWR|os.O_CREATE, 0o644)
	require.NoError(t, err)
	defer f.Close()
	err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return false
	}
	require.NoError(t, err)
	return true
}

// TestHoldTemplateOneBuilder starts runs at once on a missing template:
// exactly one builds it, the others wait for that build alone (not for
// the runs that hold the template), and a prune cannot take the template
// until every run has released it.
func TestHoldTemplateOneBuilder(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "default-0123456789abcdef-fedcba9876543210")
	var built, builds, waited atomic.Int32
	open := func() error {
		if built.Load() == 0 {
			return errors.New("no template")
		}
		return nil
	}
	build := func() error {
		builds.Add(1)
		time.Sleep(300 * time.Millisecond)
		built.Store(1)
		return nil
	}
	const runs = 5
	releases := make(chan func(), runs)
	var wg sync.WaitGroup
	for range runs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			release, err := holdTemplate(context.Background(), dir, open, build, func() { waited.Add(1) })
			if assert.NoError(t, err) {
				releases <- release
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("runs still waiting while every run holds the template: they wait for runs, not for the build")
	}
	close(releases)
	assert.Equal(t, int32(1), builds.Load(), "one build")
	assert.Positive(t, waited.Load(), "the others said they waited for it")
	assert.False(t, pruneCanTake(t, dir), "a prune must not take a template runs hold")
	for release := range releases {
		release()
	}
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
