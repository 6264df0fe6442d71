package flock

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
)

func open(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	return f
}

func TestWait(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.lock")
	holder, waiter := open(t, path), open(t, path)

	// Free: taken at once, without a word.
	require.NoError(t, Wait(context.Background(), holder, unix.LOCK_SH, time.Millisecond, func() { t.Error("waiting called for a free lock") }))
	// Shared with shared: no wait either.
	require.NoError(t, Wait(context.Background(), waiter, unix.LOCK_SH, time.Millisecond, func() { t.Error("waiting called for a shared lock") }))
	require.NoError(t, unix.Flock(int(waiter.Fd()), unix.LOCK_UN))

	// Exclusive against a holder: waits, says so once, gets it once the
	// holder lets go.
	calls := 0
	go func() {
		time.Sleep(100 * time.Millisecond)
		unix.Flock(int(holder.Fd()), unix.LOCK_UN)
	}()
	require.NoError(t, Wait(context.Background(), waiter, unix.LOCK_EX, 5*time.Millisecond, func() { calls++ }))
	assert.Equal(t, 1, calls)

	// The context ends the wait, with its cause.
	cause := errors.New("the run was stopped")
	ctx, cancel := context.WithCancelCause(context.Background())
	time.AfterFunc(50*time.Millisecond, func() { cancel(cause) })
	err := Wait(ctx, holder, unix.LOCK_EX, 5*time.Millisecond, nil)
	assert.ErrorIs(t, err, cause)
}

func TestTryExclusive(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.lock")
	unlock, taken, err := TryExclusive(path)
	require.NoError(t, err)
	require.True(t, taken, "nobody holds it")
	_, again, err := TryExclusive(path)
	require.NoError(t, err)
	assert.False(t, again, "the first taker still holds it")
	unlock()

	holder := open(t, path)
	require.NoError(t, unix.Flock(int(holder.Fd()), unix.LOCK_SH))
	unlock, taken, err = TryExclusive(path)
	require.NoError(t, err)
	assert.False(t, taken, "a shared holder keeps a prune out")
	assert.Nil(t, unlock)
	holder.Close()
	unlock, taken, err = TryExclusive(path)
	require.NoError(t, err)
	assert.True(t, taken)
	unlock()

	_, _, err = TryExclusive(filepath.Join(t.TempDir(), "missing", "x.lock"))
	require.ErrorIs(t, err, os.ErrNotExist)
}
