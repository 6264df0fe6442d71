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
// boot) under a lock if no other run has. Templates live in the cache's
// snapshots/ directory, named after the image's directory and a key of
// the QEMU command line's shape.
func ensureSnapshotTemplate(ctx context.Context, r *testRun, cfg harness.TemplateConfig) (string, error) {
	cache, err := images.CacheDir(r.env.getenv)
	if err != nil {
		return "", err
	}
	name, err := harness.TemplateName(ctx, cfg)
	if err != nil {
		return "", err
	}
	root := filepath.Join(cache, "snapshots")
	if err := os.MkdirAll(root, 0o755); err != nil {
		return "", fmt.Errorf("snapshot template directory: %w", err)
	}
	dir := filepath.Join(root, name)
	if _, err := harness.OpenTemplate(dir); err == nil {
		return dir, nil
	}
	unlock, err := lockFile(ctx, dir+".lock", func() {
		r.logf("snapshot template %s: waiting for another run building it", name)
	})
	if err != nil {
		return "", err
	}
	defer unlock()
	if _, err := harness.OpenTemplate(dir); err == nil {
		return dir, nil
	}
	// A template left half-built by a killed run is replaced.
	os.RemoveAll(dir)
	tmp := dir + ".tmp-" + strconv.Itoa(os.Getpid())
	os.RemoveAll(tmp)
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return "", fmt.Errorf("snapshot template: %w", err)
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
		return "", err
	}
	if err := os.Rename(tmp, dir); err != nil {
		os.RemoveAll(tmp)
		return "", fmt.Errorf("snapshot template: %w", err)
	}
	r.logf("snapshot template %s: built in %.1fs", name, time.Since(start).Seconds())
	return dir, nil
}

// lockFile takes an exclusive flock on path, polling so ctx can end the
// wait; waiting is called once if it has to wait.
func lockFile(ctx context.Context, path string, waiting func()) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("snapshot template lock: %w", err)
	}
	if err := flock.Wait(ctx, f, unix.LOCK_EX, 200*time.Millisecond, waiting); err != nil {
		f.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("waiting for snapshot template lock %s: %w", path, err)
		}
		return nil, fmt.Errorf("snapshot template lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}
