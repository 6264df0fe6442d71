package runner

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/images"
)

func TestCmdImageUsageErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no subcommand", nil, "usage: vmharness image build"},
		{"unknown subcommand", []string{"frobnicate"}, "usage: vmharness image build"},
		{"extra argument", []string{"build", "extra"}, `unexpected arguments ["extra"]`},
		{"unknown flag", []string{"build", "--mirror", "x"}, "flag provided but not defined"},
		{"missing recipe", []string{"build", "--recipe", "/nonexistent/recipe.json"}, "vmharness: image build: image recipe /nonexistent/recipe.json"},
		{"prune: extra argument", []string{"prune", "extra"}, `image prune: unexpected arguments ["extra"]`},
		{"prune: missing recipe", []string{"prune", "--recipe", "/nonexistent/recipe.json", "--cache-dir", "/nonexistent"}, "vmharness: image prune: image recipe /nonexistent/recipe.json"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			env := &cliEnv{stdout: &stdout, stderr: &stderr, getenv: func(string) string { return "" }}
			code := cmdImage(context.Background(), env, tt.args)
			assert.Equal(t, exitHarnessError, code)
			assert.Contains(t, stderr.String(), tt.want)
			assert.Empty(t, stdout.String())
		})
	}
}

// TestCmdImageFindsCachedImage puts a finished image where the cache keeps
// it, so "image build" must print that directory without building.
func TestCmdImageFindsCachedImage(t *testing.T) {
	recipe, err := images.Default()
	require.NoError(t, err)
	key, err := recipe.Key()
	require.NoError(t, err)
	cache := t.TempDir()
	dir := filepath.Join(cache, "images", recipe.Name+"-"+key[:16])
	require.NoError(t, os.MkdirAll(dir, 0o755))
	for _, f := range []string{images.KernelFile, images.InitrdFile, images.RootfsFile} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, f), []byte(f), 0o644))
	}
	looked, err := images.Lookup(cache, recipe)
	require.NoError(t, err, "test assumes the cache layout images/<name>-<key16>")
	require.Equal(t, dir, looked.Dir)

	var stdout, stderr bytes.Buffer
	env := &cliEnv{stdout: &stdout, stderr: &stderr, getenv: func(k string) string {
		if k == images.CacheDirEnv {
			return cache
		}
		return ""
	}}
	code := cmdImage(context.Background(), env, []string{"build"})
	require.Equal(t, exitPass, code, "stderr: %s", stderr.String())
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	assert.Equal(t, dir, lines[len(lines)-1])
}

// TestCmdImagePrune keeps the built-in recipe's image and removes an older
// one; --all removes both.
func TestCmdImagePrune(t *testing.T) {
	recipe, err := images.Default()
	require.NoError(t, err)
	cache := t.TempDir()
	current, err := images.CacheImageDir(cache, recipe)
	require.NoError(t, err)
	old := filepath.Join(cache, "images", recipe.Name+"-0123456789abcdef")
	for _, dir := range []string{current, old} {
		require.NoError(t, os.MkdirAll(dir, 0o755))
		for _, f := range []string{images.KernelFile, images.InitrdFile, images.RootfsFile} {
			require.NoError(t, os.WriteFile(filepath.Join(dir, f), bytes.Repeat([]byte("x"), 1<<20), 0o644))
		}
	}
	run := func(args ...string) (int, string, string) {
		var stdout, stderr bytes.Buffer
		env := &cliEnv{stdout: &stdout, stderr: &stderr, getenv: func(k string) string {
			if k == images.CacheDirEnv {
				return cache
			}
			return ""
		}}
		return cmdImage(context.Background(), env, append([]string{"prune"}, args...)), stdout.String(), stderr.String()
	}

	code, out, errOut := run()
	require.Equal(t, exitPass, code, errOut)
	assert.Contains(t, out, "removed "+old+" (3 MiB)")
	assert.Contains(t, out, "kept "+current+" (3 MiB): current recipe")
	assert.Contains(t, out, "freed 3 MiB")
	assert.NoDirExists(t, old)
	assert.DirExists(t, current)

	code, out, errOut = run("--all")
	require.Equal(t, exitPass, code, errOut)
	assert.Contains(t, out, "removed "+current)
	assert.NoDirExists(t, current)
}
