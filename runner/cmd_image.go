package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"path/filepath"

	"github.com/vmharness/vmharness/images"
)

// cmdImage implements "vmharness image build [--recipe PATH] [--cache-dir DIR]".
// Progress goes to stderr; the image directory is the last line of stdout.
func cmdImage(ctx context.Context, env *cliEnv, args []string) int {
	if len(args) == 0 || args[0] != "build" {
		fmt.Fprintln(env.stderr, "vmharness: image: usage: vmharness image build [--recipe PATH] [--cache-dir DIR]")
		return exitHarnessError
	}
	fs := flag.NewFlagSet("image build", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	recipePath := fs.String("recipe", "", "image recipe JSON file (default: the built-in recipe)")
	cacheDir := fs.String("cache-dir", "", "cache directory (default: $"+images.CacheDirEnv+", $XDG_CACHE_HOME/vmharness or ~/.cache/vmharness)")
	if err := fs.Parse(args[1:]); err != nil {
		return exitHarnessError
	}
	if fs.NArg() != 0 {
		fmt.Fprintf(env.stderr, "vmharness: image build: unexpected arguments %q\n", fs.Args())
		return exitHarnessError
	}
	dir, err := imageBuild(ctx, env.getenv, env.stderr, *recipePath, *cacheDir)
	if err != nil {
		fmt.Fprintf(env.stderr, "vmharness: image build: %v\n", err)
		return exitHarnessError
	}
	fmt.Fprintln(env.stdout, dir)
	return exitPass
}

func imageBuild(ctx context.Context, getenv func(string) string, progress io.Writer, recipePath, cacheDir string) (string, error) {
	var (
		recipe *images.Recipe
		err    error
	)
	if recipePath != "" {
		recipe, err = images.LoadRecipe(recipePath)
	} else {
		recipe, err = images.Default()
	}
	if err != nil {
		return "", err
	}
	if cacheDir == "" {
		if cacheDir, err = images.CacheDir(getenv); err != nil {
			return "", err
		}
	} else if cacheDir, err = filepath.Abs(cacheDir); err != nil {
		return "", err
	}
	img, err := images.NewBuilder(cacheDir, progress).Ensure(ctx, recipe)
	if err != nil {
		return "", err
	}
	return img.Dir, nil
}
