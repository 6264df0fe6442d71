package harness

import (
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Guest-side limits on credentials passed by the VMM (systemd's
// CREDENTIAL_SIZE_MAX and CREDENTIALS_TOTAL_SIZE_MAX): the guest drops
// anything beyond them, so the harness refuses them up front.
const (
	MaxCredentialSize      = 1 << 20
	MaxCredentialTotalSize = 1 << 20
	maxCredentialNameLen   = 255
)

// Credential is one systemd system credential handed to the guest.
type Credential struct {
	Name  string
	Value []byte
}

// ParseCredentialArg parses the CLI form NAME=VALUE or NAME=@FILE.
func ParseCredentialArg(arg string) (Credential, error) {
	name, value, ok := strings.Cut(arg, "=")
	if !ok {
		return Credential{}, fmt.Errorf("credential %q: want NAME=VALUE or NAME=@FILE", arg)
	}
	if err := ValidateCredentialName(name); err != nil {
		return Credential{}, err
	}
	if path, isFile := strings.CutPrefix(value, "@"); isFile {
		data, err := os.ReadFile(path)
		if err != nil {
			return Credential{}, fmt.Errorf("credential %s: cannot read value file: %w", name, err)
		}
		return Credential{Name: name, Value: data}, nil
	}
	return Credential{Name: name, Value: []byte(value)}, nil
}

// ValidateCredentialName checks a name the way systemd's
// credential_name_valid() does: a valid file name without control characters.
func ValidateCredentialName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("credential name is empty")
	case len(name) > maxCredentialNameLen:
		return fmt.Errorf("credential name %.40q... is longer than %d bytes", name, maxCredentialNameLen)
	case name == "." || name == "..":
		return fmt.Errorf("credential name %q is not a valid file name", name)
	}
	for _, r := range name {
		if r == '/' || r < 0x20 || r == 0x7f {
			return fmt.Errorf("credential name %q contains '/' or a control character", name)
		}
	}
	return nil
}

// CheckCredentialSizes refuses credential sets the guest would truncate or drop.
func CheckCredentialSizes(creds []Credential) error {
	total := 0
	seen := make(map[string]bool, len(creds))
	for _, c := range creds {
		if seen[c.Name] {
			return fmt.Errorf("credential %s is given more than once", c.Name)
		}
		seen[c.Name] = true
		if len(c.Value) > MaxCredentialSize {
			return fmt.Errorf("credential %s is %d bytes, over the guest's %d-byte limit per credential", c.Name, len(c.Value), MaxCredentialSize)
		}
		total += len(c.Value)
	}
	if total > MaxCredentialTotalSize {
		return fmt.Errorf("credentials total %d bytes, over the guest's %d-byte limit for all credentials together", total, MaxCredentialTotalSize)
	}
	return nil
}

// smbiosString encodes a credential as an SMBIOS type 11 OEM string.
// Everything goes base64 through the binary form: SMBIOS strings cannot
// carry NUL bytes and this keeps newlines and '=' in unit files intact.
func smbiosString(c Credential) string {
	return "io.systemd.credential.binary:" + c.Name + "=" + base64.StdEncoding.EncodeToString(c.Value)
}

// writeSMBIOSFiles writes one 0600 file per credential into dir and returns
// the QEMU arguments that load them, so credential values never appear on
// QEMU's command line (visible in ps) but only in files only we can read.
func writeSMBIOSFiles(dir string, creds []Credential) ([]string, error) {
	var args []string
	for i, c := range creds {
		path := filepath.Join(dir, fmt.Sprintf("credential-%03d.smbios", i))
		if err := os.WriteFile(path, []byte(smbiosString(c)), 0o600); err != nil {
			return nil, fmt.Errorf("writing credential %s for QEMU: %w", c.Name, err)
		}
		args = append(args, "-smbios", "type=11,path="+QEMUOptionValue(path))
	}
	return args, nil
}
