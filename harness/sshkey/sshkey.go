// Package sshkey owns the one ed25519 key pair a user's harness VMs trust.
//
// The key lives in the per-user state directory (see StateDir), not in a
// build directory, so `vmharness ssh` reaches every VM the user started from
// any build tree. Each VM gets the public half as the systemd credential
// ssh.authorized_keys.root.
package sshkey

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"
)

// File names inside the key directory.
const (
	PrivateKeyName = "id_ed25519"
	PublicKeyName  = "id_ed25519.pub"
	lockName       = "key.lock"
)

// Comment is the comment field of the public key line.
const Comment = "vmharness"

// StateDir returns the per-user state directory of vmharness:
// $VMHARNESS_STATE_DIR if set, else $XDG_STATE_HOME/vmharness, else
// ~/.local/state/vmharness. getenv is usually os.Getenv.
func StateDir(getenv func(string) string) (string, error) {
	if d := getenv("VMHARNESS_STATE_DIR"); d != "" {
		return d, nil
	}
	if d := getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "vmharness"), nil
	}
	home := getenv("HOME")
	if home == "" {
		h, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("locate state dir: set VMHARNESS_STATE_DIR or HOME: %w", err)
		}
		home = h
	}
	return filepath.Join(home, ".local", "state", "vmharness"), nil
}

// EnsureKey returns the private key path and the authorized_keys line
// ("ssh-ed25519 AAAA... vmharness") of the key pair in dir, generating the
// pair first if it does not exist. dir is created 0700, or made 0700 if it
// exists with wider permissions (see makePrivateDir). Parallel callers,
// in this or other processes, get the same key: generation happens under an
// flock on dir/key.lock and files appear atomically (temp file + rename).
func EnsureKey(dir string) (privPath, pubLine string, err error) {
	if err := makePrivateDir(dir); err != nil {
		return "", "", err
	}
	privPath = filepath.Join(dir, PrivateKeyName)

	// Fast path without the lock: a complete key pair never changes.
	if line, err := readPublic(privPath); err == nil {
		return privPath, line, nil
	}

	lock, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return "", "", fmt.Errorf("open key lock: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return "", "", fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)

	// Another process may have generated the key while we waited.
	if line, err := readPublic(privPath); err == nil {
		return privPath, line, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", "", err
	}

	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", "", fmt.Errorf("generate ed25519 key: %w", err)
	}
	block, err := ssh.MarshalPrivateKey(priv, Comment)
	if err != nil {
		return "", "", fmt.Errorf("encode private key: %w", err)
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		return "", "", fmt.Errorf("encode public key: %w", err)
	}
	pubLine = strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sshPub))) + " " + Comment

	// The public key goes first: the private key's presence is what marks
	// the pair complete.
	if err := writeAtomic(filepath.Join(dir, PublicKeyName), []byte(pubLine+"\n"), 0o644); err != nil {
		return "", "", err
	}
	if err := writeAtomic(privPath, pem.EncodeToMemory(block), 0o600); err != nil {
		return "", "", err
	}
	return privPath, pubLine, nil
}

// makePrivateDir creates dir 0700, or makes an existing dir 0700. The key
// dir is the state dir, which may already exist with the umask's
// permissions: the runner makes its default journal dir, state/journal,
// before the key, and versions before this check left it 0755.
func makePrivateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create key dir: %w", err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("key dir: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("key dir %s is not a directory: remove it or set VMHARNESS_STATE_DIR", dir)
	}
	if st.Mode().Perm()&0o077 != 0 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("key dir %s is open to other users and cannot be made private (chmod 700 it, or set VMHARNESS_STATE_DIR): %w", dir, err)
		}
	}
	return nil
}

// readPublic derives the authorized_keys line from the private key at path,
// so a missing or stale .pub file cannot disagree with the key in use.
func readPublic(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	signer, err := ssh.ParsePrivateKey(data)
	if err != nil {
		return "", fmt.Errorf("parse %s (delete it to generate a new key): %w", path, err)
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(signer.PublicKey()))) + " " + Comment, nil
}

func writeAtomic(path string, data []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
