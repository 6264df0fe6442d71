package layer

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const helloProject = `project('hello', version: '1')
install_data('hello.sh', install_dir: get_option('bindir'), install_mode: 'rwxr-xr-x')
install_data('hello.service', install_dir: 'lib/systemd/system')
`

func helloBuild(t *testing.T) string {
	t.Helper()
	return mesonProject(t, map[string]string{
		"meson.build":   helloProject,
		"hello.sh":      "#!/bin/sh\necho hello\n",
		"hello.service": "[Service]\nExecStart=/usr/bin/hello.sh\n",
	})
}

func TestBuildNotABuildDir(t *testing.T) {
	cache := t.TempDir()
	tests := []struct {
		name string
		dir  func(t *testing.T) string
		want string
	}{
		{name: "empty directory", dir: func(t *testing.T) string { return t.TempDir() },
			want: "is not a Meson build directory (no meson-private/coredata.dat); run meson setup first"},
		{name: "source directory", dir: func(t *testing.T) string {
			d := t.TempDir()
			writeFile(t, filepath.Join(d, "meson.build"), helloProject, 0o644)
			return d
		}, want: "is not a Meson build directory (no meson-private/coredata.dat)"},
		{name: "coredata but no meson-info", dir: func(t *testing.T) string {
			d := t.TempDir()
			writeFile(t, filepath.Join(d, "meson-private/coredata.dat"), "", 0o644)
			return d
		}, want: "is not a Meson build directory (no meson-info); run meson setup first"},
		{name: "missing", dir: func(t *testing.T) string { return filepath.Join(t.TempDir(), "nope") },
			want: "no such file or directory"},
		{name: "a file", dir: func(t *testing.T) string {
			p := filepath.Join(t.TempDir(), "f")
			writeFile(t, p, "", 0o644)
			return p
		}, want: "is not a directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := tt.dir(t)
			_, _, err := Build(context.Background(), Options{BuildDir: dir, Base: testBase(t), CacheDir: cache})
			require.Error(t, err)
			assert.Contains(t, err.Error(), dir)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestBuildMesonInstallFails(t *testing.T) {
	var script strings.Builder
	script.WriteString("#!/bin/sh\n")
	for i := 1; i <= 15; i++ {
		fmt.Fprintf(&script, "echo install step %d >&2\n", i)
	}
	script.WriteString("exit 3\n")
	build := mesonProject(t, map[string]string{
		"meson.build": helloProject + "meson.add_install_script('fail.sh')\n",
		"hello.sh":    "#!/bin/sh\n", "hello.service": "", "fail.sh": script.String(),
	})
	cache := t.TempDir()
	_, _, err := Build(context.Background(), Options{BuildDir: build, Base: testBase(t), CacheDir: cache})
	require.Error(t, err)
	msg := err.Error()
	t.Log(msg)
	assert.Contains(t, msg, "meson install -C "+build+" failed (exit status")
	assert.Contains(t, msg, "install step 15", "the last lines of meson's output")
	assert.NotContains(t, msg, "install step 2\n", "only the last lines")
	left, _ := filepath.Glob(filepath.Join(cache, "layers", "*"))
	assert.Empty(t, left, "nothing half-built is left")
}

func TestBuildInstallsNothing(t *testing.T) {
	build := mesonProject(t, map[string]string{"meson.build": "project('empty')\n"})
	_, _, err := Build(context.Background(), Options{BuildDir: build, Base: testBase(t), CacheDir: t.TempDir()})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "meson install installed nothing")
}

func TestBuildRefusesWhatALayerCannotHold(t *testing.T) {
	build := mesonProject(t, map[string]string{
		"meson.build": "project('p')\ninstall_data('x.conf', install_dir: '/run/p')\n",
		"x.conf":      "x",
	})
	_, _, err := Build(context.Background(), Options{BuildDir: build, Base: testBase(t), CacheDir: t.TempDir()})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "build directory "+build+": the install tree has /run, but /run is a tmpfs in the guest")
}

func TestBuildCaches(t *testing.T) {
	build := helloBuild(t)
	cache := t.TempDir()
	var log logLines
	o := Options{BuildDir: build, Base: testBase(t), CacheDir: cache, Logf: log.logf}

	path, release, err := Build(context.Background(), o)
	require.NoError(t, err)
	release()
	assert.Equal(t, filepath.Join(cache, "layers"), filepath.Dir(path))
	assert.Regexp(t, `^[0-9a-f]{64}\.qcow2$`, filepath.Base(path))
	first, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o444), first.Mode().Perm())

	again, release, err := Build(context.Background(), o)
	require.NoError(t, err)
	release()
	assert.Equal(t, path, again)
	second, err := os.Stat(path)
	require.NoError(t, err)
	assert.True(t, os.SameFile(first, second) && first.ModTime().Equal(second.ModTime()), "an unchanged build reuses its layer")
	assert.Equal(t, 1, log.count(" built: "), "%q", log.lines)
	assert.Equal(t, 1, log.count(" reused: "), "%q", log.lines)

	img := openImage(t, path)
	img.fsck()
	assert.Equal(t, "#!/bin/sh\necho hello\n", img.cat("/usr/bin/hello.sh"))
	assert.Equal(t, "[Service]\nExecStart=/usr/bin/hello.sh\n", img.cat("/usr/lib/systemd/system/hello.service"))

	// Over another base image (a rebuilt one, say) the same tree is
	// another layer.
	otherBase := filepath.Join(t.TempDir(), "rootfs.img")
	require.NoError(t, sparseCopy(o.Base, otherBase))
	other, release, err := Build(context.Background(), Options{BuildDir: build, Base: otherBase, CacheDir: cache})
	require.NoError(t, err)
	release()
	assert.NotEqual(t, path, other)

	// A changed build gives another layer; the first stays until pruned.
	writeFile(t, filepath.Join(filepath.Dir(build), "hello.sh"), "#!/bin/sh\necho changed\n", 0o755)
	changed, release, err := Build(context.Background(), o)
	require.NoError(t, err)
	release()
	assert.NotEqual(t, path, changed)
	assert.FileExists(t, path)

	stages, _ := filepath.Glob(filepath.Join(cache, "layers", ".stage-*"))
	assert.Empty(t, stages, "staging directories are removed")
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	return data
}

func TestBuildParallelGoroutines(t *testing.T) {
	build := helloBuild(t)
	cache := t.TempDir()
	var log logLines
	var mu sync.Mutex
	logf := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		log.logf(format, args...)
	}
	const n = 4
	paths := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, release, err := Build(context.Background(), Options{BuildDir: build, Base: testBase(t), CacheDir: cache, Logf: logf})
			if assert.NoError(t, err) {
				paths[i] = p
				release()
			}
		}()
	}
	wg.Wait()
	for _, p := range paths {
		assert.Equal(t, paths[0], p)
	}
	assert.Equal(t, 1, log.count(" built: "), "%q", log.lines)
	assert.Equal(t, n-1, log.count(" reused: "), "%q", log.lines)
	left, _ := filepath.Glob(filepath.Join(cache, "layers", ".*"))
	assert.Empty(t, left, "no temporary files or staging directories")
}

// TestBuildParallelProcesses runs Build in several processes (this test
// binary, re-executed) at once: one writes the layer, the others reuse it.
func TestBuildParallelProcesses(t *testing.T) {
	build := helloBuild(t)
	cache := t.TempDir()
	base := testBase(t) // one base for all: the layer key names it
	const n = 3
	outs := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := exec.Command(os.Args[0], "-test.run=^TestHelperBuildProcess$")
			cmd.Env = append(os.Environ(), "LAYER_HELPER_BUILD="+build, "LAYER_HELPER_CACHE="+cache, "LAYER_HELPER_BASE="+base)
			out, err := cmd.CombinedOutput()
			outs[i] = string(out)
			assert.NoError(t, err, "%s", out)
		}()
	}
	wg.Wait()
	all := strings.Join(outs, "\n")
	assert.Equal(t, 1, strings.Count(all, " built: "), all)
	assert.Equal(t, n-1, strings.Count(all, " reused: "), all)
	layers, _ := filepath.Glob(filepath.Join(cache, "layers", "*.qcow2"))
	assert.Len(t, layers, 1)
}

func TestHelperBuildProcess(t *testing.T) {
	build := os.Getenv("LAYER_HELPER_BUILD")
	if build == "" {
		t.Skip("helper for TestBuildParallelProcesses")
	}
	logf := func(format string, args ...any) { fmt.Printf(format+"\n", args...) }
	_, release, err := Build(context.Background(), Options{BuildDir: build, Base: os.Getenv("LAYER_HELPER_BASE"), CacheDir: os.Getenv("LAYER_HELPER_CACHE"), Logf: logf})
	require.NoError(t, err)
	release()
}

func TestBuildCancelled(t *testing.T) {
	build := helloBuild(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, _, err := Build(ctx, Options{BuildDir: build, Base: testBase(t), CacheDir: t.TempDir()})
	require.Error(t, err)
	assert.ErrorIs(t, err, context.Canceled)
}

// TestBuildLeavesNothingOnFailure: a tree that cannot go over the base
// fails before anything is published, and its scratch copy is gone.
func TestBuildLeavesNothingOnFailure(t *testing.T) {
	build := mesonProject(t, map[string]string{
		"meson.build": "project('clash')\ninstall_data('hostname', install_dir: '/etc/hostname')\n",
		"hostname":    "x",
	})
	cache := t.TempDir()
	_, _, err := Build(context.Background(), Options{BuildDir: build, Base: testBase(t), CacheDir: cache})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "the install tree has /etc/hostname/hostname, but /etc/hostname is a regular file in the base image")
	left, _ := filepath.Glob(filepath.Join(cache, "layers", "*"))
	for _, p := range left {
		assert.Regexp(t, `\.lock$`, p, "only lock files stay")
	}
	hidden, _ := filepath.Glob(filepath.Join(cache, "layers", ".*"))
	assert.Empty(t, hidden, "no staging directory or scratch copy stays")
}
