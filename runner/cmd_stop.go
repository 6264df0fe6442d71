package runner

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/vmharness/vmharness/harness/registry"
)

// cmdStop stops a harness VM: SIGTERM to QEMU, SIGKILL after a grace period.
// If no runner owns the VM any more (it was kept after a failed test), stop
// also removes the VM's work dir and registry entry; otherwise its runner
// notices QEMU's exit and cleans up itself.
func cmdStop(ctx context.Context, env *cliEnv, args []string) int {
	fs := flag.NewFlagSet("stop", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	grace := fs.Duration("grace", 10*time.Second, "wait this long after SIGTERM before SIGKILL")
	fs.Usage = func() {
		fmt.Fprintln(env.stderr, "usage: vmharness stop [--grace D] NAME...")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return exitHarnessError
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return exitHarnessError
	}
	reg, err := openRegistry(env)
	if err != nil {
		fmt.Fprintf(env.stderr, "vmharness stop: %v\n", err)
		return exitHarnessError
	}
	code := exitPass
	for _, name := range fs.Args() {
		if c := stopVM(ctx, env, reg, name, *grace); c != exitPass && code == exitPass {
			code = c
		}
	}
	return code
}

func stopVM(ctx context.Context, env *cliEnv, reg *registry.Registry, name string, grace time.Duration) int {
	e, err := reg.Lookup(name)
	if errors.Is(err, registry.ErrNotFound) {
		fmt.Fprintf(env.stderr, "vmharness stop: no running harness VM is called %q (see vmharness ps)\n", name)
		return exitFail
	}
	if err != nil {
		fmt.Fprintf(env.stderr, "vmharness stop: %v\n", err)
		return exitHarnessError
	}
	// A kept VM's runner, if still there, only waits for the deadline.
	orphan := e.Kept() || !e.RunnerAlive()

	if e.QEMUAlive() {
		how, err := terminate(ctx, e.QEMUPID, e.QEMUAlive, grace)
		if err != nil {
			fmt.Fprintf(env.stderr, "vmharness stop: %s: QEMU pid %d: %v\n", name, e.QEMUPID, err)
			return exitHarnessError
		}
		fmt.Fprintf(env.stdout, "%s: stopped QEMU (pid %d, %s)\n", name, e.QEMUPID, how)
	}
	if !orphan {
		if e.QEMUPID == 0 {
			// Still booting: QEMU has not started, so stop its runner,
			// whose cancellation tears everything down.
			how, err := terminate(ctx, e.RunnerPID, e.RunnerAlive, grace)
			if err != nil {
				fmt.Fprintf(env.stderr, "vmharness stop: %s: runner pid %d: %v\n", name, e.RunnerPID, err)
				return exitHarnessError
			}
			fmt.Fprintf(env.stdout, "%s: stopped its runner before QEMU started (pid %d, %s)\n", name, e.RunnerPID, how)
			return exitPass
		}
		fmt.Fprintf(env.stdout, "%s: runner pid %d cleans up the rest\n", name, e.RunnerPID)
		return exitPass
	}
	if e.Kept() && e.RunnerAlive() && e.RunnerPID != os.Getpid() {
		if how, err := terminate(ctx, e.RunnerPID, e.RunnerAlive, grace); err != nil {
			fmt.Fprintf(env.stderr, "vmharness stop: %s: runner pid %d: %v\n", name, e.RunnerPID, err)
		} else {
			fmt.Fprintf(env.stdout, "%s: stopped runner (pid %d, %s)\n", name, e.RunnerPID, how)
		}
	}
	if e.WorkDir != "" {
		if err := reg.RemoveWorkDir(e); err != nil {
			fmt.Fprintf(env.stderr, "vmharness stop: %s: %v\n", name, err)
			return exitHarnessError
		}
		fmt.Fprintf(env.stdout, "%s: removed %s\n", name, e.WorkDir)
	}
	// Only this entry: a new run may have taken the name since QEMU died.
	if err := reg.Remove(e); err != nil {
		fmt.Fprintf(env.stderr, "vmharness stop: %s: %v\n", name, err)
		return exitHarnessError
	}
	fmt.Fprintf(env.stdout, "%s: removed registry entry\n", name)
	return exitPass
}

// terminate sends SIGTERM to pid, waits up to grace for alive to turn false,
// then sends SIGKILL and waits again. It reports which signal ended it.
func terminate(ctx context.Context, pid int, alive func() bool, grace time.Duration) (string, error) {
	for _, step := range []struct {
		sig  syscall.Signal
		wait time.Duration
	}{{syscall.SIGTERM, grace}, {syscall.SIGKILL, 5 * time.Second}} {
		// alive() compares the process start time, so a recycled pid is
		// never signalled after the VM's process is gone.
		if !alive() {
			return "already gone", nil
		}
		if err := syscall.Kill(pid, step.sig); err != nil && !errors.Is(err, syscall.ESRCH) {
			return "", fmt.Errorf("send %v: %w", step.sig, err)
		}
		if waitGone(ctx, alive, step.wait) {
			return step.sig.String(), nil
		}
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
	}
	return "", errors.New("still running after SIGKILL")
}

func waitGone(ctx context.Context, alive func() bool, d time.Duration) bool {
	deadline := time.Now().Add(d)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for alive() {
		if time.Now().After(deadline) {
			return false
		}
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
	return true
}
