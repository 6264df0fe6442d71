package flock

import (
	"context"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Entry is a cache entry that runs use while it exists and that one of
// them builds when it is missing: a build-tree layer, a snapshot
// template. It has two lock files. Every run holds Lock shared for as
// long as it uses the entry, so a prune, which takes Lock exclusively
// without waiting (TryExclusive), never removes an entry in use or being
// built. A run
// that finds the entry missing builds it under BuildLock, held
// exclusively; the other runs missing it wait there, for that build
// alone, and never for the runs that hold Lock: asking for Lock
// exclusively instead would wait for every run using the entry to end.
type Entry struct {
	// What names the entry in errors and logs ("layer", "snapshot
	// template").
	What string
	// Lock and BuildLock are the paths of the two lock files; they are
	// created if missing and never removed (removing a lock file that
	// another process has open would let two builders run at once).
	Lock, BuildLock string
	// Ready reports whether the entry is there to use.
	Ready func() bool
	// Build makes the entry; it runs with BuildLock held, so any half
	// made entry of the same key is a killed builder's.
	Build func(ctx context.Context) error
	// Waiting is called once when a run starts to wait for another's
	// build (nil: nothing is said).
	Waiting func()
	// Poll is how often a blocked lock is tried again (default 50 ms).
	Poll time.Duration
}

// Hold returns once the entry is ready, having built it if no other run
// had (built says so), with Lock held shared until release is called.
func (e Entry) Hold(ctx context.Context) (release func(), built bool, err error) {
	unlock, err := e.lock(ctx, e.Lock, unix.LOCK_SH, nil)
	if err != nil {
		return nil, false, err
	}
	if e.Ready() {
		return unlock, false, nil
	}
	unlockBuild, err := e.lock(ctx, e.BuildLock, unix.LOCK_EX, e.Waiting)
	if err != nil {
		unlock()
		return nil, false, err
	}
	defer unlockBuild()
	if e.Ready() {
		return unlock, false, nil // built while this run waited
	}
	if err := e.Build(ctx); err != nil {
		unlock()
		return nil, false, err
	}
	return unlock, true, nil
}

func (e Entry) lock(ctx context.Context, path string, how int, waiting func()) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("%s lock: %w (is the cache directory writable?)", e.What, err)
	}
	if waiting == nil {
		waiting = func() {}
	}
	poll := e.Poll
	if poll <= 0 {
		poll = 50 * time.Millisecond
	}
	if err := Wait(ctx, f, how, poll, waiting); err != nil {
		f.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("waiting for %s lock %s: %w", e.What, path, err)
		}
		return nil, fmt.Errorf("%s lock %s: %w", e.What, path, err)
	}
	return func() { f.Close() }, nil
}
