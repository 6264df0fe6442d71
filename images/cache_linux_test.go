package images

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func testRecipe(t *testing.T) *Recipe {
	t.Helper()
	r, err := parseRecipe([]byte(validRecipe))
	require.NoError(t, err)
	r.source = "test"
	return r
}

// fakeBuild writes placeholder image files after an optional delay.
func fakeBuild(calls *atomic.Int32, delay time.Duration) buildFunc {
	return func(ctx context.Context, r *Recipe, key, dir string, log *progressLog) (*Manifest, error) {
		calls.Add(1)
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		for _, f := range []string{KernelFile, InitrdFile, RootfsFile} {
			if err := os.WriteFile(filepath.Join(dir, f), []byte(f), 0o644); err != nil {
				return nil, err
			}
		}
		return &Manifest{Kernel: KernelFile, Initrd: InitrdFile, Rootfs: RootfsFile, RootfsFormat: "raw", KernelVersion: "fake"}, nil
	}
}

func testBuilder(cache string, progress *syncBuffer, build buildFunc) *Builder {
	b := NewBuilder(cache, progress)
	b.build = build
	return b
}

// syncBuffer is a bytes.Buffer safe for concurrent progress writers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

func TestEnsureBuildsOnceThenHits(t *testing.T) {
	cache := t.TempDir()
	r := testRecipe(t)
	var calls atomic.Int32
	b := testBuilder(cache, &syncBuffer{}, fakeBuild(&calls, 0))

	_, err := Lookup(cache, r)
	require.ErrorIs(t, err, fs.ErrNotExist)

	img, err := b.Ensure(context.Background(), r)
	require.NoError(t, err)
	key, err := r.Key()
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(cache, "images", "t-"+key[:16]), img.Dir)
	assert.Equal(t, filepath.Join(img.Dir, KernelFile), img.Kernel)
	assert.Equal(t, filepath.Join(img.Dir, InitrdFile), img.Initrd)
	assert.Equal(t, filepath.Join(img.Dir, RootfsFile), img.Rootfs)
	assert.Equal(t, "raw", img.RootfsFormat)
	assert.Equal(t, key, img.Manifest.Key)
	assert.Equal(t, FormatVersion, img.Manifest.FormatVersion)
	assert.Equal(t, "fake", img.Manifest.KernelVersion)
	assert.Equal(t, []string{"systemd", "linux-image-cloud-amd64"}, img.Manifest.Recipe.Packages)

	again, err := b.Ensure(context.Background(), r)
	require.NoError(t, err)
	assert.Equal(t, img.Dir, again.Dir)
	looked, err := Lookup(cache, r)
	require.NoError(t, err)
	assert.Equal(t, img.Dir, looked.Dir)
	assert.Equal(t, int32(1), calls.Load())

	entries, err := os.ReadDir(filepath.Join(cache, "images"))
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	assert.ElementsMatch(t, []string{"t-" + key[:16], "t-" + key[:16] + ".lock"}, names, "no temporary directory is left behind")
}

func TestEnsureConcurrentGoroutinesBuildOnce(t *testing.T) {
	cache := t.TempDir()
	r := testRecipe(t)
	var calls atomic.Int32
	progress := &syncBuffer{}
	b := testBuilder(cache, progress, fakeBuild(&calls, 500*time.Millisecond))

	const n = 8
	dirs := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			img, err := b.Ensure(context.Background(), r)
			errs[i] = err
			if err == nil {
				dirs[i] = img.Dir
			}
		}()
	}
	wg.Wait()
	for i := range n {
		require.NoError(t, errs[i])
		assert.Equal(t, dirs[0], dirs[i])
	}
	assert.Equal(t, int32(1), calls.Load(), "exactly one build")
	assert.Contains(t, progress.String(), "waiting for another process building image t")
}

// TestEnsureConcurrentProcessesBuildOnce runs Ensure in several processes
// (this test binary, re-executed) that share a cache directory. Each fake
// build appends to a file, so the file's line count is the number of builds.
func TestEnsureConcurrentProcessesBuildOnce(t *testing.T) {
	cache := t.TempDir()
	counter := filepath.Join(cache, "builds.txt")
	const n = 4
	outs := make([]bytes.Buffer, n)
	cmds := make([]*exec.Cmd, n)
	for i := range n {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcessEnsure$", "-test.count=1")
		cmd.Env = append(os.Environ(), "VMHARNESS_TEST_HELPER_CACHE="+cache, "VMHARNESS_TEST_HELPER_COUNTER="+counter)
		cmd.Stdout = &outs[i]
		cmd.Stderr = &outs[i]
		require.NoError(t, cmd.Start())
		cmds[i] = cmd
	}
	var dirs []string
	for i, cmd := range cmds {
		require.NoError(t, cmd.Wait(), "helper %d output:\n%s", i, outs[i].String())
		for _, line := range strings.Split(outs[i].String(), "\n") {
			if d, ok := strings.CutPrefix(line, "IMAGE "); ok {
				dirs = append(dirs, d)
			}
		}
	}
	require.Len(t, dirs, n)
	for _, d := range dirs {
		assert.Equal(t, dirs[0], d)
	}
	data, err := os.ReadFile(counter)
	require.NoError(t, err)
	assert.Equal(t, 1, strings.Count(string(data), "\n"), "builds recorded: %q", data)
}

func TestHelperProcessEnsure(t *testing.T) {
	cache := os.Getenv("VMHARNESS_TEST_HELPER_CACHE")
	if cache == "" {
		t.Skip("helper for TestEnsureConcurrentProcessesBuildOnce")
	}
	counter := os.Getenv("VMHARNESS_TEST_HELPER_COUNTER")
	var calls atomic.Int32
	inner := fakeBuild(&calls, 300*time.Millisecond)
	b := testBuilder(cache, &syncBuffer{}, func(ctx context.Context, r *Recipe, key, dir string, log *progressLog) (*Manifest, error) {
		f, err := os.OpenFile(counter, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(f, "build by pid %d\n", os.Getpid())
		f.Close()
		return inner(ctx, r, key, dir, log)
	})
	img, err := b.Ensure(context.Background(), testRecipe(t))
	require.NoError(t, err)
	fmt.Printf("IMAGE %s\n", img.Dir)
}

func TestEnsureInterruptedBuildLeavesNothing(t *testing.T) {
	cache := t.TempDir()
	r := testRecipe(t)
	started := make(chan string, 1)
	b := testBuilder(cache, &syncBuffer{}, func(ctx context.Context, r *Recipe, key, dir string, log *progressLog) (*Manifest, error) {
		require.NoError(t, os.WriteFile(filepath.Join(dir, KernelFile), []byte("partial"), 0o644))
		started <- dir
		<-ctx.Done()
		return nil, ctx.Err()
	})
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := b.Ensure(ctx, r)
		errc <- err
	}()
	buildDir := <-started
	cancel()
	err := <-errc
	require.ErrorIs(t, err, context.Canceled)

	_, err = Lookup(cache, r)
	require.ErrorIs(t, err, fs.ErrNotExist, "a cancelled build must not become visible")
	_, err = os.Stat(filepath.Dir(buildDir))
	require.ErrorIs(t, err, fs.ErrNotExist, "the temporary build directory is removed")
}

func TestEnsureRemovesLeftoversOfKilledBuilds(t *testing.T) {
	cache := t.TempDir()
	r := testRecipe(t)
	key, err := r.Key()
	require.NoError(t, err)
	p := pathsFor(cache, r, key)
	// What a SIGKILLed builder leaves: a temp dir with a half-written image.
	leftover := p.tmpPrefix + "123456"
	writeFile(t, filepath.Join(leftover, "image", KernelFile), "partial")
	// Another key's temp dir belongs to a different (maybe live) build.
	other := filepath.Join(cache, "images", ".tmp-t-0000000000000000-1")
	writeFile(t, filepath.Join(other, "x"), "x")

	_, err = Lookup(cache, r)
	require.ErrorIs(t, err, fs.ErrNotExist)

	var calls atomic.Int32
	img, err := testBuilder(cache, &syncBuffer{}, fakeBuild(&calls, 0)).Ensure(context.Background(), r)
	require.NoError(t, err)
	assert.Equal(t, p.dir, img.Dir)
	_, err = os.Stat(leftover)
	assert.ErrorIs(t, err, fs.ErrNotExist)
	assert.DirExists(t, other)
}

func TestEnsureBuildFailure(t *testing.T) {
	cache := t.TempDir()
	r := testRecipe(t)
	b := testBuilder(cache, &syncBuffer{}, func(ctx context.Context, r *Recipe, key, dir string, log *progressLog) (*Manifest, error) {
		return nil, errors.New("mmdebstrap: exit status 1")
	})
	_, err := b.Ensure(context.Background(), r)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "build image t (test): mmdebstrap: exit status 1")
	entries, err := os.ReadDir(filepath.Join(cache, "images"))
	require.NoError(t, err)
	for _, e := range entries {
		assert.False(t, strings.HasPrefix(e.Name(), ".tmp-"), "left behind %s", e.Name())
	}
}

func TestLockWaitHonoursContext(t *testing.T) {
	cache := t.TempDir()
	path := filepath.Join(cache, "x.lock")
	progress := &syncBuffer{}
	b := NewBuilder(cache, progress)
	unlock, err := b.lock(context.Background(), path, "x")
	require.NoError(t, err)
	defer unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = b.lock(ctx, path, "x")
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Equal(t, 1, strings.Count(progress.String(), "waiting for another process"), "the wait is announced once")
}

func TestCacheDir(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want string
	}{
		{"explicit", map[string]string{CacheDirEnv: "/c", "XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/c"},
		{"xdg", map[string]string{"XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/x/vmharness"},
		{"relative xdg ignored", map[string]string{"XDG_CACHE_HOME": "x", "HOME": "/h"}, "/h/.cache/vmharness"},
		{"home", map[string]string{"HOME": "/h"}, "/h/.cache/vmharness"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := CacheDir(func(k string) string { return tt.env[k] })
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestResolvePrefersImageDirEnv(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{KernelFile, InitrdFile, RootfsFile} {
		writeFile(t, filepath.Join(dir, f), f)
	}
	env := map[string]string{ImageDirEnv: dir, CacheDirEnv: t.TempDir()}
	img, err := Resolve(context.Background(), func(k string) string { return env[k] }, testRecipe(t), nil)
	require.NoError(t, err)
	assert.Equal(t, dir, img.Dir)
	assert.Equal(t, "raw", img.RootfsFormat)
	assert.Equal(t, "root=/dev/vda rw", img.Manifest.KernelCmdline)

	env[ImageDirEnv] = t.TempDir()
	_, err = Resolve(context.Background(), func(k string) string { return env[k] }, testRecipe(t), nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), ImageDirEnv)
}

func TestRemoveTreeDetachesMounts(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	mnt := filepath.Join(tree, "proc")
	require.NoError(t, os.MkdirAll(mnt, 0o755))
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("cannot mount tmpfs here: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(mnt, unix.MNT_DETACH) })
	writeFile(t, filepath.Join(mnt, "inside-the-mount"), "x")
	mounts, err := mountsBelow(tree)
	require.NoError(t, err)
	require.Equal(t, []string{mnt}, mounts)

	require.NoError(t, removeTree(tree))
	_, err = os.Stat(tree)
	assert.ErrorIs(t, err, fs.ErrNotExist)
}

func TestUnescapeMountinfo(t *testing.T) {
	assert.Equal(t, "/a b\\c", unescapeMountinfo(`/a\040b\134c`))
	assert.Equal(t, "/plain", unescapeMountinfo("/plain"))
	assert.Equal(t, `/x\9`, unescapeMountinfo(`/x\9`))
}
