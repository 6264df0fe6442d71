package runner

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness"
)

func TestPrepareBuildLayer(t *testing.T) {
	src := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(src, "meson.build"),
		[]byte("project('p')\ninstall_data('x.conf', install_dir: '/etc/p')\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(src, "x.conf"), []byte("x\n"), 0o644))
	build := filepath.Join(src, "build")
	out, err := exec.Command("meson", "setup", "--prefix=/usr", build, src).CombinedOutput()
	require.NoError(t, err, "%s", out)

	cache := t.TempDir()
	env := &cliEnv{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, getenv: func(k string) string {
		return map[string]string{"VMHARNESS_CACHE_DIR": cache}[k]
	}}
	var log []string
	logf := func(format string, args ...any) { log = append(log, fmt.Sprintf(format, args...)) }

	// A small base file system, as the image's rootfs.img is.
	img := harness.BootImage{Rootfs: filepath.Join(t.TempDir(), "rootfs.img"), RootfsFormat: "raw"}
	out, err = exec.Command("mkfs.ext4", "-q", img.Rootfs, "16M").CombinedOutput()
	require.NoError(t, err, "%s", out)

	path, release, err := prepareBuildLayer(context.Background(), env, img, build, logf)
	require.NoError(t, err)
	defer release()
	assert.Equal(t, filepath.Join(cache, "layers"), filepath.Dir(path), "layers live in the image cache")
	assert.FileExists(t, path)
	require.Len(t, log, 1)
	assert.Contains(t, log[0], "built: 1 files")

	_, _, err = prepareBuildLayer(context.Background(), env, img, src, logf)
	require.Error(t, err)
	assert.Equal(t, "--build-dir: "+src+" is not a Meson build directory (no meson-private/coredata.dat); run meson setup first", err.Error())

	_, _, err = prepareBuildLayer(context.Background(), env, harness.BootImage{Rootfs: img.Rootfs, RootfsFormat: "qcow2"}, build, logf)
	require.Error(t, err)
	assert.Equal(t, "--build-dir: the image's root file system is qcow2; a layer goes over a raw image only", err.Error())
}
