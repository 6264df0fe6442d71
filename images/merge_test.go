package images

import (
	"archive/tar"
	"bytes"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// baseRecipe is a root recipe with something of every mergeable kind.
const baseRecipe = `{
  "name": "base",
  "distribution": "trixie",
  "variant": "minbase",
  "packages": ["systemd", "linux-image-cloud-amd64"],
  "files": "files",
  "file_modes": {"usr/local/bin/tool": "0755"},
  "enable_units": ["a.service"],
  "disable_units": ["ssh.service"],
  "symlinks": {"etc/old": "/usr/lib/old"},
  "sysusers": ["g shared 4000"],
  "rootfs_size": "2G",
  "root_device": "/dev/vda",
  "kernel_cmdline": "root=/dev/vda rw"
}`

var baseFiles = map[string]string{"usr/local/bin/tool": "#!/bin/sh\n", "etc/a": "base a\n", "etc/b": "base b\n"}

// chain writes base/ and child/ recipes into one temp dir and loads the
// child.
func chain(t *testing.T, childJSON string, childFiles map[string]string) (*Recipe, error) {
	t.Helper()
	dir := t.TempDir()
	writeRecipe(t, filepath.Join(dir, "base"), baseRecipe, baseFiles)
	return LoadRecipe(writeRecipe(t, filepath.Join(dir, "child"), childJSON, childFiles))
}

func TestResolveMergesChildOverBase(t *testing.T) {
	r, err := chain(t, `{
  "base": "../base/recipe.json",
  "name": "child",
  "rootfs_size": "4G",
  "packages": ["jq", "systemd"],
  "files": "files",
  "file_modes": {"etc/b": "0600"},
  "enable_units": ["ssh.service"],
  "disable_units": ["a.service", "b.service"],
  "symlinks": {"etc/new": "../usr/lib/new", "etc/a": "/usr/lib/a"},
  "sysusers": ["g shared 4000", "u testuser 4711 \"Test User\" /home/testuser /bin/bash"]
}`, map[string]string{"etc/b": "child b\n", "etc/old": "child replaces the base's symlink\n", "etc/c": "child c\n", "usr/local/bin/tool": "#!/bin/sh\necho child\n"})
	require.NoError(t, err)

	assert.Equal(t, "child", r.Name, "each file names its own image")
	assert.Equal(t, "trixie", r.Distribution, "inherited")
	assert.Equal(t, "4G", r.RootfsSize, "overridden")
	assert.Equal(t, "root=/dev/vda rw", r.KernelCmdline)
	assert.Equal(t, []string{"systemd", "linux-image-cloud-amd64", "jq"}, r.Packages, "appended without duplicates")
	assert.Equal(t, []string{"ssh.service"}, r.EnableUnits, "the child enables what the base disabled and disables what it enabled")
	assert.Equal(t, []string{"a.service", "b.service"}, r.DisableUnits)
	assert.Equal(t, map[string]string{"etc/new": "../usr/lib/new", "etc/a": "/usr/lib/a"}, r.Symlinks,
		"the child's file replaces the base's etc/old link, its link replaces the base's etc/a file")
	assert.Equal(t, []string{"g shared 4000", `u testuser 4711 "Test User" /home/testuser /bin/bash`}, r.Sysusers)
	assert.Equal(t, map[string]string{"usr/local/bin/tool": "0755", "etc/b": "0600"}, r.FileModes)

	got := map[string]string{}
	require.NoError(t, r.walkFiles(func(rel string, e treeEntry, mode fs.FileMode) error {
		if e.dir {
			return nil
		}
		data, err := fs.ReadFile(e.fsys, rel)
		got[rel] = mode.String() + " " + string(data)
		return err
	}))
	assert.Equal(t, map[string]string{
		"etc/b":              "-rw------- child b\n",
		"etc/c":              "-rw-r--r-- child c\n",
		"etc/old":            "-rw-r--r-- child replaces the base's symlink\n",
		"usr/local/bin/tool": "-rwxr-xr-x #!/bin/sh\necho child\n",
	}, got, "the child's files win and keep the base's declared modes")
	assert.Contains(t, r.Source(), filepath.Join("child", "recipe.json")+", based on ")
	assert.Contains(t, r.Source(), filepath.Join("base", "recipe.json"))
}

func TestResolveChainOfThree(t *testing.T) {
	dir := t.TempDir()
	writeRecipe(t, filepath.Join(dir, "mid"), `{"base": "default", "name": "mid", "packages": ["jq"], "sysusers": ["u a 5000"]}`, nil)
	leaf := writeRecipe(t, filepath.Join(dir, "leaf"), `{"base": "../mid/recipe.json", "name": "leaf", "packages": ["curl"], "files": "files"}`,
		map[string]string{"etc/leaf": "x\n"})
	r, err := LoadRecipe(leaf)
	require.NoError(t, err)
	def, err := Default()
	require.NoError(t, err)
	assert.Equal(t, append(append([]string(nil), def.Packages...), "jq", "curl"), r.Packages)
	assert.Equal(t, []string{"u a 5000"}, r.Sysusers)
	assert.Equal(t, def.DisableUnits, r.DisableUnits)
	assert.Contains(t, r.tree, "etc/leaf")
	assert.Contains(t, r.tree, "etc/modules-load.d/vsock.conf", "the default's files come through the middle recipe")
	assert.Equal(t, "0755", r.FileModes["etc/initramfs-tools/hooks/zz-vmharness-slim"])
	assert.True(t, strings.HasSuffix(r.Source(), "based on built-in default recipe"), r.Source())
}

func TestResolveErrors(t *testing.T) {
	tests := []struct {
		name    string
		child   string
		files   map[string]string
		wantErr string
	}{
		{name: "root device differs", child: `{"base": "../base/recipe.json", "name": "c", "root_device": "/dev/nvme0n1"}`, wantErr: `root_device "/dev/nvme0n1": differs from the base's "/dev/vda"`},
		{name: "root device on no bus the harness has", child: `{"base": "../base/recipe.json", "name": "c", "root_device": "/dev/sda"}`, wantErr: `root_device "/dev/sda": vmharness attaches the root disk as /dev/vda (virtio-blk) or /dev/nvme0n1 (NVMe)`},
		{name: "no initrd for a root on virtio-blk", child: `{"base": "../base/recipe.json", "name": "c", "initrd": false}`, wantErr: `initrd false: the root device /dev/vda needs a driver Debian's kernel has only as a module`},
		{name: "kernel cmdline differs", child: `{"base": "../base/recipe.json", "name": "c", "kernel_cmdline": "root=/dev/vda ro"}`, wantErr: `kernel_cmdline "root=/dev/vda ro": differs`},
		{name: "file where the base has a directory", child: `{"base": "../base/recipe.json", "name": "c", "files": "files"}`, files: map[string]string{"usr/local/bin": "x"},
			wantErr: "files: usr/local/bin is a file here but a directory in"},
		{name: "directory where the base has a file", child: `{"base": "../base/recipe.json", "name": "c", "files": "files"}`, files: map[string]string{"etc/a/x": "x"},
			wantErr: "files: etc/a is a directory here but a file in"},
		{name: "symlink over a directory", child: `{"base": "../base/recipe.json", "name": "c", "symlinks": {"usr/local/bin": "/bin"}}`, wantErr: "symlinks: usr/local/bin is also in the files directory"},
		{name: "symlink and file in one recipe", child: `{"base": "../base/recipe.json", "name": "c", "files": "files", "symlinks": {"etc/z": "/z"}}`, files: map[string]string{"etc/z": "x"},
			wantErr: "symlinks: etc/z is also in the files directory"},
		{name: "file below a base's symlink", child: `{"base": "../base/recipe.json", "name": "c", "files": "files"}`, files: map[string]string{"etc/old/x": "x"},
			wantErr: "files: etc/old is a directory here but a symlink"},
		{name: "symlink below a symlink", child: `{"base": "../base/recipe.json", "name": "c", "symlinks": {"etc/old/x": "/x"}}`, wantErr: "symlinks: etc/old/x is below the symlink etc/old"},
		{name: "user redefined", child: `{"base": "../base/recipe.json", "name": "c", "sysusers": ["g shared 4001"]}`, wantErr: `sysusers line "g shared 4001": shared is already defined by "g shared 4000"`},
		{name: "file in the sysusers conf's place", child: `{"base": "../base/recipe.json", "name": "c", "files": "files"}`, files: map[string]string{SysusersConf: "x"},
			wantErr: "is written from the recipe's \"sysusers\""},
		{name: "mode for no file", child: `{"base": "../base/recipe.json", "name": "c", "file_modes": {"etc/nope": "0600"}}`, wantErr: `file_modes["etc/nope"]: no such file`},
		{name: "mode for a base file the child replaced with a link", child: `{"base": "../base/recipe.json", "name": "c", "file_modes": {"etc/a": "0600"}, "symlinks": {"etc/a": "/a"}}`, wantErr: `file_modes["etc/a"]: no such file`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := chain(t, tt.child, tt.files)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.Contains(t, err.Error(), filepath.Join("child", "recipe.json"), "the error names the recipe at fault")
		})
	}
}

func TestLoadRecipeBaseErrorsAreOneLine(t *testing.T) {
	dir := t.TempDir()
	a := writeRecipe(t, filepath.Join(dir, "a"), `{"base": "../b/recipe.json", "name": "a"}`, nil)
	b := writeRecipe(t, filepath.Join(dir, "b"), `{"base": "../c/recipe.json", "name": "b"}`, nil)
	writeRecipe(t, filepath.Join(dir, "c"), `{"base": "../a/recipe.json", "name": "c"}`, nil)
	self := writeRecipe(t, filepath.Join(dir, "self"), `{"base": "recipe.json", "name": "self"}`, nil)
	missing := writeRecipe(t, filepath.Join(dir, "missing"), `{"base": "../nope/recipe.json", "name": "m"}`, nil)
	badBase := writeRecipe(t, filepath.Join(dir, "badbase"), `{"base": "../b2/recipe.json", "name": "m"}`, nil)
	writeRecipe(t, filepath.Join(dir, "b2"), `{"base": "default", "name": "b2", "packages": ["Bad"]}`, nil)

	tests := []struct {
		name, file string
		want       []string
	}{
		{name: "cycle", file: a, want: []string{"image recipe " + a + ": bases form a cycle: " + a + " -> " + b + " -> " + filepath.Join(dir, "c", "recipe.json") + " -> " + a}},
		{name: "self", file: self, want: []string{"bases form a cycle: " + self + " -> " + self}},
		{name: "missing base", file: missing, want: []string{"image recipe " + filepath.Join(dir, "nope", "recipe.json") + ", base of " + missing + ":", "no such file or directory"}},
		{name: "invalid base", file: badBase, want: []string{filepath.Join(dir, "b2", "recipe.json") + ", base of " + badBase + ": package \"Bad\""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := LoadRecipe(tt.file)
			require.Error(t, err)
			for _, w := range tt.want {
				assert.Contains(t, err.Error(), w)
			}
			assert.NotContains(t, err.Error(), "\n")
		})
	}
	_, err := LoadRecipe(missing)
	assert.ErrorIs(t, err, os.ErrNotExist)
}

func TestTestdataChildRecipe(t *testing.T) {
	r, err := LoadRecipe(filepath.Join("testdata", "child", "recipe.json"))
	require.NoError(t, err)
	def, err := Default()
	require.NoError(t, err)
	assert.Equal(t, "vmharness-test-child", r.Name)
	assert.Equal(t, append(append([]string(nil), def.Packages...), "jq"), r.Packages)
	assert.Equal(t, def.EnableUnits, r.EnableUnits)
	assert.Equal(t, def.KernelCmdline, r.KernelCmdline)
	assert.Contains(t, r.tree, "etc/vmharness-child.conf")
	assert.Contains(t, r.tree, "etc/hostname", "the default's files are kept")
	require.Len(t, r.homesToCreate(), 1)
	assert.Equal(t, sysusersLine{kind: "u", name: "testuser", home: "/home/testuser"}, r.homesToCreate()[0])
}

func TestWriteFilesTarLayersAndSysusers(t *testing.T) {
	r, err := chain(t, `{"base": "../base/recipe.json", "name": "c", "files": "files", "sysusers": ["u t 4711"]}`, map[string]string{"etc/b": "child b\n"})
	require.NoError(t, err)
	require.True(t, r.hasFilesTar())
	var buf bytes.Buffer
	require.NoError(t, r.writeFilesTar(&buf))
	got := map[string]string{}
	tr := tar.NewReader(&buf)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		require.NoError(t, err)
		data, err := io.ReadAll(tr)
		require.NoError(t, err)
		got[hdr.Name] = fs.FileMode(hdr.Mode).String() + " " + string(data)
	}
	assert.Equal(t, map[string]string{
		"./etc/a":              "-rw-r--r-- base a\n",
		"./etc/b":              "-rw-r--r-- child b\n",
		"./usr/local/bin/tool": "-rwxr-xr-x #!/bin/sh\n",
		"./" + SysusersConf:    "-rw-r--r-- # Written by vmharness from the image recipe's \"sysusers\".\ng shared 4000\nu t 4711\n",
	}, got)

	bare, err := parseRecipe([]byte(validRecipe))
	require.NoError(t, err)
	assert.False(t, bare.hasFilesTar(), "no files, no sysusers: no tar-in")
}

func TestResolveInitrdSetting(t *testing.T) {
	tests := []struct {
		name  string
		child string
		want  bool
	}{
		{"inherited from the default (no initrd)", `{"base": "default", "name": "c"}`, false},
		{"a child whose tests need an initrd boots through it", `{"base": "default", "name": "c", "initrd": true}`, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := LoadRecipe(writeRecipe(t, t.TempDir(), tt.child, nil))
			require.NoError(t, err)
			assert.Equal(t, tt.want, r.BootsInitrd())
		})
	}
}
