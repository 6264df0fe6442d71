package flock

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

// pruneCanTake reports whether a prune (TryExclusive) would take the
// lock now.
func pruneCanTake(t *testing.T, path string) bool {
	t.Helper()
	unlock, taken, err := TryExclusive(path)
	require.NoError(t, err)
	if taken {
		unlock()
	}
	return taken
}

func testEntry(dir string, ready func() bool, build func(context.Context) error) Entry {
	return Entry{What: "thing", Lock: filepath.Join(dir, "k.lock"), BuildLock: filepath.Join(dir, "k.build.lock"),
		Ready: ready, Build: build, Poll: 10 * time.Millisecond}
}

// TestEntryOneBuilder starts runs at once on a missing entry: exactly one
// builds it, and the others wait for that build alone. Each run keeps its
// hold until all have returned, so a protocol in which a missing run asks
// for the shared lock exclusively (and so waits for every run using the
// entry) never returns here.
func TestEntryOneBuilder(t *testing.T) {
	dir := t.TempDir()
	var ready atomic.Bool
	var builds, waited, builtReports atomic.Int32
	e := testEntry(dir, ready.Load, func(context.Context) error {
		builds.Add(1)
		time.Sleep(300 * time.Millisecond)
		ready.Store(true)
		return nil
	})
	e.Waiting = func() { waited.Add(1) }
	const runs = 5
	releases := make(chan func(), runs)
	var wg sync.WaitGroup
	for range runs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			release, built, err := e.Hold(context.Background())
			if assert.NoError(t, err) {
				releases <- release
				if built {
					builtReports.Add(1)
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("runs still waiting while every run holds the entry: they wait for runs, not for the build")
	}
	close(releases)
	assert.Equal(t, int32(1), builds.Load(), "one build")
	assert.Equal(t, int32(1), builtReports.Load(), "the builder alone says it built")
	assert.Positive(t, waited.Load(), "the others said they waited for it")
	assert.False(t, pruneCanTake(t, e.Lock), "a prune must not take an entry runs hold")
	assert.True(t, pruneCanTake(t, e.BuildLock), "nobody builds any more")
	for release := range releases {
		release()
	}
	assert.True(t, pruneCanTake(t, e.Lock), "once the runs are over, a prune may take it")
}

func TestEntryReady(t *testing.T) {
	dir := t.TempDir()
	e := testEntry(dir, func() bool { return true }, func(context.Context) error {
		t.Error("built an entry that was ready")
		return nil
	})
	// Another run holds it, and another is building something under the
	// build lock: neither stops a run that finds the entry ready.
	other, _, err := e.Hold(context.Background())
	require.NoError(t, err)
	defer other()
	b := open(t, e.BuildLock)
	require.NoError(t, unix.Flock(int(b.Fd()), unix.LOCK_EX))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	release, built, err := e.Hold(ctx)
	require.NoError(t, err)
	assert.False(t, built)
	assert.False(t, pruneCanTake(t, e.Lock))
	release()
	other()
	assert.True(t, pruneCanTake(t, e.Lock))
}

func TestEntryBuildFails(t *testing.T) {
	dir := t.TempDir()
	boom := errors.New("the build failed")
	e := testEntry(dir, func() bool { return false }, func(context.Context) error { return boom })
	_, _, err := e.Hold(context.Background())
	require.ErrorIs(t, err, boom)
	assert.True(t, pruneCanTake(t, e.Lock), "a failed build leaves no lock held")
	assert.True(t, pruneCanTake(t, e.BuildLock), "nor the build lock")
}

func TestEntryCancelled(t *testing.T) {
	dir := t.TempDir()
	e := testEntry(dir, func() bool { return false }, func(context.Context) error {
		t.Error("built while another run held the build lock")
		return nil
	})
	b := open(t, e.BuildLock)
	require.NoError(t, unix.Flock(int(b.Fd()), unix.LOCK_EX))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, _, err := e.Hold(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Contains(t, err.Error(), "waiting for thing lock "+e.BuildLock)
	assert.True(t, pruneCanTake(t, e.Lock), "a cancelled wait leaves no lock held")
}

func TestEntryUnwritableCache(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "missing")
	e := testEntry(dir, func() bool { return true }, nil)
	_, _, err := e.Hold(context.Background())
	require.ErrorIs(t, err, os.ErrNotExist)
	assert.Contains(t, err.Error(), "thing lock: ")
	assert.Contains(t, err.Error(), "is the cache directory writable?")
}
