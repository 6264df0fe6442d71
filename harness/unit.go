package harness

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"unicode/utf8"
)

// maxUnitFileSize bounds a test unit file; it travels as a credential.
const maxUnitFileSize = 256 << 10

// TestUnit is the systemd service that is the test, as read from its file.
type TestUnit struct {
	// Name is the unit name, e.g. "boot.service".
	Name string
	Text []byte
}

// LoadTestUnit reads and validates a test unit file. The unit's name is
// the file's base name.
func LoadTestUnit(path string) (TestUnit, error) {
	name := filepath.Base(path)
	if err := ValidateServiceName(name); err != nil {
		return TestUnit{}, fmt.Errorf("test unit %s: %w", path, err)
	}
	info, err := os.Stat(path)
	if err != nil {
		return TestUnit{}, fmt.Errorf("test unit: %w", err)
	}
	if !info.Mode().IsRegular() {
		return TestUnit{}, fmt.Errorf("test unit %s is not a regular file", path)
	}
	if info.Size() > maxUnitFileSize {
		return TestUnit{}, fmt.Errorf("test unit %s is %d bytes, over the %d-byte limit", path, info.Size(), maxUnitFileSize)
	}
	text, err := os.ReadFile(path)
	if err != nil {
		return TestUnit{}, fmt.Errorf("test unit: %w", err)
	}
	if err := validateUnitText(text); err != nil {
		return TestUnit{}, fmt.Errorf("test unit %s: %w", path, err)
	}
	return TestUnit{Name: name, Text: text}, nil
}

// ValidateServiceName accepts plain (non-template) service unit names as
// systemd's unit_name_is_valid() would.
func ValidateServiceName(name string) error {
	prefix, ok := strings.CutSuffix(name, ".service")
	if !ok {
		return fmt.Errorf("unit name %q does not end in .service", name)
	}
	if prefix == "" || len(name) > 255 {
		return fmt.Errorf("unit name %q is empty or longer than 255 bytes", name)
	}
	if strings.HasSuffix(prefix, "@") {
		return fmt.Errorf("unit name %q is a template; give an instance (name@instance.service)", name)
	}
	for _, r := range prefix {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune(":-_.\\@", r)
		if !ok {
			return fmt.Errorf("unit name %q contains %q, which systemd does not allow in unit names", name, r)
		}
	}
	if strings.Count(prefix, "@") > 1 {
		return fmt.Errorf("unit name %q has more than one '@'", name)
	}
	return nil
}

// validateUnitText does the checks that catch a wrong file early: systemd
// in the guest would otherwise ignore the unit and the VM would just time out.
func validateUnitText(text []byte) error {
	if !utf8.Valid(text) || bytes.IndexByte(text, 0) >= 0 {
		return fmt.Errorf("not a text file (NUL bytes or invalid UTF-8)")
	}
	var sections []string
	for i, line := range strings.Split(string(text), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if line[0] == '[' {
			if !strings.HasSuffix(line, "]") {
				return fmt.Errorf("line %d: malformed section header %q", i+1, line)
			}
			sections = append(sections, line)
			continue
		}
		if len(sections) == 0 {
			return fmt.Errorf("line %d: assignment %q before any [Section]", i+1, line)
		}
		if !strings.Contains(line, "=") && !strings.HasSuffix(line, "\\") {
			// Continuation lines of a previous "\"-terminated line have no '='.
			continue
		}
	}
	for _, s := range sections {
		if s == "[Service]" {
			return nil
		}
	}
	return fmt.Errorf("no [Service] section")
}

// The exit statuses PID 1 reports through EXIT_STATUS. The test unit's
// success action carries a distinctive status so a VM that merely powers off
// (exit status 0 or none) is never mistaken for a pass.
const (
	GuestStatusPass = 123
	GuestStatusSkip = 77
)

// EmergencyExitUnit is the unit that ends the VM at once when the guest
// falls into emergency or rescue mode, instead of waiting for the timeout.
const EmergencyExitUnit = "vmharness-emergency-exit.service"

// EmergencyExitStatus is the status the emergency-exit unit reports; it is
// outside the range a test script normally exits with.
const EmergencyExitStatus = 124

// Notify fields the keep-on-failure drop-in sends from the guest when the
// test unit failed, instead of letting its FailureAction end the VM.
const (
	notifyTestResult = "X_VMHARNESS_TEST_RESULT"
	notifyTestStatus = "X_VMHARNESS_TEST_EXIT_STATUS"
)

// testUnitCredentials returns the credentials that install the test unit,
// its exit drop-in and the emergency-exit unit in the guest. With
// keepOnFailure the unit's failure does not end the VM: an ExecStopPost
// reports it over the notify socket (notifyAddr) and the VM stays up for
// inspection.
func testUnitCredentials(u TestUnit, keepOnFailure bool, notifyAddr string) []Credential {
	// With systemd.unit=TEST.service nothing pulls in basic.target (a
	// service is only ordered after it), so sockets.target and with it
	// systemd-ssh-generator's sshd-vsock.socket would never start.
	dropin := fmt.Sprintf(`[Unit]
Wants=basic.target
SuccessAction=exit
SuccessActionExitStatus=%d
FailureAction=exit

[Service]
StandardOutput=journal+console
StandardError=journal+console
# A test's log must not be thinned out by journald's rate limit (10000
# messages per 30s by default). 0 would mean "journald's default" here, so
# the limit is set out of reach instead.
LogRateLimitIntervalSec=1s
LogRateLimitBurst=1000000000
# journald may still be working through the unit's output when it exits
# (under TCG it forwards a few hundred lines a second); the success or
# failure action would power the VM off and lose the rest. --sync returns
# once journald has processed (and so forwarded) everything queued.
ExecStopPost=-+/usr/bin/journalctl --sync
# ExecStopPost= counts against TimeoutStopSec= (90s by default), and
# journald may need longer than that for a chatty test under TCG; the
# harness's own --timeout bounds the whole run instead.
TimeoutStopSec=infinity
`, GuestStatusPass)
	if keepOnFailure {
		dropin = strings.Replace(dropin, "FailureAction=exit\n", "FailureAction=none\n", 1)
		// $SERVICE_RESULT and $EXIT_STATUS are set for ExecStopPost;
		// systemd-notify speaks vsock-stream addresses since systemd 256.
		dropin += fmt.Sprintf(`ExecStopPost=/bin/sh -c 'test "$SERVICE_RESULT" = success || NOTIFY_SOCKET=%s exec systemd-notify %s="$SERVICE_RESULT" %s="$EXIT_STATUS"'
`, notifyAddr, notifyTestResult, notifyTestStatus)
	}
	emergency := fmt.Sprintf(`[Unit]
Description=End the test VM when it falls into emergency mode
DefaultDependencies=no
FailureAction=exit
FailureActionExitStatus=%d

[Service]
Type=oneshot
ExecStart=/bin/false
`, EmergencyExitStatus)
	wantsEmergencyExit := "[Unit]\nWants=" + EmergencyExitUnit + "\n"
	return []Credential{
		{Name: "systemd.extra-unit." + u.Name, Value: u.Text},
		{Name: "systemd.unit-dropin." + u.Name, Value: []byte(dropin)},
		{Name: "systemd.extra-unit." + EmergencyExitUnit, Value: []byte(emergency)},
		{Name: "systemd.unit-dropin.emergency.target", Value: []byte(wantsEmergencyExit)},
		{Name: "systemd.unit-dropin.rescue.target", Value: []byte(wantsEmergencyExit)},
	}
}
