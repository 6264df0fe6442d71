package verdict

import (
	"fmt"
	"strconv"
	"strings"
)

// Event is something that happened to the VM, fed to Verdict.Handle in the
// order the harness saw it.
type Event interface{ event() }

// Notify is one sd_notify message from the guest: the NAME=VALUE
// assignments of one connection.
type Notify map[string]string

// Stopped says the harness decided to stop the VM, and why; QEMUExited
// follows once QEMU is gone.
type Stopped struct {
	Why StopReason
	// Detail completes the reason, e.g. "after 4m0s" or the signal.
	Detail string
}

// StopReason is why the harness stopped a VM.
type StopReason int

const (
	// StopTimeout is the run's own --timeout.
	StopTimeout StopReason = iota + 1
	// StopBootTimeout: the guest's service manager never talked to the host.
	StopBootTimeout
	// StopShutdownTimeout: the guest reported its exit status but did not
	// power off.
	StopShutdownTimeout
	// StopInterrupted: the runner got SIGTERM/SIGINT (Meson's timeout).
	StopInterrupted
	// StopKeepTimeUp: a failed test's kept VM reached the end of its time.
	StopKeepTimeUp
	// StopShellExited: the interactive shell of a shell-mode run ended.
	StopShellExited
	// StopTestOver: a kept-on-failure VM's test ended without a failure
	// (a skip), so there is nothing to keep it for.
	StopTestOver
	// StopVerdictReached: the test's outcome is decided and its journal
	// complete (Step.Final); the guest's shutdown would add nothing.
	StopVerdictReached
)

// QEMUExited is QEMU's end.
type QEMUExited struct {
	// Status is QEMU's exit status; meaningless when Signal is set.
	Status int
	// Signal names the signal QEMU died of ("killed"), "" if it exited.
	Signal string
	// Stderr is what QEMU printed; ConsoleTail the guest console's last lines.
	Stderr      string
	ConsoleTail []string
}

// JournalUnitResult is the test unit's result as PID 1 recorded it in the
// last boot of the test's journal, after the journal is complete. Found is
// false when the journal holds nothing about it (no journal, or the guest
// never got that far).
type JournalUnitResult struct {
	Found  bool
	Result UnitResult
}

func (Notify) event()            {}
func (Stopped) event()           {}
func (QEMUExited) event()        {}
func (JournalUnitResult) event() {}

// Step is what the harness should do after an event.
type Step struct {
	// Ready: the guest reported READY=1 for the first time.
	Ready bool
	// AwaitPowerOff: the guest sent its final exit status and is powering
	// off; bound the time it may take. Reboot cancels it.
	AwaitPowerOff bool
	// EmergencyReported: the guest fell into emergency or rescue mode
	// (PID 1 or the emergency-exit unit said so, reported once per boot).
	// The outcome is decided and the emergency-exit unit's failure action
	// powers the guest off; bound the time that may take, as for
	// AwaitPowerOff (a guest in emergency mode has been seen never to
	// finish its shutdown).
	EmergencyReported bool
	Rebooting         bool
	// Hold: the test failed while its VM is up (keep-on-failure); keep the
	// VM for inspection or stop it. The outcome is final.
	Hold *Outcome
	// StopNow: stop the VM; its test is over (see StopTestOver).
	StopNow bool
	// TestEnded: the test unit reported its result (for timings).
	TestEnded bool
	// Final: the outcome is decided; stop the VM once the journal holds
	// JournalMarker (the test's journal is then complete) rather than wait
	// for the guest's shutdown (Config.FullShutdown turns this off).
	Final         bool
	JournalMarker string
}

// Config is the part of a run that the verdict depends on.
type Config struct {
	// KeepOnFailure matches GuestSetup.KeepOnFailure.
	KeepOnFailure bool
	// TestNotStarted is shell mode: the guest boots with the test unit
	// installed but not started, so the test has no result.
	TestNotStarted bool
	// FullShutdown waits for the guest's own shutdown after the test
	// instead of stopping the VM once the outcome is decided.
	FullShutdown bool
	// Exclude are the core dumps and sanitizer reports that do not fail
	// the test (JournalFindings).
	Exclude Exclusions
}

// Verdict decides a test's outcome. Feed it every event with Handle, then
// read Outcome. The zero value is not usable; call New.
type Verdict struct {
	cfg Config

	heard, ready bool
	// Facts of the current boot; a reboot clears them.
	shutdown   string // X_SYSTEMD_SHUTDOWN of this boot, if announced
	exitStatus *int   // PID 1's final EXIT_STATUS (-1: malformed)
	unit       *UnitResult
	emergency  string // emergency or rescue target reached
	// systemState is the manager's state when the unit reported.
	systemState string

	held  *Outcome
	final *Outcome
	// finalUnit is the report the final outcome was decided from.
	finalUnit UnitResult
	stopped   *Stopped
	qemu      *QEMUExited
	journal   *JournalUnitResult
	// findings are the journal's core dumps and sanitizer reports.
	findings *JournalFindings
}

// New returns a verdict for a run configured as cfg.
func New(cfg Config) *Verdict { return &Verdict{cfg: cfg} }

// Heard reports whether the guest's service manager has talked to the
// host (the boot timeout stops counting then).
func (v *Verdict) Heard() bool { return v.heard }

// Settled reports whether what the verdict has heard already decides the
// outcome, so that notify messages still in flight when QEMU exits could
// not change it: the unit's report decided it (the early stop), or PID 1
// sent its final EXIT_STATUS after the unit's report. Until then the
// harness gives the last connections a moment after QEMU exits.
func (v *Verdict) Settled() bool {
	return v.final != nil || (v.exitStatus != nil && v.unit != nil)
}

// Handle records one event and says what the harness should do now.
func (v *Verdict) Handle(e Event) Step {
	switch e := e.(type) {
	case Notify:
		return v.notify(e)
	case Stopped:
		if v.stopped == nil {
			v.stopped = &e
		}
	case QEMUExited:
		if v.qemu == nil {
			v.qemu = &e
		}
	case JournalUnitResult:
		v.journal = &e
	case JournalFindings:
		v.findings = &e
	}
	return Step{}
}

func (v *Verdict) notify(m Notify) Step {
	var step Step
	v.heard = true
	wasEmergency := v.emergency != ""
	if m["READY"] == "1" && !v.ready {
		v.ready = true
		step.Ready = true
	}
	if target, ok := m["X_SYSTEMD_UNIT_ACTIVE"]; ok {
		if rebooting(v.shutdown) && !shutdownTargets[target] {
			// PID 1 of a new boot: what the last one said is history.
			v.newBoot()
		}
		if target == "emergency.target" || target == "rescue.target" {
			v.emergency = target
		}
	} else if _, ok := m[FieldEmergency]; ok {
		v.emergency = m[FieldEmergency]
		if v.emergency != "rescue.target" {
			v.emergency = "emergency.target"
		}
	} else if m["READY"] == "1" && rebooting(v.shutdown) {
		v.newBoot()
	}
	step.EmergencyReported = v.emergency != "" && !wasEmergency
	if r, ok := m[FieldTestResult]; ok && !rebooting(v.shutdown) {
		v.unit = &UnitResult{Result: r, ExitCode: m[FieldTestExitCode], ExitStatus: m[FieldTestExitStatus]}
		v.systemState = m[FieldSystemState]
		step.TestEnded = true
		o := v.unit.outcome()
		switch {
		case v.cfg.KeepOnFailure && v.held == nil && o.Failed():
			v.held = &o
			step.Hold = &o
		case v.cfg.KeepOnFailure && o.Skipped():
			// The failure action is off in keep mode: the VM would
			// stay up after a skip.
			step.StopNow = true
		case !v.cfg.FullShutdown && v.final == nil && v.decidedBy(*v.unit):
			v.final, v.finalUnit = &o, *v.unit
			step.Final = true
			step.JournalMarker = sanitize(m[FieldInvocation], 64)
		}
	}
	if verb, ok := m["X_SYSTEMD_SHUTDOWN"]; ok {
		v.shutdown = verb
		if rebooting(verb) {
			// The test may reboot the guest: the unit runs again in the
			// next boot, and only that boot's result counts.
			v.exitStatus, v.unit = nil, nil
			step.Rebooting = true
			return step
		}
	}
	if s, ok := m["EXIT_STATUS"]; ok && !rebooting(v.shutdown) {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 0 || n > 255 {
			// A malformed status is recorded, not ignored, so the test
			// fails visibly.
			n = -1
		}
		v.exitStatus = &n
		step.AwaitPowerOff = true
	}
	return step
}

// decidedBy reports whether the unit's report alone decides the outcome,
// so the guest's shutdown can be skipped. The report comes after the
// journal was synced. It decides when the unit ended by itself (success or
// an exit status, or never ran: a condition or assertion), the guest is
// not in emergency mode and no shutdown is under way: PID 1 skips the
// success action exactly when one is (shutdown.target active or pending,
// which is what `systemctl is-system-running` reports as "stopping"), and
// a shutdown may be a reboot after which the test runs again. A unit
// killed by a signal waits for the end: a reboot or an isolate stops a
// test that way.
func (v *Verdict) decidedBy(u UnitResult) bool {
	if v.emergency != "" || v.shutdown != "" {
		return false
	}
	switch u.Result {
	case ResultCondition, ResultAssert, ResultNotStarted:
		return true
	case "success", "exit-code":
		if u.ExitCode != "exited" {
			return false
		}
	default:
		return false
	}
	switch v.systemState {
	case "initializing", "starting", "running", "degraded":
		return true
	}
	return false
}

func (v *Verdict) newBoot() {
	v.shutdown, v.exitStatus, v.unit, v.emergency, v.systemState = "", nil, nil, "", ""
}

// shutdownTargets are reached while a guest shuts down. Each notify
// message is its own connection, so one of them can arrive after the final
// shutdown message it preceded; it does not mean a new boot.
var shutdownTargets = map[string]bool{
	"shutdown.target": true, "umount.target": true, "final.target": true,
	"reboot.target": true, "poweroff.target": true, "halt.target": true,
	"kexec.target": true, "exit.target": true, "soft-reboot.target": true,
}

// rebooting reports whether a shutdown of this kind boots the guest again.
func rebooting(shutdown string) bool {
	switch shutdown {
	case "reboot", "kexec", "soft-reboot":
		return true
	}
	return false
}

// Outcome decides the test's outcome from everything handled so far, and
// whether the run may be retried (Outcome.Retry, see retry.go). It is
// meant to be read once QEMU has exited (and, if there is one, the journal
// is complete), but is defined at any point.
func (v *Verdict) Outcome() Outcome {
	o := v.withFindings(v.outcome())
	o.Retry = v.infrastructureFailure()
	return o
}

// outcome is the outcome before the journal's findings (findings.go).
func (v *Verdict) outcome() Outcome {
	if v.held != nil {
		return *v.held
	}
	if v.final != nil {
		if v.journal != nil && v.journal.Found && disagree(v.finalUnit, v.journal.Result) {
			return fail(fmt.Sprintf("the test unit's result over vsock (%s) and in its journal (%s) disagree", &v.finalUnit, &v.journal.Result))
		}
		return *v.final
	}
	if v.qemu != nil && v.qemu.Signal == "" && v.stopped == nil && v.unit == nil {
		// A panic before the guest's service manager spoke (the project's
		// own PID 1 crashing, say) is the test's failure, not QEMU's.
		if out, ok := v.panicked(); ok {
			return out
		}
	}
	if o, ok := v.harnessProblem(); ok {
		return o
	}
	if v.cfg.TestNotStarted {
		return skip("shell mode: the test unit was installed but not run")
	}
	if v.emergency != "" {
		return fail("guest fell into emergency mode (" + v.emergency + " reached)")
	}
	unit, source := v.unitResult()
	if unit != nil {
		if v.journal != nil && v.journal.Found && v.unit != nil && disagree(*v.unit, v.journal.Result) {
			return fail(fmt.Sprintf("the test unit's result over vsock (%s) and in its journal (%s) disagree", v.unit, &v.journal.Result))
		}
		return v.fromUnitResult(*unit, source)
	}
	return v.withoutUnitResult()
}

// harnessProblem is a run the harness could not carry out: QEMU failing
// before the guest got anywhere, or dying of a signal nobody in the harness
// sent before the test had a result.
func (v *Verdict) harnessProblem() (Outcome, bool) {
	q := v.qemu
	if q == nil || v.stopped != nil {
		return Outcome{}, false
	}
	if q.Signal != "" && v.unit == nil {
		// QEMU crashed or something on the host (the OOM killer, a user)
		// killed it: not the test's doing.
		reason := "QEMU was killed by signal " + q.Signal
		if msg := lastErrorLine(q.Stderr); msg != "" {
			reason += ": " + msg
		}
		return harnessErr(reason), true
	}
	if q.Signal == "" && q.Status != 0 && !v.heard {
		msg := lastErrorLine(q.Stderr)
		if msg == "" {
			msg = fmt.Sprintf("exit status %d", q.Status)
		}
		return harnessErr("QEMU failed: " + msg), true
	}
	return Outcome{}, false
}

// unitResult is the test unit's result from the guest's own report or,
// when that never arrived, from its journal.
func (v *Verdict) unitResult() (*UnitResult, string) {
	if v.unit != nil {
		return v.unit, "report"
	}
	if v.journal != nil && v.journal.Found {
		return &v.journal.Result, "journal"
	}
	return nil, ""
}

func (v *Verdict) fromUnitResult(u UnitResult, source string) Outcome {
	o := u.outcome()
	if !o.Passed() {
		// The test's own failure or skip is the first cause of whatever
		// followed (a timeout while powering off, a panic at shutdown).
		return o
	}
	if v.exitStatus != nil && *v.exitStatus == GuestStatusPass {
		if v.stopped != nil && v.stopped.Why == StopShutdownTimeout {
			return fail("the test passed, but the guest did not power off after reporting it")
		}
		return pass()
	}
	if v.stopped != nil {
		return v.stopReason()
	}
	if out, ok := v.panicked(); ok {
		return out
	}
	// The unit succeeded, but what ended the VM was not its success action.
	return fail("VM powered off before the test finished: the test unit succeeded, but its success action did not run (" + v.exitStatusText() + ")")
}

func (v *Verdict) withoutUnitResult() Outcome {
	if v.stopped != nil {
		return v.stopReason()
	}
	if out, ok := v.panicked(); ok {
		return out
	}
	if q := v.qemu; q != nil && q.Signal == "" && q.Status != 0 {
		return fail(fmt.Sprintf("QEMU stopped with an error (exit status %d): %s", q.Status, lastErrorLine(q.Stderr)))
	}
	switch {
	case v.exitStatus == nil || *v.exitStatus == 0:
		return fail("VM powered off before the test finished (" + v.exitStatusText() + ")")
	case *v.exitStatus == EmergencyExitStatus:
		return fail("guest fell into emergency mode (the emergency-exit unit ran)")
	default:
		// PID 1 forwards the unit's status, but only the unit's own
		// result tells a pass from a failure that exited 123.
		return fail("the test unit's own result never reached the host (PID 1 reported " + v.exitStatusText() + "; no report from the unit and none in its journal)")
	}
}

func (v *Verdict) exitStatusText() string {
	switch {
	case v.exitStatus == nil:
		return "no EXIT_STATUS"
	case *v.exitStatus < 0:
		return "EXIT_STATUS=malformed"
	}
	return "EXIT_STATUS=" + strconv.Itoa(*v.exitStatus)
}

// panicked reports a guest kernel panic: seen on the console, or QEMU
// exiting with a failure after the guest booted without saying why (QEMU
// prints nothing on the pvpanic event, and the console may not have
// flushed the panic message).
func (v *Verdict) panicked() (Outcome, bool) {
	q := v.qemu
	if q == nil {
		return Outcome{}, false
	}
	if line := findPanic(q.ConsoleTail); line != "" {
		return fail("guest kernel panicked: " + line), true
	}
	if q.Signal == "" && q.Status != 0 && v.heard && lastErrorLine(q.Stderr) == "" {
		return fail(fmt.Sprintf("guest kernel panicked (QEMU exited on the pvpanic event with status %d)", q.Status)), true
	}
	return Outcome{}, false
}

func (v *Verdict) stopReason() Outcome {
	s := v.stopped
	switch s.Why {
	case StopTimeout:
		return fail("test timed out " + s.Detail)
	case StopBootTimeout:
		return fail("boot timeout: " + s.Detail)
	case StopShutdownTimeout:
		return fail("guest reported its exit status but did not power off")
	case StopInterrupted:
		return fail("interrupted: " + s.Detail)
	case StopShellExited:
		return skip("shell mode: the test unit was installed but not run")
	case StopKeepTimeUp, StopTestOver, StopVerdictReached:
		// Only after a Hold or a skip; the unit's result decided.
		return fail("VM stopped by the harness")
	}
	return fail("VM stopped by the harness")
}

// disagree reports whether two accounts of the unit's result contradict
// each other. The journal may lack the final "Failed with result" line
// (logged after ExecStopPost=, close to power-off), so only what both have
// is compared.
func disagree(report, journal UnitResult) bool {
	if report.Succeeded() != journal.Succeeded() && journal.Result != "" {
		return true
	}
	if journal.ExitCode == "" || report.ExitCode == "" {
		return false
	}
	if journal.ExitCode != report.ExitCode {
		return true
	}
	// For a signal the journal has its number and $EXIT_STATUS its name.
	return journal.ExitCode == "exited" && journal.ExitStatus != report.ExitStatus
}

func findPanic(lines []string) string {
	for _, l := range lines {
		if strings.Contains(l, "Kernel panic") || strings.Contains(l, "kernel BUG at") {
			return strings.TrimSpace(l)
		}
	}
	return ""
}

// lastErrorLine returns QEMU's last output line that is not a warning
// (QEMU warns at start-up about CPU features TCG lacks, for example).
func lastErrorLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if l := strings.TrimSpace(lines[i]); l != "" && !strings.Contains(l, "warning:") {
			return l
		}
	}
	return ""
}
