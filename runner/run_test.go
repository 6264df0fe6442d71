package runner

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeImageDir makes an image directory whose files exist but would not
// boot: enough for the runner to get past image resolution.
func fakeImageDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{"vmlinuz", "initrd.img", "rootfs.img"} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, f), []byte("not an image"), 0o644))
	}
	return dir
}

func writeUnit(t *testing.T, name, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	require.NoError(t, os.WriteFile(p, []byte(text), 0o644))
	return p
}

// TestRunBadInput checks that every kind of bad input ends the run before a
// VM boots, with exit 99 and one clear line, and leaves nothing behind.
func TestRunBadInput(t *testing.T) {
	good := writeUnit(t, "good.service", "[Service]\nType=oneshot\nExecStart=/bin/true\n")
	big := filepath.Join(t.TempDir(), "big")
	require.NoError(t, os.WriteFile(big, bytes.Repeat([]byte("x"), 700<<10), 0o644))
	unreadable := filepath.Join(t.TempDir(), "missing-credential")

	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		wantMsg string
	}{
		{"missing unit file", []string{filepath.Join(t.TempDir(), "nope.service")}, nil, "no such file"},
		{"not a service", []string{writeUnit(t, "x.timer", "[Timer]\n")}, nil, "does not end in .service"},
		{"template unit", []string{writeUnit(t, "x@.service", "[Service]\n")}, nil, "is a template"},
		{"bad characters", []string{writeUnit(t, "a b.service", "[Service]\n")}, nil, "does not allow"},
		{"binary unit file", []string{writeUnit(t, "bin.service", "[Service]\x00\n")}, nil, "not a text file"},
		{"no service section", []string{writeUnit(t, "ns.service", "[Unit]\nDescription=x\n")}, nil, "no [Service] section"},
		{"no unit", nil, nil, "exactly one unit file"},
		{"bad credential syntax", []string{"--credential", "novalue", good}, nil, "want NAME=VALUE"},
		{"bad credential name", []string{"--credential", "a/b=c", good}, nil, "contains '/'"},
		{"unreadable credential file", []string{"--credential", "x=@" + unreadable, good}, nil, "cannot read value file"},
		{"oversized credentials", []string{"--credential", "a=@" + big, "--credential", "b=@" + big, good}, nil, "over the guest's 1048576-byte limit"},
		{"bad keep policy", []string{"--keep-journal", "sometimes", good}, nil, "keep policy"},
		{"bad vsock mode", []string{good}, map[string]string{"VMHARNESS_VSOCK": "carrier-pigeon"}, "VMHARNESS_VSOCK"},
		{"missing QEMU", []string{good}, map[string]string{"VMHARNESS_QEMU": "/nonexistent/qemu-system-x86_64"}, "QEMU not found"},
		{"missing image", []string{good}, map[string]string{"VMHARNESS_IMAGE_DIR": filepath.Join(t.TempDir(), "none")}, "VMHARNESS_IMAGE_DIR"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			vars := map[string]string{
				"VMHARNESS_IMAGE_DIR":   fakeImageDir(t),
				"VMHARNESS_RUNTIME_DIR": filepath.Join(root, "run"),
				"VMHARNESS_STATE_DIR":   filepath.Join(root, "state"),
				"VMHARNESS_VSOCK":       "user",
			}
			for k, v := range tt.env {
				vars[k] = v
			}
			var stderr bytes.Buffer
			env := &cliEnv{stdin: strings.NewReader(""), stdout: &bytes.Buffer{}, stderr: &stderr, getenv: func(k string) string { return vars[k] }}
			code := cmdRun(context.Background(), env, tt.args)
			assert.Equal(t, 99, code, "stderr: %s", stderr.String())
			lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
			last := lines[len(lines)-1]
			assert.Contains(t, last, tt.wantMsg)
			assert.True(t, strings.HasPrefix(last, "vmharness run: "), "error line %q", last)
			// Nothing left behind in the runtime dir: no work dir, no entry.
			entries, _ := os.ReadDir(filepath.Join(root, "run"))
			for _, e := range entries {
				assert.False(t, e.IsDir(), "leftover work dir %s", e.Name())
				assert.False(t, strings.HasSuffix(e.Name(), ".json"), "leftover registry entry %s", e.Name())
			}
		})
	}
}

func TestParseKeepDuration(t *testing.T) {
	tests := []struct {
		in      string
		want    string
		wantErr bool
	}{
		{"1", "30m0s", false},
		{"yes", "30m0s", false},
		{"0", "0s", false},
		{"", "0s", false},
		{"10m", "10m0s", false},
		{"-1m", "", true},
		{"soon", "", true},
	}
	for _, tt := range tests {
		d, err := parseKeepDuration(tt.in)
		if tt.wantErr {
			assert.Error(t, err, tt.in)
			continue
		}
		require.NoError(t, err, tt.in)
		assert.Equal(t, tt.want, d.String(), tt.in)
	}
}
