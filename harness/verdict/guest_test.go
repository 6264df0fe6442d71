package verdict

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
	assert.Contains(t, dropin, `done; /usr/bin/journalctl --sync </dev/null; `+
		`echo "<15>vmharness-journal-marker: $$INVOCATION_ID" 2>/dev/null >/dev/kmsg || echo "$$INVOCATION_ID" | /usr/bin/systemd-cat -t vmharness-journal-marker; `+
		`read -r s; test "$$i" = 0 || s=$$(systemctl is-system-running </dev/null); `+
		`NOTIFY_SOCKET=vsock-stream:2:9 /usr/bin/systemd-notify --no-block `+
		`X_VMHARNESS_TEST_RESULT="$$SERVICE_RESULT" X_VMHARNESS_TEST_EXIT_CODE="$$EXIT_CODE" X_VMHARNESS_TEST_EXIT_STATUS="$$EXIT_STATUS" `+
		`X_VMHARNESS_SYSTEM_STATE="$$s" X_VMHARNESS_INVOCATION="$$INVOCATION_ID"; }'`+"\n", dropin,
		"after core dumps in progress: the sync, the journal marker, then the report, so the result is reported once the journal is complete")
	assert.NotContains(t, dropin, "Environment=", "the test's own processes must not see the host's notify socket")
	// Core dumps in progress are waited for before the sync and the
	// journal marker, so that they reach the host's journal before it
	// stops the VM; systemctl runs alongside.
	assert.Regexp(t, `ExecStopPost=-\+/bin/sh -c 'systemctl is-system-running \| \{ i=0; while grep -qs "\^CoreDumping:\[\[:space:\]\]\*1" /proc/\[0-9\]\*/status; do .*done; /usr/bin/journalctl --sync`, dropin)
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

// TestReportCommandRuns runs the test unit's ExecStopPost= script with
// sh, as systemd would after "$$" becomes "$", with fakes for journalctl,
// systemd-cat, systemd-notify and systemctl, a file for /dev/kmsg and a
// directory of its own for /proc: the marker is written after the sync
// and before the report, through systemd-cat if /dev/kmsg cannot be
// opened; systemctl runs alongside the sync, and its state (or none) is
// what the report carries, sampled again if the script waited for a core
// dump.
func TestReportCommandRuns(t *testing.T) {
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skip("no /bin/sh")
	}
	var script string
	for _, o := range (GuestSetup{Unit: "t.service", NotifyAddress: "vsock-stream:2:9"}).units()[0].options {
		if o.Name == "ExecStopPost" {
			script = o.Value
		}
	}
	script, ok := strings.CutPrefix(script, "-+/bin/sh -c '")
	require.True(t, ok, script)
	script, ok = strings.CutSuffix(script, "'")
	require.True(t, ok, script)
	script = strings.ReplaceAll(script, "$$", "$")
	for _, path := range []string{"/usr/bin/", "/dev/kmsg", "/proc/[0-9]*/status"} {
		require.Contains(t, script, path)
	}

	// systemctl and journalctl each wait (5 s at most) until the other
	// has started: both finish only when they run at the same time.
	meet := func(mine, theirs string) string {
		return `touch "$DIR/` + mine + `.started"; i=0; while ! test -e "$DIR/` + theirs + `.started"; do ` +
			`i=$((i+1)); if test $i -gt 500; then echo "` + mine + ` ran alone" >&2; exit 3; fi; sleep 0.01; done; `
	}
	const kmsgMarker = "<15>vmharness-journal-marker: inv1\n"
	const catMarker = "systemd-cat -t vmharness-journal-marker: inv1\n"
	tests := []struct {
		name, systemctl, env string
		coreDump             bool // a process is dumping core for the first half second
		kmsgRefused          bool // /dev/kmsg cannot be opened (PrivateDevices=)
		wantState, wantMark  string
	}{
		{"running", `echo running`, "", false, false, "running", kmsgMarker},
		{"degraded exits 1", `echo degraded; exit 1`, "", false, false, "degraded", kmsgMarker},
		{"systemctl fails", `echo "Failed to connect to bus" >&2; exit 1`, "", false, false, "", kmsgMarker},
		{"systemctl fails, s in the unit's environment", `exit 1`, "s=stale", false, false, "", kmsgMarker},
		{"kmsg refused", `echo running`, "", false, true, "running", catMarker},
		// A shutdown began while the script waited for the dump: the
		// second sample says so.
		{"waited for a core dump", `echo running`, "", true, false, "stopping", kmsgMarker},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			fake := func(name, body string) {
				require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n"+body+"\n"), 0o755))
			}
			fake("systemctl", `test "$*" = is-system-running || exit 9; `+
				`if test -e "$DIR/systemctl.started"; then echo stopping; exit 1; fi; `+
				meet("systemctl", "journalctl")+tt.systemctl)
			// journalctl drains its stdin, as a program may: were it
			// the pipe, systemctl's state would never reach read.
			// The marker must not be logged before the sync is done,
			// nor missing when the report goes out.
			fake("journalctl", `test "$*" = --sync || exit 9; `+meet("journalctl", "systemctl")+
				`cat >/dev/null; test ! -f "$DIR/kmsg" && test ! -e "$DIR/cat" || { echo "marker before the sync" >&2; exit 3; }; `+
				`test ! -e "$DIR/proc/7/status" || { echo "synced during a core dump" >&2; exit 3; }; echo synced`)
			fake("systemd-cat", `echo "systemd-cat $*: $(cat)" >"$DIR/cat"`)
			fake("systemd-notify", `cat "$DIR/kmsg" "$DIR/cat" 2>/dev/null; echo "notify NOTIFY_SOCKET=$NOTIFY_SOCKET $*"`)
			if tt.kmsgRefused {
				require.NoError(t, os.Mkdir(filepath.Join(dir, "kmsg"), 0o755))
			}
			if tt.coreDump {
				status := filepath.Join(dir, "proc", "7", "status")
				require.NoError(t, os.MkdirAll(filepath.Dir(status), 0o755))
				require.NoError(t, os.WriteFile(status, []byte("Name:\tcrasher\nCoreDumping:\t1\n"), 0o644))
				time.AfterFunc(500*time.Millisecond, func() { os.Remove(status) })
			}
			s := strings.ReplaceAll(script, "/usr/bin/", dir+"/")
			s = strings.ReplaceAll(s, "/dev/kmsg", dir+"/kmsg")
			s = strings.ReplaceAll(s, "/proc/[0-9]*/status", dir+"/proc/[0-9]*/status")
			cmd := exec.Command("/bin/sh", "-c", s)
			cmd.Env = []string{"PATH=" + dir + ":/usr/bin:/bin", "DIR=" + dir, "INVOCATION_ID=inv1",
				"SERVICE_RESULT=exit-code", "EXIT_CODE=exited", "EXIT_STATUS=3"}
			if tt.env != "" {
				cmd.Env = append(cmd.Env, tt.env)
			}
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			require.NoError(t, cmd.Run(), stderr.String())
			assert.NotContains(t, stderr.String(), "ran alone")
			assert.Equal(t, "synced\n"+tt.wantMark+
				"notify NOTIFY_SOCKET=vsock-stream:2:9 --no-block X_VMHARNESS_TEST_RESULT=exit-code X_VMHARNESS_TEST_EXIT_CODE=exited "+
				"X_VMHARNESS_TEST_EXIT_STATUS=3 X_VMHARNESS_SYSTEM_STATE="+tt.wantState+" X_VMHARNESS_INVOCATION=inv1\n", stdout.String())
		})
	}
}
