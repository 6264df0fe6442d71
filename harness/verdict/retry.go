package verdict

// infrastructureFailure decides Outcome.Retry: QEMU itself died before the
// test had a result, so the run tells nothing about the test and may be
// repeated. That is QEMU killed by a signal nobody in the harness sent (a
// crash, the OOM killer, a user), or QEMU exiting with an error message of
// its own (the vhost-user vsock device failing, a failed start-up).
//
// Never retried, because the test itself spoke or the harness ended the VM:
// any result of the test unit (over vsock or in its journal), a kernel
// panic (on the console, or QEMU's silent pvpanic exit), emergency mode, a
// timeout, an interrupt, a kept or held VM, shell mode, and a VM that
// powered off on its own (QEMU exit status 0).
func (v *Verdict) infrastructureFailure() bool {
	q := v.qemu
	if q == nil || v.stopped != nil || v.held != nil || v.cfg.TestNotStarted {
		return false
	}
	if u, _ := v.unitResult(); u != nil {
		return false
	}
	if v.emergency != "" || findPanic(q.ConsoleTail) != "" {
		return false
	}
	if q.Signal != "" {
		return true
	}
	// An exit status without a message of QEMU's own is the pvpanic
	// device ending the VM on a guest panic.
	return q.Status != 0 && lastErrorLine(q.Stderr) != ""
}
