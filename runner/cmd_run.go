package runner

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"regexp"
	"strings"
	"time"

	"github.com/vmharness/vmharness/harness"
	"github.com/vmharness/vmharness/harness/verdict"
)

// runOptions are the flags of `vmharness run`. The flag set is the stable
// interface Meson and other tools script against.
type runOptions struct {
	name        string
	timeout     time.Duration
	bootTimeout time.Duration
	credentials []string
	kernelArgs  []string
	qemuArgs    []string
	journalDir  string
	keepJournal string
	keepVM      time.Duration
	interactive bool
	memoryMiB   int
	cpus        int
	// recipe is the image recipe file (--recipe), buildDir the Meson
	// build directory installed into the guest (--build-dir).
	recipe   string
	buildDir string
	// expectFailure is --expect-failure: the run passes only if the test
	// fails with a reason this matches.
	expectFailure *regexp.Regexp
	// fullShutdown waits for the guest's own shutdown after the test.
	fullShutdown bool
	// devices: --setenv, --disk, --firmware, --tpm (devices.go).
	devices deviceOptions
	// exclude is --coredump-exclude and --sanitizer-exclude (findings.go).
	exclude  verdict.Exclusions
	unitPath string
	// ci holds --no-retry and --report-dir (attempts.go).
	ci ciOptions
	// snapshot starts the test from a saved template VM (experimental;
	// snapshot_linux.go).
	snapshot bool
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func parseRunFlags(env *cliEnv, args []string) (*runOptions, error) {
	o := &runOptions{}
	fs := flag.NewFlagSet("vmharness run", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.name, "name", "", "VM and journal name (default: the unit name without .service)")
	fs.DurationVar(&o.timeout, "timeout", 0, "fail the test when it runs longer than this (0: no limit)")
	fs.DurationVar(&o.bootTimeout, "boot-timeout", 0, "fail when the guest has not talked to the host after this long, not counting time QEMU waits for a host CPU (default 45s, 3m under TCG)")
	fs.Var((*stringList)(&o.credentials), "credential", "pass a credential NAME=VALUE or NAME=@FILE (repeatable)")
	fs.Var((*stringList)(&o.kernelArgs), "kernel-arg", "append to the guest kernel command line (repeatable)")
	fs.Var((*stringList)(&o.qemuArgs), "qemu-arg", "append one QEMU argument (repeatable)")
	fs.StringVar(&o.journalDir, "journal-dir", env.getenv("VMHARNESS_JOURNAL_DIR"), "directory for <name>.journal and <name>.console.log")
	fs.StringVar(&o.keepJournal, "keep-journal", firstNonEmpty(env.getenv("VMHARNESS_KEEP_JOURNAL"), "fail"), "keep the journal: always, fail or never")
	keepVM := env.getenv("VMHARNESS_KEEP_FAILED_VM")
	fs.DurationVar(&o.keepVM, "keep-failed-vm", 0, "when the test fails, leave the VM running this long for ssh (env VMHARNESS_KEEP_FAILED_VM; 0: stop it)")
	fs.BoolVar(&o.interactive, "shell", env.getenv("VMHARNESS_SHELL") == "1", "boot without starting the test unit and open a shell in the VM (env VMHARNESS_SHELL=1)")
	fs.IntVar(&o.memoryMiB, "memory", 1024, "guest memory in MiB")
	fs.IntVar(&o.cpus, "cpus", 2, "guest CPUs")
	fs.StringVar(&o.recipe, "recipe", "", "image recipe file (default: $VMHARNESS_RECIPE, else the built-in default image)")
	fs.StringVar(&o.buildDir, "build-dir", env.getenv("VMHARNESS_BUILD_DIR"), "Meson build directory to install into the guest's root before it boots (env VMHARNESS_BUILD_DIR)")
	fs.BoolVar(&o.fullShutdown, "full-shutdown", false, "after the test, let the guest shut down by itself (and log its shutdown) instead of stopping the VM once the outcome is decided")
	fs.BoolVar(&o.snapshot, "snapshot", env.getenv("VMHARNESS_SNAPSHOT") == "1", "experimental: start the test from a saved snapshot of a booted template VM instead of booting (env VMHARNESS_SNAPSHOT=1)")
	o.devices.register(fs)
	expectFailure := fs.String("expect-failure", "", "the test is expected to fail with a reason matching this regular expression: exit 0 if it does, 1 otherwise")
	coredumpExclude := fs.String("coredump-exclude", "", "core dumps of executables whose path matches this regular expression do not fail the test")
	sanitizerExclude := fs.String("sanitizer-exclude", "", "sanitizer reports of programs whose name matches this regular expression do not fail the test")
	o.ci.register(fs, env)
	if keepVM != "" {
		d, err := parseKeepDuration(keepVM)
		if err != nil {
			return nil, fmt.Errorf("VMHARNESS_KEEP_FAILED_VM: %w", err)
		}
		o.keepVM = d
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() != 1 {
		return nil, errors.New("usage: vmharness run [flags] UNIT_FILE (exactly one unit file)")
	}
	o.unitPath = fs.Arg(0)
	if err := o.devices.parse(env.getenv); err != nil {
		return nil, err
	}
	if *expectFailure != "" {
		re, err := regexp.Compile(*expectFailure)
		if err != nil {
			return nil, fmt.Errorf("--expect-failure: %w", err)
		}
		o.expectFailure = re
	}
	exclude, err := parseExclusions(*coredumpExclude, *sanitizerExclude)
	if err != nil {
		return nil, err
	}
	o.exclude = exclude
	if o.memoryMiB < 256 || o.cpus < 1 {
		return nil, errors.New("--memory must be at least 256 and --cpus at least 1")
	}
	return o, nil
}

// parseKeepDuration accepts a Go duration, or "1"/"yes"/"true" for the
// default of 30 minutes, so a Meson test setup can say VMHARNESS_KEEP_FAILED_VM=1.
func parseKeepDuration(s string) (time.Duration, error) {
	switch strings.ToLower(s) {
	case "1", "yes", "true":
		return 30 * time.Minute, nil
	case "0", "no", "false", "":
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%q is not a duration like 30m (or 1/0)", s)
	}
	return d, nil
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

func cmdRun(ctx context.Context, env *cliEnv, args []string) int {
	opts, err := parseRunFlags(env, args)
	if err != nil {
		fmt.Fprintf(env.stderr, "vmharness run: %v\n", err)
		return harness.ExitHarnessError
	}
	if opts.keepVM > 0 && !opts.interactive && env.getenv(supervisorFDEnv) == "" {
		return runDetached(ctx, env, args)
	}
	return runAttempts(ctx, env, opts)
}
