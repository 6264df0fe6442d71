package runner

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/vmharness/vmharness/shard"
)

// cmdShard prints the test names of one shard of a Meson suite (see
// package shard), or with --write-durations writes a durations file.
func cmdShard(ctx context.Context, env *cliEnv, args []string) int {
	fs := flag.NewFlagSet("vmharness shard", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	index := fs.Int("index", 0, "which shard to print, 1 to --total")
	total := fs.Int("total", 0, "how many shards the suite is split into")
	buildDir := fs.String("C", ".", "the Meson build directory")
	var suites, durationFiles stringList
	fs.Var(&suites, "suite", "only tests in this suite, as meson test --suite (repeatable)")
	fs.Var(&durationFiles, "durations", "recorded durations: a durations file or a Meson testlog.json (repeatable; later files win; default BUILD/meson-logs/testlog.json)")
	writeTo := fs.String("write-durations", "", "write the durations read (--durations, else BUILD's testlog.json) to this file as a durations file, and print no shard")
	fail := func(format string, args ...any) int {
		fmt.Fprintf(env.stderr, "vmharness shard: "+format+"\n", args...)
		return exitHarnessError
	}
	if err := fs.Parse(args); err != nil {
		return fail("%v (usage: vmharness shard --index I --total N [-C BUILD] [--suite S] [--durations FILE])", err)
	}
	if fs.NArg() != 0 {
		return fail("unexpected argument %q", fs.Arg(0))
	}
	sources := []string(durationFiles)
	if len(sources) == 0 {
		sources = []string{filepath.Join(*buildDir, "meson-logs", "testlog.json")}
	}
	durations, problems := readDurations(sources)

	if *writeTo != "" {
		for _, p := range problems {
			fmt.Fprintf(env.stderr, "vmharness shard: durations: %v; skipped\n", p)
		}
		if len(problems) == len(sources) {
			return fail("--write-durations: no durations could be read; %s left unchanged", *writeTo)
		}
		if err := shard.WriteFile(*writeTo, durations); err != nil {
			return fail("--write-durations: %v", err)
		}
		fmt.Fprintf(env.stderr, "vmharness shard: wrote the durations of %d tests to %s\n", len(durations), *writeTo)
		return exitPass
	}

	if *total < 1 {
		return fail("--total must be at least 1 (usage: vmharness shard --index I --total N)")
	}
	if *index < 1 || *index > *total {
		return fail("--index %d is out of range: shards are numbered 1 to %d", *index, *total)
	}
	tests, err := shard.ListTests(ctx, *buildDir)
	if err != nil {
		return fail("%v", err)
	}
	selected, err := shard.Select(tests, suites)
	if err != nil {
		return fail("%v", err)
	}
	plan, err := shard.Split(shard.Jobs(selected, durations), *total)
	if errors.Is(err, shard.ErrTooFewTests) {
		return fail("%d tests selected, fewer than --total %d: a shard would be empty, and `meson test` given no test names runs every test; use --total %d or less",
			len(selected), *total, len(selected))
	}
	if err != nil {
		return fail("%v", err)
	}
	if len(problems) == len(sources) {
		// The first run of a CI cache has no durations yet: not an error.
		fmt.Fprintf(env.stderr, "vmharness shard: no recorded durations (%s); balancing by test count\n", joinErrors(problems))
	} else {
		for _, p := range problems {
			fmt.Fprintf(env.stderr, "vmharness shard: durations: %v; skipped\n", p)
		}
	}
	fmt.Fprintf(env.stderr, "vmharness shard: %s\n", plan.Describe(*index-1))
	fmt.Fprintln(env.stdout, strings.Join(plan.Shards[*index-1], "\n"))
	return exitPass
}

// readDurations merges the durations of every readable source, later
// sources winning, and returns a problem for each that is missing or
// corrupt.
func readDurations(sources []string) (shard.Durations, []error) {
	var all []shard.Durations
	var problems []error
	for _, src := range sources {
		d, _, err := shard.ReadFile(src)
		if errors.Is(err, os.ErrNotExist) {
			problems = append(problems, fmt.Errorf("%s does not exist", src))
			continue
		}
		if err != nil {
			problems = append(problems, fmt.Errorf("%s is corrupt: %w", src, errors.Unwrap(err)))
			continue
		}
		all = append(all, d)
	}
	return shard.Merge(all...), problems
}

func joinErrors(errs []error) string {
	parts := make([]string, len(errs))
	for i, e := range errs {
		parts[i] = e.Error()
	}
	return strings.Join(parts, "; ")
}
