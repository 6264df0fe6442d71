package layer

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func base(entries []Pruned) map[string]string {
	m := map[string]string{}
	for _, e := range entries {
		m[filepath.Base(e.Path)] = e.Reason
	}
	return m
}

func TestPrune(t *testing.T) {
	cache := t.TempDir()
	dir := filepath.Join(cache, layersDir)
	inUse, release, err := Build(context.Background(), Options{BuildDir: helloBuild(t), Base: testBase(t), CacheDir: cache})
	require.NoError(t, err)
	unused, releaseUnused, err := Build(context.Background(), Options{BuildDir: mesonProject(t, map[string]string{
		"meson.build": "project('other')\ninstall_data('x', install_dir: '/usr/share/other')\n", "x": "x",
	}), Base: testBase(t), CacheDir: cache})
	require.NoError(t, err)
	releaseUnused()

	// What killed runs leave: a half-written layer and a staging directory.
	deadKey := strings.Repeat("d", 64)
	writeFile(t, filepath.Join(dir, ".tmp-"+deadKey+"-123/rootfs.raw"), "partial", 0o644)
	// A layer of an older vmharness, which extracted cpio archives.
	oldKey := strings.Repeat("c", 64)
	writeFile(t, filepath.Join(dir, oldKey+".cpio"), "070701", 0o444)
	writeFile(t, filepath.Join(dir, ".stage-456/usr/bin/x"), "x", 0o755)
	// A live run's staging directory.
	live, err := newStage(dir)
	require.NoError(t, err)
	defer live.remove()
	writeFile(t, filepath.Join(live.dir, "usr/bin/x"), "x", 0o755)
	writeFile(t, filepath.Join(dir, "not-ours"), "x", 0o644)

	removed, kept, err := Prune(cache)
	require.NoError(t, err)
	inUseName := filepath.Base(inUse)
	assert.Equal(t, map[string]string{filepath.Base(unused): "", ".tmp-" + deadKey + "-123": "", ".stage-456": "", oldKey + ".cpio": ""}, base(removed))
	assert.Equal(t, map[string]string{inUseName: "in use by a run (or being written)", filepath.Base(live.dir): "a run is installing into it"}, base(kept))
	for _, e := range removed {
		assert.NoFileExists(t, e.Path)
		assert.NoDirExists(t, e.Path)
		assert.Positive(t, e.Bytes, e.Path)
	}
	assert.FileExists(t, inUse)
	assert.FileExists(t, filepath.Join(dir, "not-ours"))
	assert.FileExists(t, strings.TrimSuffix(unused, layerExt)+lockExt, "lock files stay: others may have them open")

	// Once the run is over, its layer goes too, and a later run makes it anew.
	release()
	removed, kept, err = Prune(cache)
	require.NoError(t, err)
	assert.Equal(t, map[string]string{inUseName: ""}, base(removed))
	assert.Equal(t, map[string]string{filepath.Base(live.dir): "a run is installing into it"}, base(kept))
	assert.NoFileExists(t, inUse)
}

func TestPruneNoCache(t *testing.T) {
	removed, kept, err := Prune(filepath.Join(t.TempDir(), "nothing"))
	require.NoError(t, err)
	assert.Empty(t, removed)
	assert.Empty(t, kept)
}

// TestBuildRemovesStaleStages: a killed run's staging directory goes at
// the next Build, a live run's stays.
func TestBuildRemovesStaleStages(t *testing.T) {
	cache := t.TempDir()
	dir := filepath.Join(cache, layersDir)
	writeFile(t, filepath.Join(dir, ".stage-1/usr/bin/x"), "x", 0o755)
	require.NoError(t, os.Chmod(filepath.Join(dir, ".stage-1/usr/bin"), 0o555))
	live, err := newStage(dir)
	require.NoError(t, err)
	defer live.remove()
	_, release, err := Build(context.Background(), Options{BuildDir: helloBuild(t), Base: testBase(t), CacheDir: cache})
	require.NoError(t, err)
	release()
	assert.NoDirExists(t, filepath.Join(dir, ".stage-1"))
	assert.DirExists(t, live.dir)
}
