package runner

import (
	"context"

	"github.com/vmharness/vmharness/harness"
	"github.com/vmharness/vmharness/images"
)

// ensureImage finds the image a run boots ($VMHARNESS_IMAGE_DIR, else the
// run's recipe's cached image), building it on a cache miss. Build
// progress goes to stderr, which Meson keeps in the test log. The image
// is held against `vmharness image prune` until release is called.
func ensureImage(ctx context.Context, env *cliEnv, recipePath string) (img harness.BootImage, release func(), err error) {
	recipe, err := runRecipe(env.getenv, recipePath)
	if err != nil {
		return harness.BootImage{}, nil, err
	}
	found, release, err := images.Acquire(ctx, env.getenv, recipe, env.stderr)
	if err != nil {
		return harness.BootImage{}, nil, err
	}
	return bootImage(found), release, nil
}

// bootImage says how the harness boots img, from its manifest.
func bootImage(img *images.Image) harness.BootImage {
	b := harness.BootImage{
		Kernel:       img.Kernel,
		KernelELF:    img.KernelELF,
		Rootfs:       img.Rootfs,
		RootfsFormat: img.RootfsFormat,
		RootDevice:   img.Manifest.RootDevice,
		RootCmdline:  img.Manifest.KernelCmdline,
	}
	if img.Manifest.BootsInitrd() {
		b.Initrd = img.Initrd
	}
	return b
}

// runRecipe is the recipe runs boot: path (--recipe), else
// $VMHARNESS_RECIPE, else the built-in one.
func runRecipe(getenv func(string) string, path string) (*images.Recipe, error) {
	if path != "" {
		return images.LoadRecipe(path)
	}
	if p := getenv("VMHARNESS_RECIPE"); p != "" {
		return images.LoadRecipe(p)
	}
	return images.Default()
}
