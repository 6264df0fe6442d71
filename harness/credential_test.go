package harness

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/verdict"
)

func TestParseCredentialArg(t *testing.T) {
	file := filepath.Join(t.TempDir(), "value")
	require.NoError(t, os.WriteFile(file, []byte("from\x00file"), 0o600))
	tests := []struct {
		arg       string
		wantName  string
		wantValue string
		wantErr   string
	}{
		{"a=b", "a", "b", ""},
		{"a.b-c=x=y", "a.b-c", "x=y", ""},
		{"empty=", "empty", "", ""},
		{"bin=@" + file, "bin", "from\x00file", ""},
		{"novalue", "", "", "want NAME=VALUE"},
		{"=x", "", "", "name is empty"},
		{"a/b=x", "", "", "contains '/'"},
		{"a\nb=x", "", "", "control character"},
		{"..=x", "", "", "not a valid file name"},
		{strings.Repeat("n", 256) + "=x", "", "", "longer than 255"},
		{"f=@/nonexistent/file", "", "", "cannot read value file"},
	}
	for _, tt := range tests {
		t.Run(tt.arg, func(t *testing.T) {
			c, err := ParseCredentialArg(tt.arg)
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.wantName, c.Name)
			assert.Equal(t, tt.wantValue, string(c.Value))
		})
	}
}

func TestCheckCredentialSizes(t *testing.T) {
	big := make([]byte, MaxCredentialSize)
	tests := []struct {
		name    string
		creds   []Credential
		wantErr string
	}{
		{"empty", nil, ""},
		{"exactly the limit", []Credential{{"a", big}}, ""},
		{"one over per credential", []Credential{{"a", append(big, 'x')}}, "per credential"},
		{"total over", []Credential{{"a", big[:MaxCredentialSize/2+1]}, {"b", big[:MaxCredentialSize/2]}}, "for all credentials together"},
		{"duplicate", []Credential{{"a", nil}, {"a", nil}}, "more than once"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckCredentialSizes(tt.creds)
			if tt.wantErr == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
		})
	}
}

// TestSMBIOSFiles checks the encoding systemd expects and that values reach
// QEMU only through 0600 files, never its command line.
func TestSMBIOSFiles(t *testing.T) {
	dir := t.TempDir()
	secret := "line one\nline two = with equals\n"
	args, err := writeSMBIOSFiles(dir, []Credential{{Name: "my.secret", Value: []byte(secret)}})
	require.NoError(t, err)
	require.Len(t, args, 2)
	assert.Equal(t, "-smbios", args[0])
	path, ok := strings.CutPrefix(args[1], "type=11,path=")
	require.True(t, ok, args[1])
	assert.NotContains(t, strings.Join(args, " "), "line one")

	info, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), info.Mode().Perm())
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	prefix := "io.systemd.credential.binary:my.secret="
	require.True(t, strings.HasPrefix(string(data), prefix), string(data))
	decoded, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(string(data), prefix))
	require.NoError(t, err)
	assert.Equal(t, secret, string(decoded))
}

func TestValidateServiceName(t *testing.T) {
	tests := []struct {
		name    string
		wantErr string
	}{
		{"boot.service", ""},
		{"TEST-01_x:y.service", ""},
		{"foo@bar.service", ""},
		{"foo@.service", "is a template"},
		{"foo.timer", "does not end in .service"},
		{".service", "empty"},
		{"a b.service", "does not allow"},
		{"a@b@c.service", "more than one '@'"},
		{strings.Repeat("a", 250) + ".service", "longer than 255"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateServiceName(tt.name)
			if tt.wantErr == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
		})
	}
}

func TestValidateUnitText(t *testing.T) {
	tests := []struct {
		name    string
		text    string
		wantErr string
	}{
		{"minimal", "[Service]\nExecStart=/bin/true\n", ""},
		{"comments and continuation", "# c\n; c\n[Unit]\nDescription=x\n[Service]\nExecStart=/bin/sh -c 'a \\\n  b'\n", ""},
		{"no service section", "[Unit]\nDescription=x\n", "no [Service] section"},
		{"assignment before section", "ExecStart=/bin/true\n[Service]\n", "before any [Section]"},
		{"broken header", "[Service\nExecStart=x\n", "malformed section header"},
		{"binary", "[Service]\n\x00", "not a text file"},
		{"invalid utf-8", "[Service]\n\xff\n", "not a text file"},
		{"garbage after header", "[Service] # c\nExecStart=/bin/true\n", `line 1: malformed section header "[Service] # c"`},
		{"quote in header", "[Ser'vice]\nExecStart=/bin/true\n", "quotes, backslashes or control characters"},
		{"header with spaces is another section", "[ Service ]\nExecStart=/bin/true\n", "no [Service] section"},
		// Read as systemd reads them (see harness/unitfile): the first was
		// refused before, the others go-systemd's parser misreads.
		{"continuation line starting with '['", "[Service]\nExecStart=/bin/sh -c 'true \\\n  [ -e / ] && true'\n", ""},
		{"commented-out continued line", "[Unit]\n# ExecStart=/bin/old \\\n[Service]\nExecStart=/bin/true\n", ""},
		{"line over 2048 bytes", "[Service]\nExecStart=/bin/echo " + strings.Repeat("a", 3000) + "\n", ""},
		{"line without '='", "[Service]\nExecStart=/bin/true\ntypo\n", ""},
		{"old Mac line ends", "[Service]\rExecStart=/bin/true\r", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := validateUnitText([]byte(tt.text))
			if tt.wantErr == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
		})
	}
}

func TestTestUnitCredentials(t *testing.T) {
	u := TestUnit{Name: "t.service", Text: []byte("[Service]\nExecStart=/bin/true\n")}
	creds := testUnitCredentials(u, verdict.GuestSetup{Unit: u.Name, NotifyAddress: "vsock-stream:2:9"})
	m := map[string]string{}
	for _, c := range creds {
		m[c.Name] = string(c.Value)
	}
	assert.Equal(t, string(u.Text), m["systemd.extra-unit.t.service"])
	assert.Contains(t, m["systemd.unit-dropin.t.service"], "SuccessActionExitStatus=123")
	assert.Contains(t, m, "systemd.extra-unit."+verdict.EmergencyExitUnit)
}
