package runner

import (
	"context"
	"time"

	"github.com/vmharness/vmharness/harness"
	"github.com/vmharness/vmharness/harness/admission"
	"github.com/vmharness/vmharness/harness/registry"
)

// admit waits for a VM slot (package admission) before anything of the VM
// exists, so its boot timeout and --timeout start only once it is
// admitted. The slot is held until QEMU exits (attemptState.releaseSlot)
// and released by the cleanup chain otherwise. It returns false, with the
// exit code, when the run must end: a bad setting (99), or SIGTERM/SIGINT
// while waiting (a test failure, "interrupted ...", like an interrupt at
// any other time).
func (r *testRun) admit(ctx context.Context, name string) (int, bool) {
	// Open checks that the runtime directory is this user's and private.
	reg, err := registry.Open(registry.RuntimeDir(r.env.getenv))
	if err != nil {
		return r.fail("%v", err), false
	}
	cfg, err := admission.ConfigFromEnv(r.env.getenv, reg.Dir(), admission.HostCPUs())
	if err != nil {
		return r.fail("%v", err), false
	}
	limit := "the default limit, one VM per host CPU; VMHARNESS_MAX_VMS sets it"
	if cfg.MaxVMsFromEnv {
		limit = "limit from VMHARNESS_MAX_VMS"
	}
	start := time.Now()
	slot, err := admission.Admit(ctx, cfg, admission.Request{Name: name, MemoryMiB: r.opts.memoryMiB}, func(w admission.Waiting) {
		r.logf("%s: waiting for a VM slot: %s (%s); the boot timeout starts once admitted", name, w, limit)
	})
	if err != nil {
		r.attempt.wait = time.Since(start)
		if ctx.Err() != nil {
			o := harness.Outcome{ExitCode: harness.ExitFail, Reason: "interrupted " + err.Error()}
			r.attempt.outcome = &o
			r.logf("%s: FAIL: %s", name, o.Reason)
			return o.ExitCode, false
		}
		return r.fail("%v", err), false
	}
	r.attempt.slot, r.attempt.wait = slot, slot.Waited
	r.defer_(slot.Release)
	if slot.Waited >= time.Second {
		r.logf("%s: admitted after waiting %s for a VM slot", name, slot.Waited.Round(100*time.Millisecond))
	}
	if slot.Note != "" {
		r.logf("%s: %s", name, slot.Note)
	}
	return 0, true
}
