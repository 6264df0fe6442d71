// Package flock waits for flock(2) locks on vmharness's cache files (an
// image being built, a build-tree layer being made, a snapshot template
// being saved) in a way that a context can end: flock itself blocks
// without a timeout, so the wait is a poll. Entry is the two-lock
// protocol of a cache entry that runs use and one of them builds.
package flock

import (
	"context"
	"errors"
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
