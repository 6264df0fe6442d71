package verdict

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestRetry(t *testing.T) {
	killed := QEMUExited{Signal: "killed"}
	tests := []struct {
		name      string
		cfg       Config
		events    []Event
		wantRetry bool
		wantCode  int
	}{
		// QEMU itself died before the test had a result: retried.
		{"QEMU SIGKILLed mid-boot, guest silent", Config{}, []Event{killed}, true, ExitHarnessError},
		{"QEMU SIGKILLed after the guest spoke", Config{}, []Event{booted, ready, killed}, true, ExitHarnessError},
		{"QEMU aborted (a crash)", Config{}, []Event{booted, QEMUExited{Signal: "aborted", Stderr: "qemu-system-x86_64: ../hw/virtio/virtio.c:123: assertion failed"}}, true, ExitHarnessError},
		{"vhost-user device failed after boot", Config{}, []Event{booted, QEMUExited{Status: 1, Stderr: "qemu-system-x86_64: Failed to read msg header. Read 0 instead of 12. Original request 11.\nqemu-system-x86_64: vhost_set_vring_call failed"}}, true, ExitFail},
		{"QEMU failed before the guest spoke", Config{}, []Event{QEMUExited{Status: 1, Stderr: "qemu-system-x86_64: -chardev socket,id=vs: Failed to connect"}}, true, ExitHarnessError},

		// The test spoke, or the harness ended the VM: never retried.
		{"pass", Config{}, []Event{booted, report("success", "exited", "0"), poweroff("123"), qemuOK}, false, ExitPass},
		{"test failed", Config{}, []Event{booted, report("exit-code", "exited", "3"), poweroff("3"), qemuOK}, false, ExitFail},
		{"skip", Config{}, []Event{booted, report("exit-code", "exited", "77"), poweroff("77"), qemuOK}, false, ExitSkip},
		{"QEMU killed after the test reported its failure", Config{}, []Event{booted, report("exit-code", "exited", "3"), killed}, false, ExitFail},
		{"QEMU killed after the journal recorded the result", Config{}, []Event{booted, killed, JournalUnitResult{Found: true, Result: UnitResult{Result: "success", ExitCode: "exited", ExitStatus: "0"}}}, false, ExitHarnessError},
		{"the test's own timeout", Config{}, []Event{booted, Stopped{Why: StopTimeout, Detail: "after 1m0s"}, QEMUExited{Signal: "terminated"}}, false, ExitFail},
		{"boot timeout", Config{}, []Event{Stopped{Why: StopBootTimeout, Detail: "guest did not boot within 2s"}, killed}, false, ExitFail},
		{"interrupted (Meson's timeout)", Config{}, []Event{booted, Stopped{Why: StopInterrupted, Detail: "terminated"}, QEMUExited{Signal: "terminated"}}, false, ExitFail},
		{"kernel panic through pvpanic", Config{}, []Event{booted, qemuPanicked}, false, ExitFail},
		{"kernel panic on the console", Config{}, []Event{booted, QEMUExited{Status: 1, ConsoleTail: []string{"Kernel panic - not syncing: sysrq triggered crash"}}}, false, ExitFail},
		{"panic on the console, then QEMU killed", Config{}, []Event{booted, QEMUExited{Signal: "killed", ConsoleTail: []string{"Kernel panic - not syncing: Attempted to kill init!"}}}, false, ExitHarnessError},
		{"emergency mode, then QEMU killed", Config{}, []Event{booted, Notify{"X_SYSTEMD_UNIT_ACTIVE": "emergency.target"}, killed}, false, ExitHarnessError},
		{"powered off without the success action", Config{}, []Event{booted, poweroff("0"), qemuOK}, false, ExitFail},
		{"held for keep-failed-vm", Config{KeepOnFailure: true}, []Event{booted, report("exit-code", "exited", "3"), Stopped{Why: StopKeepTimeUp}, QEMUExited{Signal: "terminated"}}, false, ExitFail},
		{"shell mode", Config{TestNotStarted: true}, []Event{booted, killed}, false, ExitHarnessError},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := New(tt.cfg)
			for _, e := range tt.events {
				v.Handle(e)
			}
			got := v.Outcome()
			assert.Equal(t, tt.wantRetry, got.Retry, "reason: %s", got.Reason)
			assert.Equal(t, tt.wantCode, got.ExitCode, "reason: %s", got.Reason)
		})
	}
}

// TestRetryOnlyWithoutAResult: across every combination of what the guest
// reports and how the VM ends, a retryable outcome is never a pass or a
// skip, and never follows a result of the test unit in the last boot.
func TestRetryOnlyWithoutAResult(t *testing.T) {
	reports := []Event{nil, report("success", "exited", "0"), report("exit-code", "exited", "3"), report("exit-code", "exited", "77")}
	statuses := []Event{nil, poweroff("123"), poweroff("0"), reboot("0")}
	ends := []Event{qemuOK, qemuPanicked, QEMUExited{Signal: "killed"}, QEMUExited{Status: 1, Stderr: "qemu: vhost-user: broken"},
		Stopped{Why: StopTimeout}, Stopped{Why: StopInterrupted}, Stopped{Why: StopBootTimeout}}
	journals := []Event{nil, JournalUnitResult{}, JournalUnitResult{Found: true, Result: UnitResult{Result: "exit-code", ExitCode: "exited", ExitStatus: "1"}}}
	for _, heard := range []bool{false, true} {
		for _, r := range reports {
			for _, s := range statuses {
				for _, end := range ends {
					for _, j := range journals {
						v := New(Config{})
						for _, e := range []Event{map[bool]Event{true: booted}[heard], r, s, end, j} {
							if e != nil {
								v.Handle(e)
							}
						}
						o := v.Outcome()
						if !o.Retry {
							continue
						}
						assert.False(t, o.Passed() || o.Skipped(), "retryable %+v", o)
						// A reboot starts the test over; only the last boot's
						// result would have counted.
						rebooted := s != nil && s.(Notify)["X_SYSTEMD_SHUTDOWN"] == "reboot"
						assert.True(t, r == nil || rebooted, "retryable after the unit reported in the last boot: %+v", o)
						if jr, ok := j.(JournalUnitResult); ok {
							assert.False(t, jr.Found, "retryable with the unit's result in the journal: %+v", o)
						}
						_, stopped := end.(Stopped)
						assert.False(t, stopped, "retryable after the harness stopped the VM: %+v", o)
					}
				}
			}
		}
	}
}
