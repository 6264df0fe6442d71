package images

import (
	"archive/tar"
	"bytes"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// diskRecipe writes a recipe with a files directory to a temp dir.
func diskRecipe(t *testing.T, recipeJSON string, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "recipe.json"), recipeJSON)
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "files"), 0o755))
	for name, content := range files {
		writeFile(t, filepath.Join(dir, "files", name), content)
	}
	return filepath.Join(dir, "recipe.json")
}

func keyOf(t *testing.T, path string) string {
	t.Helper()
	r, err := LoadRecipe(path)
	require.NoError(t, err)
	k, err := r.Key()
	require.NoError(t, err)
	require.Len(t, k, 64)
	return k
}

func TestKeyStableAcrossLoadsAndCopies(t *testing.T) {
	def, err := Default()
	require.NoError(t, err)
	k1, err := def.Key()
	require.NoError(t, err)
	def2, err := Default()
	require.NoError(t, err)
	k2, err := def2.Key()
	require.NoError(t, err)
	assert.Equal(t, k1, k2)

	// A checkout of the default recipe on disk, with whatever modes the
	// checkout gave the files, hashes like the embedded one: modes come from
	// the recipe, not the file system.
	dir := t.TempDir()
	require.NoError(t, os.CopyFS(dir, mustSub(t, builtin, "default")))
	require.NoError(t, filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		require.NoError(t, err)
		if !d.IsDir() {
			require.NoError(t, os.Chmod(p, 0o600))
		}
		return nil
	}))
	assert.Equal(t, k1, keyOf(t, filepath.Join(dir, "recipe.json")))
}

func mustSub(t *testing.T, f fs.FS, dir string) fs.FS {
	t.Helper()
	sub, err := fs.Sub(f, dir)
	require.NoError(t, err)
	return sub
}

func TestKeySensitivity(t *testing.T) {
	withFiles := replace(validRecipe, `"rootfs_size"`, `"files": "files", "file_modes": {"a/x": "0755", "b": "0600"}, "rootfs_size"`)
	baseFiles := map[string]string{"a/x": "#!/bin/sh\n", "b": "secret\n", "c/d": "data\n"}
	base := keyOf(t, diskRecipe(t, withFiles, baseFiles))

	with := func(k, v string) map[string]string {
		m := map[string]string{}
		for k, v := range baseFiles {
			m[k] = v
		}
		if v == "" {
			delete(m, k)
		} else {
			m[k] = v
		}
		return m
	}
	tests := []struct {
		name   string
		recipe string
		files  map[string]string
		same   bool
	}{
		{name: "identical", recipe: withFiles, files: baseFiles, same: true},
		{name: "json whitespace and map order", recipe: replace(withFiles, `{"a/x": "0755", "b": "0600"}`, "{\n\"b\":\"0600\",\n  \"a/x\":\"0755\"}"), files: baseFiles, same: true},
		{name: "file content", recipe: withFiles, files: with("c/d", "data2\n")},
		{name: "file added", recipe: withFiles, files: with("c/e", "new\n")},
		{name: "file removed", recipe: withFiles, files: with("c/d", "")},
		{name: "file renamed", recipe: withFiles, files: map[string]string{"a/x": "#!/bin/sh\n", "b": "secret\n", "c/D": "data\n"}},
		{name: "file mode", recipe: replace(withFiles, `"b": "0600"`, `"b": "0644"`), files: baseFiles},
		{name: "package added", recipe: replace(withFiles, `"systemd",`, `"systemd", "procps",`), files: baseFiles},
		{name: "package order", recipe: replace(withFiles, `["systemd", "linux-image-cloud-amd64"]`, `["linux-image-cloud-amd64", "systemd"]`), files: baseFiles},
		{name: "distribution", recipe: replace(withFiles, `"trixie"`, `"forky"`), files: baseFiles},
		{name: "rootfs size", recipe: replace(withFiles, `"1G"`, `"2G"`), files: baseFiles},
		{name: "content moved between files", recipe: withFiles, files: map[string]string{"a/x": "#!/bin/sh\nsecret\n", "b": "", "c/d": "data\n"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := keyOf(t, diskRecipe(t, tt.recipe, tt.files))
			if tt.same {
				assert.Equal(t, base, k)
			} else {
				assert.NotEqual(t, base, k)
			}
		})
	}
}

func TestLoadRecipeRefusesSymlinksInFiles(t *testing.T) {
	path := diskRecipe(t, replace(validRecipe, `"rootfs_size"`, `"files": "files", "rootfs_size"`), map[string]string{"a": "x"})
	require.NoError(t, os.Symlink("a", filepath.Join(filepath.Dir(path), "files", "link")))
	_, err := LoadRecipe(path)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `files: link is a symlink; symlinks in the files directory are not followed or copied: declare it in the recipe's "symlinks" instead`)
}

func TestWriteFilesTar(t *testing.T) {
	path := diskRecipe(t, replace(validRecipe, `"rootfs_size"`, `"files": "files", "file_modes": {"usr/local/bin/x": "0755"}, "rootfs_size"`),
		map[string]string{"usr/local/bin/x": "#!/bin/sh\n", "etc/hostname": "h\n"})
	r, err := LoadRecipe(path)
	require.NoError(t, err)
	var buf bytes.Buffer
	require.NoError(t, r.writeFilesTar(&buf))

	type entry struct {
		mode       int64
		uid, gid   int
		content    string
		isRegular  bool
		modTimeSec int64
	}
	got := map[string]entry{}
	tr := tar.NewReader(&buf)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		require.NoError(t, err)
		data, err := io.ReadAll(tr)
		require.NoError(t, err)
		got[hdr.Name] = entry{hdr.Mode, hdr.Uid, hdr.Gid, string(data), hdr.Typeflag == tar.TypeReg, hdr.ModTime.Unix()}
	}
	assert.Equal(t, map[string]entry{
		"./etc/hostname":    {0o644, 0, 0, "h\n", true, 0},
		"./usr/local/bin/x": {0o755, 0, 0, "#!/bin/sh\n", true, 0},
	}, got, "only regular files, root-owned, with declared modes and a fixed time")
}

// TestKeyCoversTheChain checks that a child's key changes with whatever
// its bases put into the image, and with nothing else.
func TestKeyCoversTheChain(t *testing.T) {
	const child = `{"base": "../base/recipe.json", "name": "child", "packages": ["jq"], "files": "files",
  "symlinks": {"etc/l": "/x"}, "sysusers": ["u t 4711"]}`
	childFiles := map[string]string{"etc/child": "c\n", "etc/hostname": "child\n"}

	// key writes a copy of the built-in recipe, changed by edit, as the
	// base and the child (or childJSON) next to it, and returns the child's key.
	key := func(t *testing.T, edit func(dir string), childJSON string) string {
		t.Helper()
		dir := t.TempDir()
		base := filepath.Join(dir, "base")
		require.NoError(t, os.CopyFS(base, mustSub(t, builtin, "default")))
		if edit != nil {
			edit(base)
		}
		return keyOf(t, writeRecipe(t, filepath.Join(dir, "child"), childJSON, childFiles))
	}
	editJSON := func(old, new string) func(string) {
		return func(dir string) {
			p := filepath.Join(dir, "recipe.json")
			data, err := os.ReadFile(p)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(p, []byte(replace(string(data), old, new)), 0o644))
		}
	}
	editFile := func(rel, content string) func(string) {
		return func(dir string) { writeFile(t, filepath.Join(dir, "files", rel), content) }
	}
	ref := key(t, nil, child)

	def, err := Default()
	require.NoError(t, err)
	defKey, err := def.Key()
	require.NoError(t, err)
	assert.NotEqual(t, defKey, ref, "a child's key differs from its base's")

	tests := []struct {
		name  string
		edit  func(dir string)
		child string
		same  bool
	}{
		{name: "same chain in another directory", child: child, same: true},
		{name: "base named as default instead of a copy of it", child: replace(child, `"../base/recipe.json"`, `"default"`), same: true},
		{name: "base file changed", edit: editFile("etc/modules-load.d/vsock.conf", "vsock\nextra\n"), child: child},
		{name: "base file added", edit: editFile("etc/base-new", "x\n"), child: child},
		{name: "base package added", edit: editJSON(`"socat"`, `"socat", "curl"`), child: child},
		{name: "base unit disabled", edit: editJSON(`"fstrim.timer"`, `"fstrim.timer", "e2scrub_all.timer"`), child: child},
		{name: "base rootfs size", edit: editJSON(`"2G"`, `"3G"`), child: child},
		{name: "base file mode", edit: editJSON(`"0755"`, `"0700"`), child: child},
		{name: "child symlink target", child: replace(child, `"/x"`, `"/y"`)},
		{name: "child sysusers line", child: replace(child, `4711`, `4712`)},
		{name: "child name", child: replace(child, `"child"`, `"child2"`)},
		// The image cannot tell: the child's etc/hostname replaces it.
		{name: "base file the child replaces", edit: editFile("etc/hostname", "other\n"), child: child, same: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := key(t, tt.edit, tt.child)
			if tt.same {
				assert.Equal(t, ref, k)
			} else {
				assert.NotEqual(t, ref, k)
			}
		})
	}
}
