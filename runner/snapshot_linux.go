package runner

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/vmharness/vmharness/harness"
	"github.com/vmharness/vmharness/images"
	"github.com/vmharness/vmharness/internal/flock"
)

// snapshotUnsupported checks the run's options against what a snapshot
// start can do, before anything is set up (harness.SnapshotUnsupported).
func snapshotUnsupported(o *runOptions, creds []harness.Credential) error {
	cfg := harness.Config{
		Credentials:  creds,
		KernelArgs:   o.kernelArgs,
		QEMUArgs:     o.qemuArgs,
		SkipTestUnit: o.interactive,
		Disks:        o.devices.parsedDisks,
		Firmware:     o.devices.parsedFirmware,
		TPM:          o.devices.tpm,
		Env:          o.devices.env,
	}
	if o.buildDir != "" {
		cfg.Layer = o.buildDir
	}
	if o.keepVM > 0 {
		cfg.KeepOnFailure = func(harness.Outcome) time.Duration { return 0 }
	}
	return harness.SnapshotUnsupported(cfg)
}

// ensureSnapshotTemplate returns the directory of the image's snapshot
// template for this run's machine shape, building it (one template VM
// boot) if no other run has. Templates live in the cache's snapshots/
// directory, named after the image's directory and a key of the QEMU
// command line's shape.
//
// Two locks: the run holds the template's lock (<dir>.lock) shared until
// release is called, so `vmharness image prune`, which takes it
// exclusively without waiting, leaves the template alone while a run
// restores from it or builds it; builders take <dir>.build.lock
// exclusively, so one run builds and the others wait for it alone, not
// for every run holding the template.
func ensureSnapshotTemplate(ctx context.Context, r *testRun, cfg harness.TemplateConfig) (dir string, release func(), err error) {
	cache, err := images.CacheDir(r.env.getenv)
	if err != nil {
		return "", nil, err
	}
	name, err := harness.TemplateName(ctx, cfg)
	if err != nil {
		return "", nil, err
	}
	root := filepath.Join(cache, images.SnapshotsDir)
	if err := os.MkdirAll(root, 0o755); err != nil {
		return "", nil, fmt.Errorf("snapshot template directory: %w", err)
	}
	dir = filepath.Join(root, name)
	release, err = holdTemplate(ctx, dir,
		func() error { _, err := harness.OpenTemplate(dir); return err },
		func() error { return buildSnapshotTemplate(ctx, r, cfg, name, dir) },
		func() { r.logf("snapshot template %s: waiting for another run building it", name) })
	if err != nil {
		return "", nil, err
	}
	return dir, release, nil
}

// holdTemplate takes the template at dir's lock (<dir>.lock) shared and,
// if open says the template is not usable, builds it under
// <dir>.build.lock (flock.Entry).
func holdTemplate(ctx context.Context, dir string, open, build func() error, waiting func()) (release func(), err error) {
	release, _, err = flock.Entry{
		What: "snapshot template", Lock: dir + ".lock", BuildLock: dir + ".build.lock",
		Ready:   func() bool { return open() == nil },
		Build:   func(context.Context) error { return build() },
		Waiting: waiting,
		Poll:    200 * time.Millisecond,
	}.Hold(ctx)
	return release, err
}

// discardSnapshotTemplate removes a template whose restored guest never
// took the test (harness.ErrSnapshotAgentSilent), so that the next run
// builds a new one instead of failing the same way. Runs restoring from
// it meanwhile keep their open files.
func discardSnapshotTemplate(r *testRun, dir string) {
	if err := os.RemoveAll(dir); err != nil {
		r.logf("snapshot template %s: could not remove it after a failed restore: %v; remove it by hand", filepath.Base(dir), err)
		return
	}
	r.logf("snapshot template %s: removed after a failed restore; the next --snapshot run builds a new one", filepath.Base(dir))
}

// buildSnapshotTemplate boots the template VM and saves it as dir; the
// caller holds the template's lock exclusively.
func buildSnapshotTemplate(ctx context.Context, r *testRun, cfg harness.TemplateConfig, name, dir string) error {
	// A template left half-built by a killed run is replaced.
	os.RemoveAll(dir)
	tmp := dir + ".tmp-" + strconv.Itoa(os.Getpid())
	os.RemoveAll(tmp)
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return fmt.Errorf("snapshot template: %w", err)
	}
	start := time.Now()
	r.logf("snapshot template %s: booting the template VM (once per image and machine shape)", name)
	if err := harness.BuildTemplate(ctx, cfg, tmp); err != nil {
		// The template's console says why; it is kept next to where
		// the template would have been.
		failedLog := dir + ".failed-console.log"
		if os.Rename(filepath.Join(tmp, "console.log"), failedLog) == nil {
			err = fmt.Errorf("%w (template console: %s)", err, failedLog)
		}
		os.RemoveAll(tmp)
		return err
	}
	if err := os.Rename(tmp, dir); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("snapshot template: %w", err)
	}
	r.logf("snapshot template %s: built in %.1fs", name, time.Since(start).Seconds())
	return nil
}
