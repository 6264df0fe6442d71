package verdict

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/coreos/go-systemd/v22/unit"

	"github.com/vmharness/vmharness/harness/unitfile"
)

// The exit statuses PID 1 reports through EXIT_STATUS. The test unit's
// success action carries a distinctive status so a VM that merely powers off
// (exit status 0 or none) is never mistaken for a pass; on its own the
// status proves nothing (a failing unit's status is forwarded too, and a
// unit may exit 123), so the unit's own result decides.
const (
	GuestStatusPass = 123
	GuestStatusSkip = 77
)

// EmergencyExitUnit is the unit that ends the VM at once when the guest
// falls into emergency or rescue mode, instead of waiting for the timeout.
const EmergencyExitUnit = "vmharness-emergency-exit.service"

// EmergencyExitStatus is the status the emergency-exit unit reports.
const EmergencyExitStatus = 124

// ConditionCheckUnit reports a test unit that never ran because one of its
// Condition*= or Assert*= settings did not hold: systemd fires neither
// its success nor its failure action then, and the VM would sit idle until
// the timeout.
const ConditionCheckUnit = "vmharness-condition-check.service"

// Notify fields the guest-side units send besides PID 1's own.
const (
	// FieldTestResult, FieldTestExitCode and FieldTestExitStatus carry the
	// test unit's $SERVICE_RESULT, $EXIT_CODE and $EXIT_STATUS from its
	// ExecStopPost=.
	FieldTestResult     = "X_VMHARNESS_TEST_RESULT"
	FieldTestExitCode   = "X_VMHARNESS_TEST_EXIT_CODE"
	FieldTestExitStatus = "X_VMHARNESS_TEST_EXIT_STATUS"
	// FieldSystemState is `systemctl is-system-running` when the test unit
	// reported its result.
	FieldSystemState = "X_VMHARNESS_SYSTEM_STATE"
	// FieldInvocation is the test unit's $INVOCATION_ID, the text of its
	// journal marker.
	FieldInvocation = "X_VMHARNESS_INVOCATION"
	// FieldEmergency names the emergency or rescue target the guest fell
	// into, from the emergency-exit unit.
	FieldEmergency = "X_VMHARNESS_EMERGENCY"
)

// GuestFile is one unit or drop-in installed in the guest through a
// systemd credential.
type GuestFile struct {
	Credential string
	Text       string
}

// GuestSetup says how the result protocol is installed in the guest.
type GuestSetup struct {
	// Unit is the test unit's name, e.g. "boot.service".
	Unit string
	// NotifyAddress is the guest's address of the host's notify socket,
	// e.g. "vsock-stream:2:1234" (vmm.notify_socket).
	NotifyAddress string
	// KeepOnFailure replaces the failure action by "none", so a failed
	// test's VM stays up; its result still reaches the host.
	KeepOnFailure bool
}

// JournalMarkerIdentifier is the SYSLOG_IDENTIFIER of the journal entry
// the test unit logs, with its invocation ID as the message, right before
// it reports its result: once the host has that entry, it has the test's
// whole journal. The ExecStopPost= command writes it to /dev/kmsg as root
// (see JournalMarkerPriority), which journald takes in whatever the test
// unit's User=, LogNamespace= or standard output, and without the fork and
// exec under TCG that systemd-cat costs; the entry comes in with
// _TRANSPORT=kernel. A unit whose device policy keeps it from /dev/kmsg
// logs it through systemd-cat instead, as root. journald drops the
// kernel-log form if it runs with ForwardToKMsg=yes (it ignores user
// records in the kernel log then, against loops) or MaxLevelSocket= below
// debug: the host then waits for the marker in vain, for a bounded time.
const JournalMarkerIdentifier = "vmharness-journal-marker"

// JournalMarkerPriority is the syslog priority the marker is written to
// /dev/kmsg with: facility user, level debug, so the kernel does not print
// it on the console (its level 7 is not below the console's default log
// level) and "journalctl -p info" leaves it out.
const JournalMarkerPriority = 15

// waitForCoredumps waits until no process is dumping core, 3 minutes at
// most (900 times 0.2 s): under TCG a small process's dump takes 5-10 s.
// The kernel marks a crashed process "CoreDumping: 1" from the start of
// its dump until systemd-coredump, which reads the core from a pipe, has
// logged it and closes the pipe, so no dump in progress is missed between
// the kernel's helper and the socket-activated service that finishes it.
// One grep over /proc, far cheaper under TCG than asking PID 1. It leaves
// $i at the number of times it waited. A shell script for a unit file,
// where "$$" is "$".
const waitForCoredumps = `i=0; ` +
	`while grep -qs "^CoreDumping:[[:space:]]*1" /proc/[0-9]*/status; do ` +
	`if test $$i -ge 900; then echo "vmharness: a process is still dumping core after 3 minutes; its core dump may be missing from the journal"; break; fi; ` +
	`i=$$((i+1)); sleep 0.2; done`

// Files returns the credentials that install the protocol: the test unit's
// drop-in, the condition check, and the emergency-exit unit with the
// drop-ins that pull it in.
func (g GuestSetup) Files() []GuestFile {
	var files []GuestFile
	for _, u := range g.units() {
		files = append(files, GuestFile{Credential: u.credential, Text: unitfile.Serialize(u.options)})
	}
	return files
}

// guestUnit is a guest file before go-systemd's unit.Serialize lays it
// out. Serialize does not escape, so every value must be one line
// without surrounding white space (guest_test.go reads each file back as
// systemd does).
type guestUnit struct {
	credential string
	options    []*unit.UnitOption
}

// units returns the guest files as settings, in Files' order.
func (g GuestSetup) units() []guestUnit {
	failureAction := "exit"
	if g.KeepOnFailure {
		failureAction = "none"
	}
	// systemd-notify speaks vsock-stream addresses since systemd 256.
	// NOTIFY_SOCKET is set for that one command by the shell (every use
	// is in a shellCommand), so the test's own processes never see it;
	// env(1) did the same at the cost of one more exec under TCG. "${VAR}"
	// is expanded by systemd itself, "$$" is "$".
	notify := fmt.Sprintf("NOTIFY_SOCKET=%s /usr/bin/systemd-notify --no-block", g.NotifyAddress)

	// With systemd.unit=TEST.service nothing pulls in basic.target (a
	// service is only ordered after it), so sockets.target and with it
	// systemd-ssh-generator's sshd-vsock.socket would never start.
	dropin := []*unit.UnitOption{unit.NewUnitOption("Unit", "Wants", "basic.target "+ConditionCheckUnit)}
	dropin = append(dropin,
		unit.NewUnitOption("Unit", "SuccessAction", "exit"),
		unit.NewUnitOption("Unit", "SuccessActionExitStatus", strconv.Itoa(GuestStatusPass)),
		unit.NewUnitOption("Unit", "FailureAction", failureAction),

		unit.NewUnitOption("Service", "StandardOutput", "journal+console"),
		unit.NewUnitOption("Service", "StandardError", "journal+console"),
		// A test's log must not be thinned out by journald's rate limit
		// (10000 messages per 30s by default). 0 would mean "journald's
		// default" here, so the limit is set out of reach instead.
		unit.NewUnitOption("Service", "LogRateLimitIntervalSec", "1s"),
		unit.NewUnitOption("Service", "LogRateLimitBurst", "1000000000"),
		// A core dump is processed by a systemd-coredump@ instance of
		// systemd-coredump.socket, which logs it when done (5-10 s under
		// TCG). A crashed process of this unit is gone, and its dump
		// logged, before ExecStopPost= runs (the kernel holds the process
		// until its dump is read, and PID 1 waits for the unit's
		// processes), but a crash elsewhere may still be in progress: wait
		// for it before the journal marker below, so that neither the
		// success action nor the host, which stops the VM once it has the
		// marker, cuts the dump off.
		unit.NewUnitOption("Service", "ExecStopPost", "-+"+shellCommand(
			// journald may still be working through the unit's output
			// when it exits (under TCG it forwards a few hundred lines a
			// second); the success or failure action would power the VM
			// off and lose the rest. --sync returns once journald has
			// processed (and so forwarded) everything queued. The marker
			// after it lets the host see when the journal up to here has
			// arrived: journald forwards entries in the order it
			// processes them, and the marker is written only once
			// everything the test logged has been. It goes through
			// /dev/kmsg, a redirection of the shell's echo rather than a
			// program; journald reads the kernel log before its other
			// sources, so before the sync the marker could overtake the
			// test's last lines. Where the unit may not open /dev/kmsg
			// (PrivateDevices=, DevicePolicy= and DeviceAllow= filter the
			// whole unit's cgroup, "+" or not) systemd-cat logs it.
			//
			// The unit's own result goes to the host: the exit status PID
			// 1 forwards cannot tell a failure with status 123 from the
			// success action. With it goes the manager's state, sampled
			// now that the unit's main process has ended: "stopping"
			// means a shutdown is already under way, and PID 1 then skips
			// the success action. systemctl runs at the head of a pipe,
			// alongside the wait for core dumps and the sync (the guest
			// has two vCPUs), and the report waits for both; if the wait
			// for core dumps waited at all ($$i is not 0), the state is
			// sampled again after it, since a shutdown may have begun
			// meanwhile. If systemctl fails, read gets nothing and the
			// state is empty, which the host takes as unknown (no early
			// stop), as an empty $$(...) was. journalctl gets /dev/null
			// for stdin: the pipe is read's.
			`systemctl is-system-running | {`,
			waitForCoredumps+";",
			"/usr/bin/journalctl --sync </dev/null;",
			fmt.Sprintf(`echo "<%d>%s: $$INVOCATION_ID" 2>/dev/null >/dev/kmsg || echo "$$INVOCATION_ID" | /usr/bin/systemd-cat -t %s;`,
				JournalMarkerPriority, JournalMarkerIdentifier, JournalMarkerIdentifier),
			`read -r s;`,
			`test "$$i" = 0 || s=$$(systemctl is-system-running </dev/null);`,
			fmt.Sprintf(`%s %s="$$SERVICE_RESULT" %s="$$EXIT_CODE" %s="$$EXIT_STATUS" %s="$$s" %s="$$INVOCATION_ID"; }`,
				notify, FieldTestResult, FieldTestExitCode, FieldTestExitStatus, FieldSystemState, FieldInvocation))),
		// One command, not four: under TCG each ExecStopPost= costs PID 1
		// a fork and an exec of systemd-executor, about a tenth of a
		// second.
		// ExecStopPost= counts against TimeoutStopSec= (90s by default),
		// and journald may need longer than that for a chatty test under
		// TCG; the harness's own --timeout bounds the whole run instead.
		unit.NewUnitOption("Service", "TimeoutStopSec", "infinity"),
	)

	// Runs once the test unit's start job is over; it only acts when the
	// unit never ran: a condition or assertion did not hold, or the unit
	// never got as far as checking them (a unit it requires failed). A
	// test that ran has fired its success or failure action by then,
	// whose shutdown cancels this unit's start.
	check := []*unit.UnitOption{
		unit.NewUnitOption("Unit", "Description", "Report a vmharness test unit that did not run"),
		unit.NewUnitOption("Unit", "After", g.Unit),
		unit.NewUnitOption("Unit", "FailureAction", "exit"),
		unit.NewUnitOption("Unit", "FailureActionExitStatus", strconv.Itoa(GuestStatusSkip)),
		unit.NewUnitOption("Service", "Type", "oneshot"),
		unit.NewUnitOption("Service", "ExecStart", shellCommand(
			`show() { systemctl show -P "$$1" `+g.Unit+`; };`,
			`if test "$$(show ConditionTimestampMonotonic)" = 0; then r=`+ResultNotStarted+`;`,
			`elif test "$$(show ConditionResult)" = no; then r=`+ResultCondition+`;`,
			`elif test "$$(show AssertResult)" = no; then r=`+ResultAssert+`;`,
			`else exit 0; fi;`,
			notify+` `+FieldTestResult+`=$$r; exit 1`)),
	}

	// PID 1 announces emergency.target over the notify socket too, but
	// not always before the exit action ends the VM (a test that isolates
	// emergency.target is stopped and fails first); this unit's own report
	// says which came first.
	emergency := []*unit.UnitOption{
		unit.NewUnitOption("Unit", "Description", "End the test VM when it falls into emergency mode"),
		unit.NewUnitOption("Unit", "DefaultDependencies", "no"),
		unit.NewUnitOption("Unit", "FailureAction", "exit"),
		unit.NewUnitOption("Unit", "FailureActionExitStatus", strconv.Itoa(EmergencyExitStatus)),
		unit.NewUnitOption("Service", "Type", "oneshot"),
		unit.NewUnitOption("Service", "ExecStart", shellCommand(
			`t=emergency.target; systemctl -q is-active rescue.target && t=rescue.target;`,
			notify+` `+FieldEmergency+`=$$t; exit 1`)),
	}
	wantsEmergencyExit := []*unit.UnitOption{unit.NewUnitOption("Unit", "Wants", EmergencyExitUnit)}
	return []guestUnit{
		{"systemd.unit-dropin." + g.Unit, dropin},
		{"systemd.extra-unit." + ConditionCheckUnit, check},
		{"systemd.extra-unit." + EmergencyExitUnit, emergency},
		{"systemd.unit-dropin.emergency.target", wantsEmergencyExit},
		{"systemd.unit-dropin.rescue.target", wantsEmergencyExit},
	}
}

// shellCommand is an ExecStart= command that runs the script lines, which
// must not contain a single quote, with sh.
func shellCommand(lines ...string) string {
	return "/bin/sh -c '" + strings.Join(lines, " ") + "'"
}
