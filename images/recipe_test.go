package images

import (
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const validRecipe = `{
  "name": "t",
  "distribution": "trixie",
  "variant": "minbase",
  "packages": ["systemd", "linux-image-cloud-amd64"],
  "rootfs_size": "1G",
  "root_device": "/dev/vda",
  "kernel_cmdline": "root=/dev/vda rw"
}`

func TestParseRecipe(t *testing.T) {
	tests := []struct {
		name    string
		json    string
		wantErr string
	}{
		{name: "valid", json: validRecipe},
		{name: "unknown field", json: `{"name":"t","mirror":"x"}`, wantErr: `unknown field "mirror"`},
		{name: "trailing data", json: validRecipe + `{}`, wantErr: "trailing data"},
		{name: "not json", json: `name = t`, wantErr: "parse"},
		{name: "bad name", json: replace(validRecipe, `"name": "t"`, `"name": "../x"`), wantErr: `name "../x"`},
		{name: "bad variant", json: replace(validRecipe, `"minbase"`, `"extract"`), wantErr: `variant "extract"`},
		{name: "no packages", json: replace(validRecipe, `["systemd", "linux-image-cloud-amd64"]`, `[]`), wantErr: "packages: empty"},
		{name: "bad package", json: replace(validRecipe, `"systemd",`, `"systemd;rm",`), wantErr: `package "systemd;rm"`},
		{name: "bad size", json: replace(validRecipe, `"1G"`, `"lots"`), wantErr: `rootfs_size "lots"`},
		{name: "bad root device", json: replace(validRecipe, `"root_device": "/dev/vda"`, `"root_device": "vda"`), wantErr: `root_device "vda"`},
		{name: "cmdline without root", json: replace(validRecipe, `"root=/dev/vda rw"`, `"rw"`), wantErr: "must say root="},
		{name: "bad unit", json: replace(validRecipe, `"rootfs_size"`, `"enable_units": ["x; reboot"], "rootfs_size"`), wantErr: `unit "x; reboot"`},
		{name: "files escaping", json: replace(validRecipe, `"rootfs_size"`, `"files": "../etc", "rootfs_size"`), wantErr: `files "../etc"`},
		{name: "mode for a missing file", json: replace(validRecipe, `"rootfs_size"`, `"file_modes": {"a": "0755"}, "rootfs_size"`), wantErr: `file_modes["a"]: no such file`},
		{name: "unit enabled and disabled", json: replace(validRecipe, `"rootfs_size"`, `"enable_units": ["a.service"], "disable_units": ["a.service"], "rootfs_size"`), wantErr: `unit "a.service": both`},
		{name: "base dot", json: replace(validRecipe, `"rootfs_size"`, `"base": ".", "rootfs_size"`), wantErr: `base "."`},
		{name: "root recipe needs everything", json: `{"name": "t", "packages": ["jq"]}`, wantErr: `distribution ""`},
		{name: "child needs only a name", json: `{"base": "default", "name": "t"}`},
		{name: "child without a name", json: `{"base": "default", "packages": ["jq"]}`, wantErr: `name ""`},
		{name: "child bad override", json: `{"base": "default", "name": "t", "rootfs_size": "big"}`, wantErr: `rootfs_size "big"`},
		{name: "bad mode", json: replace(validRecipe, `"rootfs_size"`, `"files": "f", "file_modes": {"a": "4755"}, "rootfs_size"`), wantErr: `mode "4755"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := parseRecipeFile([]byte(tt.json))
			if err == nil && f.Base == "" {
				_, err = resolve(nil, f, nil, "test")
			}
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, "t", f.Name)
		})
	}
}

func TestParseRecipeReportsEveryProblem(t *testing.T) {
	_, err := parseRecipe([]byte(`{"name":"t"}`))
	require.Error(t, err)
	for _, want := range []string{"distribution", "variant", "packages", "rootfs_size", "root_device", "kernel_cmdline"} {
		assert.Contains(t, err.Error(), want)
	}
}

func TestDefaultRecipe(t *testing.T) {
	r, err := Default()
	require.NoError(t, err)
	assert.Equal(t, "default", r.Name)
	assert.Equal(t, "trixie", r.Distribution)
	assert.Contains(t, r.Packages, "openssh-server")
	assert.Contains(t, r.Packages, "linux-image-cloud-amd64")
	assert.Equal(t, "/dev/nvme0n1", r.RootDevice)
	assert.Equal(t, "root=/dev/nvme0n1 rootfstype=ext4 rootwait rw", r.KernelCmdline)
	assert.False(t, r.BootsInitrd(), "the default image boots without its initrd")

	var files []string
	require.NoError(t, r.walkFiles(func(rel string, e treeEntry, mode fs.FileMode) error {
		if !e.dir {
			files = append(files, rel)
		}
		return nil
	}))
	assert.Contains(t, files, "etc/initramfs-tools/modules")
	assert.Contains(t, files, "etc/modules-load.d/vsock.conf")
	assert.Contains(t, files, "etc/systemd/system/vsock-echo.socket")
	assert.Contains(t, files, "etc/systemd/system/vsock-echo@.service")

	mode, err := r.fileMode("etc/initramfs-tools/hooks/zz-vmharness-slim")
	require.NoError(t, err)
	assert.Equal(t, fs.FileMode(0o755), mode, "initramfs hooks must be executable")
}

func TestLoadRecipe(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "r.json"), replace(validRecipe, `"rootfs_size"`, `"files": "files", "rootfs_size"`))
	writeFile(t, filepath.Join(dir, "files/etc/hostname"), "x\n")

	r, err := LoadRecipe(filepath.Join(dir, "r.json"))
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(dir, "r.json"), r.Source())
	assert.Equal(t, treeEntry{fsys: r.tree["etc/hostname"].fsys, layer: filepath.Join(dir, "r.json")}, r.tree["etc/hostname"])

	_, err = LoadRecipe(filepath.Join(dir, "missing.json"))
	require.ErrorIs(t, err, os.ErrNotExist)

	writeFile(t, filepath.Join(dir, "nofiles.json"), replace(validRecipe, `"rootfs_size"`, `"files": "nope", "rootfs_size"`))
	_, err = LoadRecipe(filepath.Join(dir, "nofiles.json"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), `files directory "nope"`)
}
