package sshkey

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestEnsureKeyOpenSSHAcceptsIt(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	priv, pub, err := EnsureKey(dir)
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(dir, PrivateKeyName), priv)
	assert.True(t, strings.HasPrefix(pub, "ssh-ed25519 AAAA"), pub)
	assert.True(t, strings.HasSuffix(pub, " vmharness"), pub)

	st, err := os.Stat(priv)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	st, err = os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), st.Mode().Perm())

	pubFile, err := os.ReadFile(filepath.Join(dir, PublicKeyName))
	require.NoError(t, err)
	assert.Equal(t, pub+"\n", string(pubFile))

	keygen, err := exec.LookPath("ssh-keygen")
	if err != nil {
		t.Skip("ssh-keygen not installed")
	}
	out, err := exec.Command(keygen, "-y", "-f", priv).CombinedOutput()
	require.NoError(t, err, "ssh-keygen -y: %s", out)
	// ssh-keygen prints the key with the comment stored in the private key.
	assert.Equal(t, pub, strings.TrimSpace(string(out)))
}

// The key dir is private however it came to exist, and what is already in
// it (the runner's journal dir) is left as it is.
func TestEnsureKeyMakesStateDirPrivate(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string)
	}{
		{"new", func(t *testing.T, dir string) {}},
		{"made 0755 as the journal dir's parent", func(t *testing.T, dir string) {
			require.NoError(t, os.MkdirAll(filepath.Join(dir, "journal"), 0o755))
			require.NoError(t, os.Chmod(dir, 0o755))
		}},
		{"0777 with a key from an older version", func(t *testing.T, dir string) {
			require.NoError(t, os.Mkdir(dir, 0o777))
			require.NoError(t, os.Chmod(dir, 0o777))
			_, _, err := EnsureKey(dir)
			require.NoError(t, err)
			require.NoError(t, os.Chmod(dir, 0o777))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "state")
			tt.setup(t, dir)
			_, _, err := EnsureKey(dir)
			require.NoError(t, err)
			st, err := os.Stat(dir)
			require.NoError(t, err)
			assert.Equal(t, os.FileMode(0o700), st.Mode().Perm())
			if st, err := os.Stat(filepath.Join(dir, "journal")); err == nil {
				assert.Equal(t, os.FileMode(0o755), st.Mode().Perm(), "the journal dir is not touched")
			}
		})
	}
}

func TestEnsureKeyRefusesNonDirectory(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state")
	require.NoError(t, os.WriteFile(path, nil, 0o600))
	_, _, err := EnsureKey(path)
	assert.ErrorContains(t, err, "not a directory")
}

func TestEnsureKeyIsStable(t *testing.T) {
	dir := t.TempDir()
	_, first, err := EnsureKey(dir)
	require.NoError(t, err)
	_, second, err := EnsureKey(dir)
	require.NoError(t, err)
	assert.Equal(t, first, second)
}

func TestEnsureKeyConcurrentCallersAgree(t *testing.T) {
	dir := t.TempDir()
	const n = 16
	lines := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, lines[i], errs[i] = EnsureKey(dir)
		}()
	}
	wg.Wait()
	for i := range n {
		require.NoError(t, errs[i])
		assert.Equal(t, lines[0], lines[i])
	}
}

func TestEnsureKeyRejectsCorruptKey(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, PrivateKeyName), []byte("garbage"), 0o600))
	_, _, err := EnsureKey(dir)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "delete it")
}

func TestStateDir(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want string
	}{
		{"explicit", map[string]string{"VMHARNESS_STATE_DIR": "/s", "XDG_STATE_HOME": "/x", "HOME": "/h"}, "/s"},
		{"xdg", map[string]string{"XDG_STATE_HOME": "/x", "HOME": "/h"}, "/x/vmharness"},
		{"home", map[string]string{"HOME": "/h"}, "/h/.local/state/vmharness"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := StateDir(func(k string) string { return tt.env[k] })
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}
