package images

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// fakeImageDir makes a cache entry with placeholder image files.
func fakeImageDir(t *testing.T, dir string) {
	t.Helper()
	for _, f := range []string{KernelFile, InitrdFile, RootfsFile} {
		writeFile(t, filepath.Join(dir, f), f)
	}
}

func dirs(entries []PrunedEntry) map[string]string {
	m := map[string]string{}
	for _, e := range entries {
		m[filepath.Base(e.Dir)] = e.Reason
	}
	return m
}

func TestPrune(t *testing.T) {
	cache := t.TempDir()
	images := filepath.Join(cache, "images")
	const (
		current = "default-aaaaaaaaaaaaaaaa"
		old     = "default-bbbbbbbbbbbbbbbb"
		inUse   = "default-cccccccccccccccc"
		other   = "custom.v2-dddddddddddddddd"
	)
	for _, d := range []string{current, old, inUse, other} {
		fakeImageDir(t, filepath.Join(images, d))
	}
	writeFile(t, filepath.Join(images, ".tmp-default-eeeeeeeeeeeeeeee-123", "image", "rootfs.img"), "killed build")
	writeFile(t, filepath.Join(images, ".tmp-default-cccccccccccccccc-456", "image", "rootfs.img"), "live build")
	writeFile(t, filepath.Join(images, "not-an-image", "keep-me"), "x")
	writeFile(t, filepath.Join(images, old+".lock"), "")

	release, err := holdShared(filepath.Join(images, inUse+".lock"), true)
	require.NoError(t, err)

	rep, err := Prune(cache, []string{filepath.Join(images, current)})
	require.NoError(t, err)
	assert.Equal(t, map[string]string{old: "", other: "", ".tmp-default-eeeeeeeeeeeeeeee-123": ""}, dirs(rep.Removed))
	assert.Equal(t, map[string]string{
		current:                             "current recipe",
		inUse:                               "in use by a run (or being built)",
		".tmp-default-cccccccccccccccc-456": "a build is in progress",
	}, dirs(rep.Kept))
	for _, e := range rep.Removed {
		assert.NoDirExists(t, e.Dir)
		assert.Positive(t, e.Bytes, "%s: size of what was removed", e.Dir)
	}
	for _, e := range rep.Kept {
		assert.DirExists(t, e.Dir)
	}
	assert.DirExists(t, filepath.Join(images, "not-an-image"), "directories that are not cache entries stay")
	assert.FileExists(t, filepath.Join(images, old+".lock"), "lock files stay: others may have them open")

	// Once the run is over, its image goes too.
	release()
	rep, err = Prune(cache, []string{filepath.Join(images, current)})
	require.NoError(t, err)
	assert.Equal(t, map[string]string{inUse: "", ".tmp-default-cccccccccccccccc-456": ""}, dirs(rep.Removed))
	assert.Equal(t, map[string]string{current: "current recipe"}, dirs(rep.Kept))

	// Without anything to keep, everything goes.
	rep, err = Prune(cache, nil)
	require.NoError(t, err)
	assert.Equal(t, map[string]string{current: ""}, dirs(rep.Removed))
}

func TestPruneEmptyCache(t *testing.T) {
	rep, err := Prune(filepath.Join(t.TempDir(), "never-used"), nil)
	require.NoError(t, err)
	assert.Empty(t, rep.Removed)
	assert.Empty(t, rep.Kept)
}

func TestAcquireHoldsTheImageAgainstPrune(t *testing.T) {
	cache := t.TempDir()
	r := testRecipe(t)
	var calls atomic.Int32
	built, err := testBuilder(cache, &syncBuffer{}, fakeBuild(&calls, 0)).Ensure(context.Background(), r)
	require.NoError(t, err)
	env := map[string]string{CacheDirEnv: cache}
	getenv := func(k string) string { return env[k] }

	img, release, err := Acquire(context.Background(), getenv, r, nil)
	require.NoError(t, err)
	assert.Equal(t, built.Dir, img.Dir)

	rep, err := Prune(cache, nil)
	require.NoError(t, err)
	assert.Empty(t, rep.Removed)
	assert.Equal(t, map[string]string{filepath.Base(img.Dir): "in use by a run (or being built)"}, dirs(rep.Kept))

	release()
	rep, err = Prune(cache, nil)
	require.NoError(t, err)
	assert.Equal(t, map[string]string{filepath.Base(img.Dir): ""}, dirs(rep.Removed))
}

func TestAcquireImageDirWithoutLockFile(t *testing.T) {
	dir := t.TempDir()
	fakeImageDir(t, dir)
	env := map[string]string{ImageDirEnv: dir, CacheDirEnv: t.TempDir()}
	img, release, err := Acquire(context.Background(), func(k string) string { return env[k] }, testRecipe(t), nil)
	require.NoError(t, err)
	defer release()
	assert.Equal(t, dir, img.Dir)
	assert.NoFileExists(t, dir+".lock", "a directory outside the cache gets no lock file")
}

func TestHoldSharedWaitsForBuilder(t *testing.T) {
	lock := filepath.Join(t.TempDir(), "x.lock")
	b := NewBuilder(t.TempDir(), nil)
	unlock, err := b.lock(context.Background(), lock, "x")
	require.NoError(t, err)
	got := make(chan struct{})
	go func() {
		release, err := holdShared(lock, true)
		assert.NoError(t, err)
		close(got)
		release()
	}()
	select {
	case <-got:
		t.Fatal("shared lock granted while a builder holds the lock")
	case <-time.After(200 * time.Millisecond):
	}
	unlock()
	<-got
	_, err = os.Stat(lock)
	require.NoError(t, err)
}

// TestPruneLayers: image prune also removes the build-tree layers no run
// holds (images/layer has the details).
func TestPruneLayers(t *testing.T) {
	cache := t.TempDir()
	layers := filepath.Join(cache, "layers")
	unused := filepath.Join(layers, strings.Repeat("a", 64)+".cpio")
	held := filepath.Join(layers, strings.Repeat("b", 64)+".cpio")
	writeFile(t, unused, "layer")
	writeFile(t, held, "layer")
	release, err := holdShared(strings.TrimSuffix(held, ".cpio")+".lock", true)
	require.NoError(t, err)
	defer release()

	rep, err := Prune(cache, nil)
	require.NoError(t, err)
	assert.Equal(t, map[string]string{filepath.Base(unused): ""}, dirs(rep.Removed))
	assert.Equal(t, map[string]string{filepath.Base(held): "in use by a run (or being written)"}, dirs(rep.Kept))
	assert.NoFileExists(t, unused)
	assert.FileExists(t, held)
}

func TestPruneSnapshotTemplates(t *testing.T) {
	cache := t.TempDir()
	images := filepath.Join(cache, "images")
	snaps := filepath.Join(cache, SnapshotsDir)
	const (
		current  = "default-aaaaaaaaaaaaaaaa"
		old      = "default-bbbbbbbbbbbbbbbb"
		outside  = "my image" // VMHARNESS_IMAGE_DIR=/srv/my image, not in the cache
		shapeA   = "-1111111111111111"
		shapeB   = "-2222222222222222"
		building = ".tmp-4242"
	)
	for _, d := range []string{current, old} {
		fakeImageDir(t, filepath.Join(images, d))
	}
	for _, d := range []string{current + shapeA, current + shapeB, old + shapeA, old + shapeB, outside + shapeA, old + shapeA + building, current + shapeA + building} {
		writeFile(t, filepath.Join(snaps, d, "state"), "migration stream of "+d)
	}
	writeFile(t, filepath.Join(snaps, old+shapeB+".failed-console.log"), "why the template did not build")
	writeFile(t, filepath.Join(snaps, current+shapeB+".failed-console.log"), "kept with its image")
	writeFile(t, filepath.Join(snaps, "not-a-template", "keep-me"), "x")

	// A run restores from old's template A; a run builds current's
	// template A (its .tmp dir) and holds that template's lock.
	inUse, err := holdShared(filepath.Join(snaps, old+shapeB+".lock"), true)
	require.NoError(t, err)
	builder, err := os.OpenFile(filepath.Join(snaps, current+shapeA+".lock"), os.O_RDWR|os.O_CREATE, 0o644)
	require.NoError(t, err)
	require.NoError(t, unix.Flock(int(builder.Fd()), unix.LOCK_EX))

	rep, err := Prune(cache, []string{filepath.Join(images, current)})
	require.NoError(t, err)
	assert.Equal(t, map[string]string{
		old:                                  "",
		old + shapeA:                         "",
		outside + shapeA:                     "",
		old + shapeA + building:              "",
		old + shapeB + ".failed-console.log": "",
	}, dirs(rep.Removed))
	assert.Equal(t, map[string]string{
		current:                     "current recipe",
		current + shapeA:            "snapshot template of a kept image",
		current + shapeB:            "snapshot template of a kept image",
		old + shapeB:                "snapshot template in use by a run",
		current + shapeA + building: "a snapshot template is being built",
	}, dirs(rep.Kept))
	for _, e := range rep.Removed {
		assert.NoFileExists(t, e.Dir)
		assert.NoDirExists(t, e.Dir)
	}
	assert.FileExists(t, filepath.Join(snaps, current+shapeB+".failed-console.log"))
	assert.DirExists(t, filepath.Join(snaps, "not-a-template"), "directories that are not templates stay")
	assert.FileExists(t, filepath.Join(snaps, old+shapeA+".lock"), "lock files stay")

	// Once the runs are over, --all takes every template.
	inUse()
	builder.Close()
	rep, err = Prune(cache, nil)
	require.NoError(t, err)
	assert.Equal(t, map[string]string{
		current:                                  "",
		current + shapeA:                         "",
		current + shapeB:                         "",
		old + shapeB:                             "",
		current + shapeA + building:              "",
		current + shapeB + ".failed-console.log": "",
	}, dirs(rep.Removed))
	assert.Empty(t, rep.Kept)
}
