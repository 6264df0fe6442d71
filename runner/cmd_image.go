package runner

import (
	"context"
	"flag"
	"fmt"
	"io"
	"path/filepath"

	"github.com/vmharness/vmharness/images"
)

const imageUsage = "usage: vmharness image build [--recipe PATH] [--cache-dir DIR] | vmharness image prune [--all] [--recipe PATH] [--cache-dir DIR]"

const cacheDirHelp = "cache directory (default: $" + images.CacheDirEnv + ", $XDG_CACHE_HOME/vmharness or ~/.cache/vmharness)"

// cmdImage implements "vmharness image build" and "vmharness image prune".
func cmdImage(ctx context.Context, env *cliEnv, args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(env.stderr, "vmharness: image: "+imageUsage)
		return exitHarnessError
	}
	switch args[0] {
	case "build":
		return cmdImageBuild(ctx, env, args[1:])
	case "prune":
		return cmdImagePrune(env, args[1:])
	default:
		fmt.Fprintln(env.stderr, "vmharness: image: "+imageUsage)
		return exitHarnessError
	}
}

// cmdImageBuild implements "vmharness image build [--recipe PATH] [--cache-dir DIR]".
// Progress goes to stderr; the image directory is the last line of stdout.
func cmdImageBuild(ctx context.Context, env *cliEnv, args []string) int {
	fs := flag.NewFlagSet("image build", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	recipePath := fs.String("recipe", "", "image recipe JSON file (default: $VMHARNESS_RECIPE, else the built-in recipe)")
	cacheDir := fs.String("cache-dir", "", cacheDirHelp)
	if err := fs.Parse(args); err != nil {
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

// cmdImagePrune implements "vmharness image prune": it removes the cached
// images other than the one runs boot now (the --recipe, $VMHARNESS_RECIPE
// or built-in recipe's; none with --all) and leftovers of killed builds.
// Images that running tests use are kept and listed.
func cmdImagePrune(env *cliEnv, args []string) int {
	fs := flag.NewFlagSet("image prune", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	all := fs.Bool("all", false, "remove the current recipe's image too")
	recipePath := fs.String("recipe", "", "keep this recipe's image (default: $VMHARNESS_RECIPE, else the built-in recipe)")
	cacheDir := fs.String("cache-dir", "", cacheDirHelp)
	if err := fs.Parse(args); err != nil {
		return exitHarnessError
	}
	if fs.NArg() != 0 {
		fmt.Fprintf(env.stderr, "vmharness: image prune: unexpected arguments %q\n", fs.Args())
		return exitHarnessError
	}
	rep, err := imagePrune(env.getenv, *cacheDir, *recipePath, *all)
	if rep != nil {
		var freed int64
		for _, e := range rep.Removed {
			fmt.Fprintf(env.stdout, "removed %s (%s)\n", e.Dir, mib(e.Bytes))
			freed += e.Bytes
		}
		for _, e := range rep.Kept {
			fmt.Fprintf(env.stdout, "kept %s (%s): %s\n", e.Dir, mib(e.Bytes), e.Reason)
		}
		fmt.Fprintf(env.stdout, "freed %s\n", mib(freed))
	}
	if err != nil {
		fmt.Fprintf(env.stderr, "vmharness: image prune: %v\n", err)
		return exitHarnessError
	}
	return exitPass
}

func imagePrune(getenv func(string) string, cacheDir, recipePath string, all bool) (*images.PruneReport, error) {
	cacheDir, err := cacheDirFlag(getenv, cacheDir)
	if err != nil {
		return nil, err
	}
	var keep []string
	if !all {
		recipe, err := runRecipe(getenv, recipePath)
		if err != nil {
			return nil, err
		}
		dir, err := images.CacheImageDir(cacheDir, recipe)
		if err != nil {
			return nil, err
		}
		keep = append(keep, dir)
	}
	return images.Prune(cacheDir, keep)
}

// cacheDirFlag is the --cache-dir value made absolute, or the default
// cache directory when it is empty.
func cacheDirFlag(getenv func(string) string, flagValue string) (string, error) {
	if flagValue == "" {
		return images.CacheDir(getenv)
	}
	return filepath.Abs(flagValue)
}

func mib(bytes int64) string { return fmt.Sprintf("%.0f MiB", float64(bytes)/(1<<20)) }

func imageBuild(ctx context.Context, getenv func(string) string, progress io.Writer, recipePath, cacheDir string) (string, error) {
	recipe, err := runRecipe(getenv, recipePath)
	if err != nil {
		return "", err
	}
	if cacheDir, err = cacheDirFlag(getenv, cacheDir); err != nil {
		return "", err
	}
	img, err := images.NewBuilder(cacheDir, progress).Ensure(ctx, recipe)
	if err != nil {
		return "", err
	}
	return img.Dir, nil
}
