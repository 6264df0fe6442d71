package verdict

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Message sequences as systemd 257 sends them: PID 1's boot progress, the
// test unit's ExecStopPost report, and systemd-shutdown's final message.
var (
	booted   = Notify{"X_SYSTEMD_UNIT_ACTIVE": "basic.target"}
	ready    = Notify{"READY": "1", "STATUS": "Ready."}
	poweroff = func(status string) Notify {
		return Notify{"EXIT_STATUS": status, "X_SYSTEMD_SHUTDOWN": "poweroff"}
	}
	reboot = func(status string) Notify {
		return Notify{"EXIT_STATUS": status, "X_SYSTEMD_SHUTDOWN": "reboot"}
	}
	// report is the test unit's report without the manager's state (as a
	// guest of an older vmharness sends it), reportIn with it.
	report = func(result, code, status string) Notify {
		return Notify{FieldTestResult: result, FieldTestExitCode: code, FieldTestExitStatus: status}
	}
	reportIn = func(state, result, code, status string) Notify {
		n := report(result, code, status)
		n[FieldSystemState] = state
		return n
	}
	weStopped    = Stopped{Why: StopVerdictReached}
	qemuOK       = QEMUExited{}
	qemuPanicked = QEMUExited{Status: 1}
)

func TestOutcome(t *testing.T) {
	tests := []struct {
		name     string
		cfg      Config
		events   []Event
		wantCode int
		// wantReason must be a substring of the reason ("" for a pass).
		wantReason string
	}{
		{
			name:     "pass: the unit succeeded and its success action fired",
			events:   []Event{booted, report("success", "exited", "0"), poweroff("123"), qemuOK},
			wantCode: ExitPass,
		},
		{
			name:     "pass decided by the report: the guest's shutdown is skipped",
			events:   []Event{booted, reportIn("starting", "success", "exited", "0"), weStopped, QEMUExited{Signal: "terminated"}},
			wantCode: ExitPass,
		},
		{
			name:       "failure decided by the report",
			events:     []Event{booted, reportIn("running", "exit-code", "exited", "123"), weStopped, QEMUExited{Signal: "terminated"}},
			wantCode:   ExitFail,
			wantReason: "test exited with status 123",
		},
		{
			name:       "skip decided by the report",
			events:     []Event{booted, reportIn("degraded", "exit-code", "exited", "77"), weStopped, QEMUExited{Signal: "terminated"}},
			wantCode:   ExitSkip,
			wantReason: "exit status 77",
		},
		{
			name:       "a success while a shutdown is under way is not a pass (PID 1 skips the success action)",
			events:     []Event{booted, reportIn("stopping", "success", "exited", "0"), poweroff("0"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "VM powered off before the test finished",
		},
		{
			name: "a unit killed while the guest isolates emergency.target waits for the end",
			events: []Event{booted, reportIn("starting", "signal", "killed", "TERM"),
				Notify{FieldEmergency: "emergency.target"}, poweroff("124"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "guest fell into emergency mode",
		},
		{
			name: "a test that reboots: the first boot's report comes while stopping",
			events: []Event{booted, reportIn("stopping", "success", "exited", "0"), reboot("0"),
				booted, reportIn("running", "exit-code", "exited", "4"), weStopped, QEMUExited{Signal: "terminated"}},
			wantCode:   ExitFail,
			wantReason: "test exited with status 4",
		},
		{
			name: "a decided result and a contradicting journal",
			events: []Event{booted, reportIn("running", "success", "exited", "0"), weStopped, QEMUExited{Signal: "terminated"},
				JournalUnitResult{Found: true, Result: UnitResult{Result: "exit-code", ExitCode: "exited", ExitStatus: "1"}}},
			wantCode:   ExitFail,
			wantReason: "disagree",
		},
		{
			name:       "--full-shutdown: the report does not decide; the success action must fire",
			cfg:        Config{FullShutdown: true},
			events:     []Event{booted, reportIn("running", "success", "exited", "0"), poweroff("0"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "VM powered off before the test finished",
		},
		{
			name:     "pass: the report arrives after EXIT_STATUS (separate connections)",
			events:   []Event{booted, poweroff("123"), report("success", "exited", "0"), qemuOK},
			wantCode: ExitPass,
		},
		{
			name:       "a unit that fails with status 123 is a failure, not a pass",
			events:     []Event{booted, report("exit-code", "exited", "123"), poweroff("123"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "test exited with status 123",
		},
		{
			name:       "a unit that exits 124 is not emergency mode",
			events:     []Event{booted, report("exit-code", "exited", "124"), poweroff("124"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "test exited with status 124",
		},
		{
			name:       "killed by SIGKILL",
			events:     []Event{booted, report("signal", "killed", "KILL"), poweroff("0"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "test killed by signal SIGKILL",
		},
		{
			name:       "dumped core",
			events:     []Event{booted, report("core-dump", "dumped", "SEGV"), poweroff("0"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "test killed by signal SIGSEGV (core dumped)",
		},
		{
			name:       "the unit's own start timeout",
			events:     []Event{booted, report("timeout", "killed", "TERM"), poweroff("1"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "test timed out",
		},
		{
			name:       "other unit results are named",
			events:     []Event{booted, report("oom-kill", "killed", "KILL"), poweroff("1"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "test killed by signal SIGKILL",
		},
		{
			name:       "a result without a process",
			events:     []Event{booted, report("resources", "", ""), poweroff("1"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "unit ended with result resources",
		},
		{
			name:       "skip: the unit itself exited 77",
			events:     []Event{booted, report("exit-code", "exited", "77"), poweroff("77"), qemuOK},
			wantCode:   ExitSkip,
			wantReason: "exit status 77",
		},
		{
			name:       "EXIT_STATUS=77 from elsewhere is not a skip",
			events:     []Event{booted, report("exit-code", "exited", "3"), poweroff("77"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "test exited with status 3",
		},
		{
			name:       "skip: a condition of the unit failed",
			events:     []Event{booted, report(ResultCondition, "", ""), poweroff("77"), qemuOK},
			wantCode:   ExitSkip,
			wantReason: "condition",
		},
		{
			name:       "a unit the test requires failed, so it never started",
			events:     []Event{booted, report(ResultNotStarted, "", ""), poweroff("77"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "test did not run: its start job failed before the unit started",
		},
		{
			name:       "an assertion of the unit failed",
			events:     []Event{booted, report(ResultAssert, "", ""), poweroff("77"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "assertion",
		},
		{
			name:       "emergency mode at boot",
			events:     []Event{booted, Notify{"X_SYSTEMD_UNIT_ACTIVE": "emergency.target"}, poweroff("124"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "guest fell into emergency mode",
		},
		{
			name: "the test isolates emergency.target: its unit is stopped cleanly, still a failure",
			events: []Event{booted, report("success", "killed", "TERM"),
				Notify{"X_SYSTEMD_UNIT_ACTIVE": "emergency.target"}, poweroff("124"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "guest fell into emergency mode",
		},
		{
			name: "the emergency-exit unit's report wins over the test's SIGTERM from the isolate",
			events: []Event{booted, report("signal", "killed", "TERM"),
				Notify{FieldEmergency: "emergency.target"}, poweroff("124"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "guest fell into emergency mode (emergency.target reached)",
		},
		{
			name:       "a guest-supplied target name is not echoed",
			events:     []Event{booted, Notify{FieldEmergency: "\x1b[2Jevil"}, poweroff("124"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "guest fell into emergency mode (emergency.target reached)",
		},
		{
			name:       "QEMU crashed with a message",
			events:     []Event{booted, QEMUExited{Signal: "aborted", Stderr: "qemu-system-x86_64: ../hw/virtio/virtio.c:123: assertion failed\n"}},
			wantCode:   ExitHarnessError,
			wantReason: "QEMU was killed by signal aborted: qemu-system-x86_64: ../hw/virtio/virtio.c:123: assertion failed",
		},
		{
			name:       "a start-up warning is not QEMU's error: pvpanic",
			events:     []Event{booted, QEMUExited{Status: 1, Stderr: "qemu-system-x86_64: warning: TCG doesn't support requested feature: CPUID.01H:ECX.vmx [bit 5]\n"}},
			wantCode:   ExitFail,
			wantReason: "guest kernel panicked (QEMU exited on the pvpanic event",
		},
		{
			name:       "QEMU failed before the guest spoke, a warning last",
			events:     []Event{QEMUExited{Status: 1, Stderr: "qemu-system-x86_64: -machine q35: bad option\nqemu-system-x86_64: warning: late warning\n"}},
			wantCode:   ExitHarnessError,
			wantReason: "QEMU failed: qemu-system-x86_64: -machine q35: bad option",
		},
		{
			name:       "rescue mode counts as emergency mode",
			events:     []Event{booted, Notify{"X_SYSTEMD_UNIT_ACTIVE": "rescue.target"}, poweroff("124"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "guest fell into emergency mode (rescue.target",
		},
		{
			name:       "124 without any report is the emergency-exit unit",
			events:     []Event{booted, poweroff("124"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "guest fell into emergency mode",
		},
		{
			name:       "powered off without the success action (systemctl poweroff in the test)",
			events:     []Event{booted, report("success", "exited", "0"), poweroff("0"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "VM powered off before the test finished",
		},
		{
			name:       "powered off before the unit ended",
			events:     []Event{booted, poweroff("0"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "VM powered off before the test finished",
		},
		{
			name:       "no EXIT_STATUS at all",
			events:     []Event{booted, qemuOK},
			wantCode:   ExitFail,
			wantReason: "VM powered off before the test finished (no EXIT_STATUS)",
		},
		{
			name:       "EXIT_STATUS=123 alone is not a pass",
			events:     []Event{booted, poweroff("123"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "result never reached the host (PID 1 reported EXIT_STATUS=123",
		},
		{
			name:     "EXIT_STATUS=123 and the journal's record of success is a pass",
			events:   []Event{booted, poweroff("123"), qemuOK, JournalUnitResult{Found: true, Result: UnitResult{Result: "success", ExitCode: "exited", ExitStatus: "0"}}},
			wantCode: ExitPass,
		},
		{
			name:       "EXIT_STATUS=123 and the journal's record of a failure",
			events:     []Event{booted, poweroff("123"), qemuOK, JournalUnitResult{Found: true, Result: UnitResult{Result: "exit-code", ExitCode: "exited", ExitStatus: "123"}}},
			wantCode:   ExitFail,
			wantReason: "test exited with status 123",
		},
		{
			name: "report and journal disagree",
			events: []Event{booted, report("success", "exited", "0"), poweroff("123"), qemuOK,
				JournalUnitResult{Found: true, Result: UnitResult{Result: "exit-code", ExitCode: "exited", ExitStatus: "1"}}},
			wantCode:   ExitFail,
			wantReason: "disagree",
		},
		{
			name: "a journal without the final result line agrees on the process exit",
			events: []Event{booted, report("signal", "killed", "KILL"), poweroff("0"), qemuOK,
				JournalUnitResult{Found: true, Result: UnitResult{ExitCode: "killed", ExitStatus: "9"}}},
			wantCode:   ExitFail,
			wantReason: "test killed by signal SIGKILL",
		},
		{
			name:       "malformed EXIT_STATUS",
			events:     []Event{booted, poweroff("banana"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "EXIT_STATUS=malformed",
		},
		{
			name: "a reboot inside the test: only the last boot counts",
			events: []Event{booted, report("success", "killed", "TERM"), reboot("123"),
				booted, report("exit-code", "exited", "2"), poweroff("2"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "test exited with status 2",
		},
		{
			name: "a reboot, then a pass",
			events: []Event{booted, report("exit-code", "exited", "1"), reboot("1"),
				booted, ready, report("success", "exited", "0"), poweroff("123"), qemuOK},
			wantCode: ExitPass,
		},
		{
			name:     "a boot-progress message overtaken by the final one is no new boot",
			events:   []Event{report("success", "exited", "0"), poweroff("123"), booted, qemuOK},
			wantCode: ExitPass,
		},
		{
			name: "a shutdown target reported after the reboot message is still the old boot",
			events: []Event{booted, report("exit-code", "exited", "1"), reboot("1"),
				Notify{"X_SYSTEMD_UNIT_ACTIVE": "final.target"}, report("success", "exited", "0"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "VM powered off before the test finished",
		},
		{
			name:       "rebooting and then gone: no result",
			events:     []Event{booted, report("success", "exited", "0"), reboot("123"), qemuOK},
			wantCode:   ExitFail,
			wantReason: "VM powered off before the test finished",
		},
		{
			name:       "kernel panic on the console",
			events:     []Event{booted, QEMUExited{Status: 1, ConsoleTail: []string{"[ 9.1] Kernel panic - not syncing: sysrq triggered crash"}}},
			wantCode:   ExitFail,
			wantReason: "guest kernel panicked: [ 9.1] Kernel panic - not syncing",
		},
		{
			name:       "pvpanic without a console line",
			events:     []Event{booted, qemuPanicked},
			wantCode:   ExitFail,
			wantReason: "guest kernel panicked (QEMU exited on the pvpanic event",
		},
		{
			name:       "a panic before the guest spoke (the project's PID 1 crashed) is the test's failure",
			events:     []Event{QEMUExited{Status: 1, ConsoleTail: []string{"Kernel panic - not syncing: Attempted to kill init!"}}},
			wantCode:   ExitFail,
			wantReason: "guest kernel panicked",
		},
		{
			name:       "QEMU errors out after the guest spoke",
			events:     []Event{booted, QEMUExited{Status: 1, Stderr: "qemu: warning: x\nqemu-system-x86_64: vhost-user: broken"}},
			wantCode:   ExitFail,
			wantReason: "QEMU stopped with an error (exit status 1): qemu-system-x86_64: vhost-user: broken",
		},
		{
			name:       "QEMU fails before the guest spoke: harness error",
			events:     []Event{QEMUExited{Status: 1, Stderr: "qemu-system-x86_64: -device foo: not found"}},
			wantCode:   ExitHarnessError,
			wantReason: "QEMU failed: qemu-system-x86_64: -device foo: not found",
		},
		{
			name:       "QEMU killed by a signal nobody in the harness sent: harness error",
			events:     []Event{booted, QEMUExited{Signal: "killed"}},
			wantCode:   ExitHarnessError,
			wantReason: "QEMU was killed by signal killed",
		},
		{
			name:       "QEMU killed after the test reported its failure: the test's failure",
			events:     []Event{booted, report("exit-code", "exited", "3"), QEMUExited{Signal: "killed"}},
			wantCode:   ExitFail,
			wantReason: "test exited with status 3",
		},
		{
			name:       "the run's timeout",
			events:     []Event{booted, Stopped{Why: StopTimeout, Detail: "after 1m0s"}, QEMUExited{Signal: "terminated"}},
			wantCode:   ExitFail,
			wantReason: "test timed out after 1m0s",
		},
		{
			name:       "a timeout after the test failed keeps the test's failure",
			events:     []Event{booted, report("exit-code", "exited", "4"), Stopped{Why: StopTimeout, Detail: "after 1m0s"}, QEMUExited{Signal: "terminated"}},
			wantCode:   ExitFail,
			wantReason: "test exited with status 4",
		},
		{
			name:       "boot timeout",
			events:     []Event{Stopped{Why: StopBootTimeout, Detail: "guest did not boot within 2s"}, QEMUExited{Signal: "killed"}},
			wantCode:   ExitFail,
			wantReason: "boot timeout: guest did not boot within 2s",
		},
		{
			name:       "did not power off after reporting",
			events:     []Event{booted, poweroff("1"), Stopped{Why: StopShutdownTimeout}, QEMUExited{Signal: "terminated"}},
			wantCode:   ExitFail,
			wantReason: "did not power off",
		},
		{
			name:       "passed but did not power off",
			events:     []Event{booted, report("success", "exited", "0"), poweroff("123"), Stopped{Why: StopShutdownTimeout}, QEMUExited{Signal: "terminated"}},
			wantCode:   ExitFail,
			wantReason: "did not power off",
		},
		{
			name:       "interrupted (SIGTERM from Meson)",
			events:     []Event{booted, Stopped{Why: StopInterrupted, Detail: "terminated"}, QEMUExited{Signal: "terminated"}},
			wantCode:   ExitFail,
			wantReason: "interrupted: terminated",
		},
		{
			name:       "shell mode never passes, whatever the shell's exit status",
			cfg:        Config{TestNotStarted: true},
			events:     []Event{booted, ready, Stopped{Why: StopShellExited}, QEMUExited{Signal: "terminated"}},
			wantCode:   ExitSkip,
			wantReason: "shell mode",
		},
		{
			name:       "shell mode whose guest powered off",
			cfg:        Config{TestNotStarted: true},
			events:     []Event{booted, ready, poweroff("0"), qemuOK},
			wantCode:   ExitSkip,
			wantReason: "shell mode",
		},
		{
			name:       "shell mode with a QEMU that cannot start is a harness error",
			cfg:        Config{TestNotStarted: true},
			events:     []Event{QEMUExited{Status: 1, Stderr: "qemu: bad"}},
			wantCode:   ExitHarnessError,
			wantReason: "QEMU failed",
		},
		{
			name:       "keep mode: a held failure stays the outcome when the kept VM is stopped",
			cfg:        Config{KeepOnFailure: true},
			events:     []Event{booted, report("exit-code", "exited", "3"), Stopped{Why: StopKeepTimeUp}, QEMUExited{Signal: "terminated"}},
			wantCode:   ExitFail,
			wantReason: "test exited with status 3",
		},
		{
			name:       "keep mode: a skip stops the VM and stays a skip",
			cfg:        Config{KeepOnFailure: true},
			events:     []Event{booted, report("exit-code", "exited", "77"), Stopped{Why: StopTestOver}, QEMUExited{Signal: "terminated"}},
			wantCode:   ExitSkip,
			wantReason: "exit status 77",
		},
		{
			name:     "keep mode: a pass",
			cfg:      Config{KeepOnFailure: true},
			events:   []Event{booted, report("success", "exited", "0"), poweroff("123"), qemuOK},
			wantCode: ExitPass,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := New(tt.cfg)
			for _, e := range tt.events {
				v.Handle(e)
			}
			got := v.Outcome()
			assert.Equal(t, tt.wantCode, got.ExitCode, "reason: %s", got.Reason)
			if tt.wantReason == "" {
				assert.Empty(t, got.Reason)
			} else {
				assert.Contains(t, got.Reason, tt.wantReason)
			}
			assert.NotContains(t, got.Reason, "\n")
		})
	}
}

// TestOnlyTheUnitsSuccessPasses feeds every combination of what the guest
// can report and how the VM can end, and checks that a pass always comes
// with the unit's own success and the success action's status.
func TestOnlyTheUnitsSuccessPasses(t *testing.T) {
	reports := []*Notify{nil}
	for _, state := range []string{"", "running", "stopping"} {
		for _, r := range []Notify{
			reportIn(state, "success", "exited", "0"), reportIn(state, "exit-code", "exited", "123"),
			reportIn(state, "exit-code", "exited", "77"), reportIn(state, "signal", "killed", "KILL"),
			reportIn(state, ResultCondition, "", ""), reportIn(state, "timeout", "killed", "TERM"),
			reportIn(state, "success", "killed", "TERM"),
		} {
			reports = append(reports, &r)
		}
	}
	statuses := []*Notify{nil}
	for _, s := range []string{"0", "1", "77", "123", "124", "x"} {
		n := poweroff(s)
		statuses = append(statuses, &n)
		r := reboot(s)
		statuses = append(statuses, &r)
	}
	ends := []Event{qemuOK, qemuPanicked, QEMUExited{Signal: "killed"},
		Stopped{Why: StopTimeout}, Stopped{Why: StopInterrupted}, weStopped}
	journals := []*JournalUnitResult{nil,
		{Found: true, Result: UnitResult{Result: "success", ExitCode: "exited", ExitStatus: "0"}},
		{Found: true, Result: UnitResult{Result: "exit-code", ExitCode: "exited", ExitStatus: "123"}}}
	for _, keep := range []bool{false, true} {
		for _, r := range reports {
			for _, s := range statuses {
				for _, end := range ends {
					for _, j := range journals {
						v := New(Config{KeepOnFailure: keep})
						v.Handle(booted)
						if r != nil {
							v.Handle(*r)
						}
						if s != nil {
							v.Handle(*s)
						}
						v.Handle(end)
						if j != nil {
							v.Handle(*j)
						}
						if !v.Outcome().Passed() {
							continue
						}
						unitOK := r != nil && (*r)[FieldTestResult] == "success" ||
							r == nil && j != nil && j.Result.Result == "success"
						require.True(t, unitOK, "pass without the unit's success: report %v journal %v", r, j)
						// The success action fired, or the unit reported
						// success while no shutdown was under way, so that
						// PID 1 was bound to fire it.
						decided := r != nil && (*r)[FieldTestResult] == "success" && (*r)[FieldTestExitCode] == "exited" && (*r)[FieldSystemState] == "running"
						if !decided {
							require.NotNil(t, s, "pass without EXIT_STATUS: report %v end %#v journal %v keep %v", r, end, j, keep)
							require.Equal(t, "123", (*s)["EXIT_STATUS"])
							require.Equal(t, "poweroff", (*s)["X_SYSTEMD_SHUTDOWN"])
						}
					}
				}
			}
		}
	}
}

func TestSteps(t *testing.T) {
	v := New(Config{KeepOnFailure: true})
	assert.False(t, v.Heard())
	assert.Equal(t, Step{}, v.Handle(booted))
	assert.True(t, v.Heard())
	assert.Equal(t, Step{Ready: true}, v.Handle(ready))
	assert.Equal(t, Step{}, v.Handle(ready), "READY is reported once")
	assert.Equal(t, Step{Rebooting: true}, v.Handle(reboot("0")))
	assert.Equal(t, Step{}, v.Handle(booted))
	step := v.Handle(report("exit-code", "exited", "5"))
	assert.True(t, step.TestEnded)
	require.NotNil(t, step.Hold)
	assert.Equal(t, "test exited with status 5", step.Hold.Reason)
	assert.Equal(t, Step{TestEnded: true}, v.Handle(report("exit-code", "exited", "6")), "a test is held once")
	assert.Equal(t, Step{AwaitPowerOff: true}, v.Handle(poweroff("5")))

	v = New(Config{KeepOnFailure: true})
	assert.Equal(t, Step{StopNow: true, TestEnded: true}, v.Handle(report("exit-code", "exited", "77")))

	v = New(Config{})
	assert.Equal(t, Step{TestEnded: true}, v.Handle(report("exit-code", "exited", "5")), "without the manager's state a failure ends the VM by itself")

	v = New(Config{})
	decided := reportIn("running", "exit-code", "exited", "5")
	decided[FieldInvocation] = "0123abcd\x1b"
	assert.Equal(t, Step{TestEnded: true, Final: true, JournalMarker: "0123abcd?"}, v.Handle(decided), "the marker is sanitized")

	v = New(Config{})
	assert.Equal(t, Step{EmergencyReported: true}, v.Handle(Notify{"X_SYSTEMD_UNIT_ACTIVE": "emergency.target"}))
	assert.Equal(t, Step{}, v.Handle(Notify{FieldEmergency: "emergency.target"}), "emergency mode is reported once")
	v = New(Config{})
	assert.Equal(t, Step{EmergencyReported: true}, v.Handle(Notify{FieldEmergency: "rescue.target"}))
}

// TestSettled: once the verdict is settled, later messages cannot change
// the outcome, which is what lets the harness skip its grace period for
// messages in flight when QEMU exits.
func TestSettled(t *testing.T) {
	tests := []struct {
		name   string
		cfg    Config
		events []Event
		want   bool
	}{
		{"nothing heard", Config{}, nil, false},
		{"booted only", Config{}, []Event{booted, ready}, false},
		{"report decided it (early stop)", Config{}, []Event{booted, reportIn("running", "success", "exited", "0")}, true},
		{"report without the manager's state: PID 1's EXIT_STATUS still to come", Config{}, []Event{booted, report("success", "exited", "0")}, false},
		{"report and then EXIT_STATUS", Config{}, []Event{booted, report("success", "exited", "0"), poweroff("0")}, true},
		{"EXIT_STATUS without a report", Config{}, []Event{booted, poweroff("1")}, false},
		{"full shutdown: the report decides nothing yet", Config{FullShutdown: true}, []Event{booted, reportIn("running", "success", "exited", "0")}, false},
		{"full shutdown, EXIT_STATUS in", Config{FullShutdown: true}, []Event{booted, reportIn("running", "success", "exited", "0"), poweroff("0")}, true},
		{"a reboot: the next boot's result counts", Config{}, []Event{booted, report("success", "exited", "0"), reboot("0")}, false},
		{"killed by a signal: waits for the end", Config{}, []Event{booted, reportIn("running", "signal", "killed", "TERM")}, false},
		{"emergency mode", Config{}, []Event{booted, Notify{"X_SYSTEMD_UNIT_ACTIVE": "emergency.target"}, reportIn("running", "success", "exited", "0")}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := New(tt.cfg)
			for _, e := range tt.events {
				v.Handle(e)
			}
			assert.Equal(t, tt.want, v.Settled())
		})
	}
}
