package main

import (
	"context"

	"github.com/vmharness/vmharness/harness"
	"github.com/vmharness/vmharness/images"
)

// ensureImage finds the image a run boots ($VMHARNESS_IMAGE_DIR, else the
// built-in recipe's cached image), building it on a cache miss. Build
// progress goes to stderr, which Meson keeps in the test log.
func ensureImage(ctx context.Context, env *cliEnv) (harness.BootImage, error) {
	recipe, err := images.Default()
	if err != nil {
		return harness.BootImage{}, err
	}
	if p := env.getenv("VMHARNESS_RECIPE"); p != "" {
		if recipe, err = images.LoadRecipe(p); err != nil {
			return harness.BootImage{}, err
		}
	}
	img, err := images.Resolve(ctx, env.getenv, recipe, env.stderr)
	if err != nil {
		return harness.BootImage{}, err
	}
	return harness.BootImage{
		Kernel:       img.Kernel,
		Initrd:       img.Initrd,
		Rootfs:       img.Rootfs,
		RootfsFormat: img.RootfsFormat,
	}, nil
}
