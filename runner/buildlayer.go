package runner

import (
	"context"
	"fmt"

	"github.com/vmharness/vmharness/images"
	"github.com/vmharness/vmharness/images/layer"
)

// prepareBuildLayer installs the Meson build directory buildDir and
// returns the build-tree layer of what it installed (built on a cache
// miss, else reused), for the run to attach as a read-only virtio disk
// with serial "vmharness-layer"; the image's boot (its initrd, or
// layer-init when it boots without one) extracts it onto the root overlay
// before PID 1 starts. The layer is in the same cache as the
// images, and held against `vmharness image prune` until release is
// called, which the run must do once QEMU has exited. Errors are bad input
// (exit 99): not a build directory, meson install failing, an install tree
// a layer cannot hold.
func prepareBuildLayer(ctx context.Context, env *cliEnv, buildDir string, logf func(string, ...any)) (layerPath string, release func(), err error) {
	cache, err := images.CacheDir(env.getenv)
	if err != nil {
		return "", nil, err
	}
	path, release, err := layer.Build(ctx, layer.Options{BuildDir: buildDir, CacheDir: cache, Logf: logf})
	if err != nil {
		return "", nil, fmt.Errorf("--build-dir: %w", err)
	}
	return path, release, nil
}
