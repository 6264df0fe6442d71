package runner

import (
	"context"
	"fmt"

	"github.com/vmharness/vmharness/harness"
	"github.com/vmharness/vmharness/images"
	"github.com/vmharness/vmharness/images/layer"
)

// prepareBuildLayer installs the Meson build directory buildDir and
// returns the build-tree layer of what it installed over the image's root
// file system (made on a cache miss, else reused): a qcow2 image over the
// base that the run's overlay is made over, so the project's files are in
// the root before the kernel mounts it. The layer is in the same cache as
// the images, and held against `vmharness image prune` until release is
// called, which the run must do once QEMU has exited. Errors are bad input
// (exit 99): not a build directory, meson install failing, an install tree
// a layer cannot hold.
func prepareBuildLayer(ctx context.Context, env *cliEnv, img harness.BootImage, buildDir string, logf func(string, ...any)) (layerPath string, release func(), err error) {
	if f := img.RootfsFormat; f != "" && f != "raw" {
		return "", nil, fmt.Errorf("--build-dir: the image's root file system is %s; a layer goes over a raw image only", f)
	}
	cache, err := images.CacheDir(env.getenv)
	if err != nil {
		return "", nil, err
	}
	path, release, err := layer.Build(ctx, layer.Options{BuildDir: buildDir, Base: img.Rootfs, CacheDir: cache, Logf: logf})
	if err != nil {
		return "", nil, fmt.Errorf("--build-dir: %w", err)
	}
	return path, release, nil
}
