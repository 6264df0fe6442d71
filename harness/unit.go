package harness

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"unicode/utf8"

	"github.com/vmharness/vmharness/harness/unitfile"
	"github.com/vmharness/vmharness/harness/verdict"
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
// in the guest would otherwise ignore the unit and the VM would just time
// out. The file is read as systemd reads it (unitfile.Read, which also
// says why that is not go-systemd's parser). Stricter than systemd: it
// only warns about text before the first section and NUL bytes end a line
// for it, but in a test unit both are mistakes.
func validateUnitText(text []byte) error {
	if !utf8.Valid(text) || bytes.IndexByte(text, 0) >= 0 {
		return fmt.Errorf("not a text file (NUL bytes or invalid UTF-8)")
	}
	lines, err := unitfile.Read(text)
	if err != nil {
		return err
	}
	header, service := false, false
	for _, l := range lines {
		if !l.Header && !header {
			return fmt.Errorf("line %d: assignment %q before any [Section]", l.Number, l.Text)
		}
		header = header || l.Header
		service = service || l.Header && l.Section == "Service"
	}
	if !service {
		return fmt.Errorf("no [Service] section")
	}
	return nil
}

// testUnitCredentials returns the credentials that install the test unit
// and the result protocol (verdict.GuestSetup) in the guest.
func testUnitCredentials(u TestUnit, g verdict.GuestSetup) []Credential {
	creds := []Credential{{Name: "systemd.extra-unit." + u.Name, Value: u.Text}}
	for _, f := range g.Files() {
		creds = append(creds, Credential{Name: f.Credential, Value: []byte(f.Text)})
	}
	return creds
}
