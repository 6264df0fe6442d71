package runner

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmharness/vmharness/internal/flock"

	"github.com/vmharness/vmharness/harness"
	"github.com/vmharness/vmharness/images"
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
// boot) under the template's lock if no other run has. Templates live in
// the cache's snapshots/ directory, named after the image's directory and
// a key of the QEMU command line's shape. The run holds the lock shared
// until release is called, so `vmharness image prune` leaves the template
// alone while the run restores from it.
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
	lock, err := os.OpenFile(dir+".lock", os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return "", nil, fmt.Errorf("snapshot template lock: %w", err)
	}
	release = func() { lock.Close() }
	waiting := func() { r.logf("snapshot template %s: waiting for another run building it", name) }
	if err := lockTemplate(ctx, lock, unix.LOCK_SH, waiting); err != nil {
		release()
		return "", nil, err
	}
	if _, err := harness.OpenTemplate(dir); err == nil {
		return dir, release, nil
	}
	// Building needs the lock alone. flock converts a lock by dropping it
	// first, so two runs that both found no template cannot deadlock
	// here; the second finds the first's template below.
	if err := lockTemplate(ctx, lock, unix.LOCK_EX, waiting); err != nil {
		release()
		return "", nil, err
	}
	if _, err := harness.OpenTemplate(dir); err != nil {
		if err := buildSnapshotTemplate(ctx, r, cfg, name, dir); err != nil {
			release()
			return "", nil, err
		}
	}
	if err := lockTemplate(ctx, lock, unix.LOCK_SH, waiting); err != nil {
		release()
		return "", nil, err
	}
	// Between the exclusive and the shared lock a prune could have taken
	// the template, but only one whose image is gone, and this run holds
	// its image.
	if _, err := harness.OpenTemplate(dir); err != nil {
		release()
		return "", nil, fmt.Errorf("snapshot template %s: removed while this run started (by vmharness image prune?); run the test again: %w", name, err)
	}
	return dir, release, nil
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

// lockTemplate takes (or converts to) the flock how on the template's
// lock file, polling so ctx can end the wait; waiting is called if it
// has to wait.
func lockTemplate(ctx context.Context, f *os.File, how int, waiting func()) error {
	if err := flock.Wait(ctx, f, how, 200*time.Millisecond, waiting); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("waiting for snapshot template lock %s: %w", f.Name(), err)
		}
		return fmt.Errorf("snapshot template lock %s: %w", f.Name(), err)
	}
	return nil
}
