// Package flock waits for flock(2) locks on vmharness's cache files (an
// image being built, a build-tree layer being made, a snapshot template
// being saved) in a way that a context can end: flock itself blocks
// without a timeout, so the wait is a poll. Entry is the two-lock
// protocol of a cache entry that runs use and one of them builds.
package flock

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Wait takes the lock how (unix.LOCK_SH or unix.LOCK_EX) on f. While
// another process holds a conflicting lock it calls waiting once, so the
// caller can say what it waits for, and retries every poll until it has
// the lock or ctx ends; then it returns context.Cause(ctx). Other flock
// errors are returned as they are.
func Wait(ctx context.Context, f *os.File, how int, poll time.Duration, waiting func()) error {
	told := false
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			return err
		}
		if !told && waiting != nil {
			waiting()
		}
		told = true
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return context.Cause(ctx)
		case <-t.C:
		}
	}
}

// TryExclusive takes the lock file at path exclusively if nobody holds it,
// without waiting: what a prune does before it removes what the lock
// guards (see Entry). taken is false while another process holds the
// lock; then unlock is nil. The file is created if missing.
func TryExclusive(path string) (unlock func(), taken bool, err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, false, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() { f.Close() }, true, nil
}
