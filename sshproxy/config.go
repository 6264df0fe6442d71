package sshproxy

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// ConfigName is the file name of the generated ssh config in the state dir.
const ConfigName = "ssh_config"

// Config describes the ssh_config fragment for harness VMs.
type Config struct {
	// Proxy is the absolute path of the vmharness binary.
	Proxy string
	// IdentityFile is the private key the VMs authorize.
	IdentityFile string
}

// Write writes the ssh_config fragment. The ProxyCommand passes %n, the host
// name as typed, rather than %h, which ssh lowercases (that would break
// socket paths and VM names with capitals).
func (c Config) Write(w io.Writer) error {
	for _, p := range []struct{ what, path string }{{"proxy", c.Proxy}, {"identity file", c.IdentityFile}} {
		if !filepath.IsAbs(p.path) {
			return fmt.Errorf("ssh config: %s path %q is not absolute", p.what, p.path)
		}
		if strings.ContainsAny(p.path, " \t\n\"'\\%") {
			return fmt.Errorf("ssh config: %s path %q contains characters ssh_config cannot quote", p.what, p.path)
		}
	}
	_, err := fmt.Fprintf(w, `# vmharness: reach harness VMs with ssh vsock/CID, machine/NAME,
# vsock-mux/PATH (hybrid vsock socket) or unix/PATH; scp needs vsock%%CID:PATH.
# Use it with: ssh -F THIS_FILE machine/NAME, or Include it in ~/.ssh/config.
Host vsock/* vsock-mux/* unix/* machine/* vsock%%* vsock-mux%%* unix%%* machine%%*
    ProxyCommand %s ssh-proxy %%n %%p
    ProxyUseFdpass yes
    CheckHostIP no
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    User root
    IdentityFile %s
    IdentitiesOnly yes
`, c.Proxy, c.IdentityFile)
	return err
}

// WriteFile writes the fragment to path atomically, leaving the file alone
// if it already has the right content.
func (c Config) WriteFile(path string) error {
	var buf bytes.Buffer
	if err := c.Write(&buf); err != nil {
		return err
	}
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, buf.Bytes()) {
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write ssh config: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after rename
	if _, err := tmp.Write(buf.Bytes()); err != nil {
		tmp.Close()
		return fmt.Errorf("write ssh config: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write ssh config: %w", err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("write ssh config: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write ssh config: %w", err)
	}
	return nil
}
