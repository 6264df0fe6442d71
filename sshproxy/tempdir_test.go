package sshproxy

import (
	"os"
	"testing"
)

// shortTempDir returns a temp dir whose paths fit in a sockaddr_un.
func shortTempDir(t *testing.T) (string, error) {
	dir, err := os.MkdirTemp("", "vmh")
	if err != nil {
		return "", err
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir, nil
}
