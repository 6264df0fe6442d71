package verdict

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/unitfile"
)

func TestGuestSetupFiles(t *testing.T) {
	byName := func(files []GuestFile) map[string]string {
		m := map[string]string{}
		for _, f := range files {
			m[f.Credential] = f.Text
		}
		return m
	}
	plain := byName(GuestSetup{Unit: "t.service", NotifyAddress: "vsock-stream:2:9"}.Files())
	dropin := plain["systemd.unit-dropin.t.service"]
	assert.Contains(t, dropin, "SuccessAction=exit\nSuccessActionExitStatus=123\nFailureAction=exit\n")
	assert.Contains(t, dropin, "Wants=basic.target "+ConditionCheckUnit+"\n")
	assert.Contains(t, dropin, "StandardOutput=journal+console")
	assert.Contains(t, dropin, "LogRateLimitBurst=1000000000")
	assert.Contains(t, dropin, "TimeoutStopSec=infinity")
	// The journal is synced before the result is reported, and both before
	// the success or failure action powers the VM off.
	assert.Equal(t, 1, strings.Count(dropin, "\nExecStopPost="), "one command: each costs PID 1 an executor under TCG")
	assert.Contains(t, dropin, `done; echo "$$INVOCATION_ID" | /usr/bin/systemd-cat -t vmharness-journal-marker; /usr/bin/journalctl --sync; `+
		`NOTIFY_SOCKET=vsock-stream:2:9 /usr/bin/systemd-notify --no-block `+
		`X_VMHARNESS_TEST_RESULT="$$SERVICE_RESULT" X_VMHARNESS_TEST_EXIT_CODE="$$EXIT_CODE" X_VMHARNESS_TEST_EXIT_STATUS="$$EXIT_STATUS" `+
		`X_VMHARNESS_SYSTEM_STATE="$$(systemctl is-system-running)" X_VMHARNESS_INVOCATION="$$INVOCATION_ID"'`+"\n", dropin,
		"after core dumps in progress: the journal marker, the sync, then the report, so the result is reported once the journal is complete")
	assert.NotContains(t, dropin, "Environment=", "the test's own processes must not see the host's notify socket")
	// Core dumps in progress are waited for before the journal marker and
	// the sync, so that they reach the host's journal before it stops the
	// VM.
	assert.Regexp(t, `ExecStopPost=-\+/bin/sh -c 'i=0; while grep -qs "\^CoreDumping:\[\[:space:\]\]\*1" /proc/\[0-9\]\*/status; do .*done; echo "\$\$INVOCATION_ID" \| /usr/bin/systemd-cat `, dropin)
	assert.NotContains(t, waitForCoredumps, "exit", "the wait must not end the command before the marker and the report")

	check := plain["systemd.extra-unit."+ConditionCheckUnit]
	assert.Contains(t, check, "[Unit]\nDescription=Report a vmharness test unit that did not run\nAfter=t.service\nFailureAction=exit\nFailureActionExitStatus=77\n\n[Service]\n",
		"the actions are [Unit] settings")
	assert.Contains(t, check, "systemctl show -P \"$$1\" t.service")
	assert.Contains(t, check, "X_VMHARNESS_TEST_RESULT=$$r")
	assert.Contains(t, check, `if test "$$(show ConditionTimestampMonotonic)" = 0; then r=not-started;`, "a unit that never started is reported")

	assert.Contains(t, plain["systemd.extra-unit."+EmergencyExitUnit], "FailureActionExitStatus=124")
	assert.Contains(t, plain["systemd.extra-unit."+EmergencyExitUnit], "X_VMHARNESS_EMERGENCY=$$t; exit 1")
	assert.Contains(t, plain["systemd.unit-dropin.emergency.target"], "Wants="+EmergencyExitUnit)
	assert.Contains(t, plain["systemd.unit-dropin.rescue.target"], "Wants="+EmergencyExitUnit)

	kept := byName(GuestSetup{Unit: "t.service", NotifyAddress: "vsock-stream:2:9", KeepOnFailure: true}.Files())["systemd.unit-dropin.t.service"]
	assert.Contains(t, kept, "FailureAction=none\n")
	assert.NotContains(t, kept, "FailureAction=exit")
	assert.Contains(t, kept, `X_VMHARNESS_TEST_RESULT="$$SERVICE_RESULT"`)
	assert.NotContains(t, dropin, "AssertPathExists")
}

// TestGuestUnitsReadBack reads every guest file back as systemd does:
// unit.Serialize wrote each setting as the one value meant (no value
// breaks a line, continues one or loses white space).
func TestGuestUnitsReadBack(t *testing.T) {
	for _, g := range []GuestSetup{
		{Unit: "t.service", NotifyAddress: "vsock-stream:2:9"},
		{Unit: "t@x.service", NotifyAddress: "vsock-stream:2:1234", KeepOnFailure: true},
	} {
		for _, u := range g.units() {
			lines, err := unitfile.Read([]byte(unitfile.Serialize(u.options)))
			require.NoError(t, err, u.credential)
			assert.Equal(t, u.options, unitfile.Options(lines), u.credential)
		}
	}
}
