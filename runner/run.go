package runner

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vmharness/vmharness/harness"
	"github.com/vmharness/vmharness/harness/registry"
	"github.com/vmharness/vmharness/harness/sshkey"
	"github.com/vmharness/vmharness/harness/vsock"
	"github.com/vmharness/vmharness/images"
)

// testRun is one `vmharness run`: it owns every resource the run creates
// and releases them in reverse order.
type testRun struct {
	env      *cliEnv
	opts     *runOptions
	cleanups []func()
	// detached is set once a kept VM's result went to the foreground
	// process; later output goes to the keeper's log only.
	detached bool
	// attempt is what this attempt leaves for runAttempts (attempts.go).
	attempt attemptState
}

func (r *testRun) logf(format string, args ...any) {
	fmt.Fprintf(r.env.stderr, "vmharness: "+format+"\n", args...)
}

// fail prints one clear line for a harness problem and returns exit 99.
func (r *testRun) fail(format string, args ...any) int {
	fmt.Fprintf(r.env.stderr, "vmharness run: "+format+"\n", args...)
	r.attempt.failed(fmt.Sprintf(format, args...))
	return harness.ExitHarnessError
}

func (r *testRun) defer_(f func()) { r.cleanups = append(r.cleanups, f) }

func (r *testRun) cleanup() {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
	r.cleanups = nil
}

func (r *testRun) run(ctx context.Context) int {
	defer r.cleanup()
	opts, getenv := r.opts, r.env.getenv

	unit, err := harness.LoadTestUnit(opts.unitPath)
	if err != nil {
		return r.fail("%v", err)
	}
	var creds []harness.Credential
	for _, arg := range opts.credentials {
		c, err := harness.ParseCredentialArg(arg)
		if err != nil {
			return r.fail("%v", err)
		}
		creds = append(creds, c)
	}
	if err := harness.CheckHostSupport(opts.devices.parsedFirmware, opts.devices.tpm); err != nil {
		return r.fail("%v", err)
	}
	if opts.snapshot {
		if err := snapshotUnsupported(opts, creds); err != nil {
			return r.fail("%v", err)
		}
	}
	keepJournal, err := parseKeepPolicy(opts.keepJournal)
	if err != nil {
		return r.fail("%v", err)
	}
	vsockMode, err := vsock.ParseMode(getenv(vsock.EnvMode))
	if err != nil {
		return r.fail("%v", err)
	}
	accel, err := harness.DetectAccel(getenv)
	if err != nil {
		return r.fail("%v", err)
	}
	img, releaseImage, err := ensureImage(ctx, r.env, opts.recipe)
	if err != nil {
		return r.fail("%v", err)
	}
	defer releaseImage()
	var layer string
	if opts.buildDir != "" {
		path, releaseLayer, err := prepareBuildLayer(ctx, r.env, img, opts.buildDir, r.logf)
		if err != nil {
			return r.fail("%v", err)
		}
		defer releaseLayer()
		layer = path
	}
	r.attempt.unit = unit.Name
	if code, ok := r.admit(ctx, baseName(opts, unit)); !ok {
		return code
	}
	var snapshotDir string
	if opts.snapshot {
		timg, err := harness.SnapshotBootImage(img, filepath.Join(filepath.Dir(img.Kernel), images.InitrdFile))
		if err != nil {
			return r.fail("%v", err)
		}
		var releaseTemplate func()
		snapshotDir, releaseTemplate, err = ensureSnapshotTemplate(ctx, r, harness.TemplateConfig{
			QEMU: getenv("VMHARNESS_QEMU"), Image: timg, MemoryMiB: opts.memoryMiB, CPUs: opts.cpus,
			Accel: accel, BootTimeout: 45 * time.Second * accel.TimeoutScale(), Logf: r.logf,
		})
		if err != nil {
			return r.fail("%v", err)
		}
		defer releaseTemplate()
	}

	stateDir, err := sshkey.StateDir(getenv)
	if err != nil {
		return r.fail("%v", err)
	}
	journalDir := opts.journalDir
	if journalDir == "" {
		journalDir = filepath.Join(stateDir, "journal")
	}
	// The key first: it makes the state directory 0700 before the default
	// journal directory is created inside it.
	_, pubKey, err := sshkey.EnsureKey(stateDir)
	if err != nil {
		return r.fail("ssh key: %v", err)
	}
	if err := os.MkdirAll(journalDir, 0o755); err != nil {
		return r.fail("journal directory: %v", err)
	}

	reg, err := registry.Open(registry.RuntimeDir(getenv))
	if err != nil {
		return r.fail("%v", err)
	}
	workDir, err := reg.NewWorkDir()
	if err != nil {
		return r.fail("%v", err)
	}
	r.defer_(func() { os.RemoveAll(workDir) })

	transport, err := vsock.New(ctx, vsock.Config{
		Mode:         vsockMode,
		RuntimeDir:   workDir,
		CIDAllocator: reg,
		Logf:         r.logf,
	})
	if err != nil {
		return r.fail("%v", err)
	}
	r.defer_(func() { transport.Close() })

	var journalL net.Listener
	var journalPort uint32
	if opts.snapshot {
		// The template's journald forwards to this port for good.
		journalPort = harness.SnapshotJournalPort
		journalL, err = transport.Listen(journalPort)
	} else {
		journalL, journalPort, err = vsock.ListenFree(transport)
	}
	if err != nil {
		return r.fail("listening for the guest's journal: %v", err)
	}
	r.defer_(func() { journalL.Close() })

	name, reg_, err := r.register(reg, baseName(opts, unit), registry.Entry{
		CID:          transport.CID(),
		Transport:    string(transport.Kind()),
		HybridSocket: transport.HybridSocket(),
		RunnerPID:    os.Getpid(),
		StartTime:    time.Now(),
		WorkDir:      workDir,
	})
	if err != nil {
		return r.fail("%v", err)
	}
	r.defer_(func() { reg_.Remove() })
	r.attempt.name, r.attempt.journalDir = name, journalDir
	journalPath := filepath.Join(journalDir, name+".journal")
	consoleLog := filepath.Join(journalDir, name+".console.log")
	reg_.Update(func(e *registry.Entry) { e.JournalPath, e.ConsoleLog = journalPath, consoleLog })

	journal, err := startJournal(ctx, r, journalL, journalPath, unit.Name, opts.journalDir != "")
	if err != nil {
		return r.fail("%v", err)
	}

	if !opts.snapshot {
		creds = append(creds,
			harness.Credential{Name: "journal.forward_to_socket", Value: []byte(fmt.Sprintf("vsock-stream:%d:%d", vsock.HostCID, journalPort))},
			harness.Credential{Name: "journal.storage", Value: []byte("volatile")},
			harness.Credential{Name: "ssh.authorized_keys.root", Value: []byte(pubKey + "\n")},
		)
	}
	// The VM runs until the test ends; in shell mode until the shell does.
	runCtx, cancelRun := context.WithCancelCause(ctx)
	defer cancelRun(nil)
	var shellDone chan error
	var onReady func()
	if opts.interactive {
		shellDone = make(chan error, 1)
		onReady = func() {
			go func() {
				shellDone <- r.shell(name)
				cancelRun(harness.ErrShellExited)
			}()
		}
		r.logf("%s: shell mode: the test unit is installed but not started; the shell opens when the guest has booted", name)
	}
	var keepOnFailure func(harness.Outcome) time.Duration
	if handoff := newKeeperHandoff(getenv); handoff != nil && opts.keepVM > 0 {
		keepOnFailure = func(o harness.Outcome) time.Duration {
			return r.keep(reg_, handoff, name, transport.CID(), workDir, o)
		}
	}
	bootTimeout := opts.bootTimeout
	if bootTimeout == 0 {
		bootTimeout = 45 * time.Second * accel.TimeoutScale()
	}
	m, err := harness.NewMachine(ctx, harness.Config{
		Name:          name,
		QEMU:          getenv("VMHARNESS_QEMU"),
		Image:         img,
		Unit:          unit,
		Credentials:   creds,
		KernelArgs:    opts.kernelArgs,
		QEMUArgs:      opts.qemuArgs,
		MemoryMiB:     opts.memoryMiB,
		CPUs:          opts.cpus,
		Accel:         accel,
		WorkDir:       workDir,
		ConsoleLog:    consoleLog,
		Transport:     transport,
		Layer:         layer,
		Env:           opts.devices.env,
		Disks:         opts.devices.parsedDisks,
		Firmware:      opts.devices.parsedFirmware,
		TPM:           opts.devices.tpm,
		FullShutdown:  opts.fullShutdown,
		JournalHas:    journal.hasMarker,
		Exclude:       opts.exclude,
		Timeout:       opts.timeout,
		BootTimeout:   bootTimeout,
		SkipTestUnit:  opts.interactive,
		OnReady:       onReady,
		KeepOnFailure: keepOnFailure,
		Snapshot:      snapshotDir,
		Logf:          r.logf,
	})
	if err != nil {
		journal.abort()
		return r.fail("%v", err)
	}

	r.logf("%s: booting on %s, cpu %s, vsock %s CID %d", name, accel, m.CPU(), transport.Kind(), transport.CID())
	res, err := m.Run(runCtx, func(pid int) {
		reg_.Update(func(e *registry.Entry) { e.QEMUPID = pid })
	})
	r.attempt.releaseSlot()
	if err != nil {
		journal.abort()
		if errors.Is(err, harness.ErrSnapshotAgentSilent) && snapshotDir != "" {
			discardSnapshotTemplate(r, snapshotDir)
		}
		return r.fail("%v", err)
	}
	// QEMU is gone; the journal streams end now. Wait until every entry
	// the guest sent is on disk before judging and cleaning up.
	journalErr := journal.finish()

	// The journal is complete: its record of the test unit's result is the
	// verdict's cross-check (and its fallback should the unit's own report
	// have been lost).
	outcome := res.Judge(journal.unitResult(), journal.findings())
	if shellDone != nil {
		select {
		case err := <-shellDone:
			if err != nil {
				outcome = harness.Outcome{ExitCode: harness.ExitHarnessError, Reason: err.Error()}
				res.Outcome = outcome
			}
		default:
		}
	}
	if journalErr != nil {
		r.logf("%s: journal: %v", name, journalErr)
		if outcome.Passed() && journal.explicit {
			outcome = harness.Outcome{ExitCode: harness.ExitHarnessError, Reason: journalErr.Error()}
			res.Outcome = outcome
		}
	}
	r.report(name, unit, res, journal)
	if !keepJournal.keep(outcome) {
		journal.remove()
		os.Remove(consoleLog)
	}
	r.attempt.finished(outcome, res.Elapsed, journal.collector.Files(), consoleLog)
	return r.expect(name, outcome)
}

// expect applies --expect-failure: a test declared to fail passes only when
// it failed for the declared reason, so a should-fail test cannot be
// satisfied by a harness error or a crash.
func (r *testRun) expect(name string, o harness.Outcome) int {
	re := r.opts.expectFailure
	if re == nil {
		return o.ExitCode
	}
	switch {
	case o.Failed() && re.MatchString(o.Reason):
		r.logf("%s: failed as expected (reason matches %q)", name, re)
		return harness.ExitPass
	case o.Failed():
		r.logf("%s: expected a failure matching %q, but it failed with: %s", name, re, o.Reason)
		return harness.ExitFail
	case o.ExitCode == harness.ExitHarnessError:
		return o.ExitCode
	}
	r.logf("%s: expected a failure matching %q, but the test did not fail (exit %d)", name, re, o.ExitCode)
	return harness.ExitFail
}

// shell runs an interactive ssh session into the VM while the VM is up,
// with the user's terminal. The session's own exit status is the user's
// business, not the test's: only a shell that could not run is an error.
func (r *testRun) shell(name string) error {
	argv, err := sshArgv(r.env, []string{name})
	if err != nil {
		return fmt.Errorf("shell: %w", err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = r.env.stdin, r.env.stdout, r.env.stderr
	if err := cmd.Run(); err != nil && cmd.ProcessState == nil {
		return fmt.Errorf("shell: %w", err)
	}
	if code := cmd.ProcessState.ExitCode(); code == 255 {
		// ssh's own failure (connection refused, key rejected).
		return fmt.Errorf("shell: ssh could not connect to the VM (exit status 255)")
	}
	return nil
}

// keep hands a failed test's result to the foreground process and keeps the
// VM running for opts.keepVM, printing how to get in and how to stop it.
func (r *testRun) keep(g *registry.Registration, handoff *keeperHandoff, name string, cid uint32, workDir string, o harness.Outcome) time.Duration {
	until := time.Now().Add(r.opts.keepVM)
	if err := g.Update(func(e *registry.Entry) { e.KeptUntil = until }); err != nil {
		r.logf("%s: cannot keep the VM: %v", name, err)
		return 0
	}
	self, err := os.Executable()
	if err != nil {
		self = "vmharness"
	}
	r.logf("%s: FAIL: %s", name, o.Reason)
	r.logf("%s: the VM is kept running until %s (CID %d) for you to look around:", name, until.Format("15:04"), cid)
	r.logf("    ssh:  %s ssh %s", self, name)
	r.logf("    stop: %s stop %s", self, name)
	if err := handoff.detach(o.ExitCode, filepath.Join(workDir, "keeper.log")); err != nil {
		r.logf("%s: handing over the result: %v", name, err)
		return 0
	}
	r.detached = true
	return r.opts.keepVM
}

// report prints the outcome: one line for a pass or skip, the reason, the
// console's last lines and the journal summary for a failure.
func (r *testRun) report(name string, unit harness.TestUnit, res *harness.Result, journal *journalRun) {
	o := res.Outcome
	if r.detached {
		r.logf("%s: kept VM stopped", name)
		return
	}
	elapsed := res.Elapsed.Round(100 * time.Millisecond)
	// Where the time went, from QEMU's start: the guest's first message
	// ends kernel and initrd, the test's report ends the test, the exit
	// status ends the guest's shutdown.
	if tl := res.Timeline.String(); tl != "" {
		r.logf("%s: timings: %s", name, tl)
	}
	switch {
	case o.Passed():
		r.logf("%s: PASS (%s)", name, elapsed)
		return
	case o.Skipped():
		r.logf("%s: SKIP: %s (%s)", name, o.Reason, elapsed)
		return
	}
	r.logf("%s: FAIL: %s (%s)", name, o.Reason, elapsed)
	if o.ExitCode == harness.ExitHarnessError && res.QEMUStderr != "" {
		r.logf("QEMU said:\n%s", indent(res.QEMUStderr))
	}
	if len(res.ConsoleTail) > 0 {
		tail := res.ConsoleTail
		if len(tail) > 20 {
			tail = tail[len(tail)-20:]
		}
		r.logf("last console lines:\n%s", indent(strings.Join(tail, "\n")))
	}
	journal.summary(r.env.stderr)
	journal.writeFindings(r.env.stderr, r.opts.exclude)
	if o.ExitCode != harness.ExitHarnessError && r.opts.snapshot {
		r.logf("to get a shell in this test's VM after it fails, rerun it without --snapshot (VMHARNESS_SNAPSHOT) and with VMHARNESS_KEEP_FAILED_VM=30m")
	} else if o.ExitCode != harness.ExitHarnessError {
		r.logf("to get a shell in this test's VM after it fails, rerun it with VMHARNESS_KEEP_FAILED_VM=30m (meson test --setup=keep %s)", name)
	}
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(s, "\n", "\n    ")
}

// baseName is the VM's name before uniquifying: --name or the unit name,
// with Meson's repeat iteration appended so repeated runs stay apart.
func baseName(opts *runOptions, unit harness.TestUnit) string {
	name := opts.name
	if name == "" {
		name = strings.TrimSuffix(unit.Name, ".service")
	}
	// Template instances (foo@bar) and other characters ssh would misread
	// in machine/NAME are replaced.
	return registry.SanitizeName(name)
}

// register records the VM under a unique name: name, or name-2, name-3...
// when a live VM (a parallel run of the same test) already has it.
func (r *testRun) register(reg *registry.Registry, name string, e registry.Entry) (string, *registry.Registration, error) {
	if it := r.env.getenv("MESON_TEST_ITERATION"); it != "" && it != "1" {
		name += "-iter" + it
	}
	for i := 1; i <= 100; i++ {
		e.Name = name
		if i > 1 {
			e.Name = name + "-" + strconv.Itoa(i)
		}
		g, err := reg.Register(e)
		if errors.Is(err, registry.ErrNameTaken) {
			continue
		}
		if err != nil {
			return "", nil, fmt.Errorf("registering VM %s: %w", e.Name, err)
		}
		return e.Name, g, nil
	}
	return "", nil, fmt.Errorf("registering VM %s: 100 live VMs already use this name", name)
}
