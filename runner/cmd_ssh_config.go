package runner

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vmharness/vmharness/harness/sshkey"
	"github.com/vmharness/vmharness/sshproxy"
)

// cmdSSHConfig prints (or writes) the ssh_config fragment that routes
// vsock/, machine/, vsock-mux/ and unix/ host names through ssh-proxy.
func cmdSSHConfig(ctx context.Context, env *cliEnv, args []string) int {
	fs := flag.NewFlagSet("ssh-config", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	output := fs.String("output", "", "write the fragment to `FILE` instead of stdout")
	fs.Usage = func() {
		fmt.Fprintln(env.stderr, "usage: vmharness ssh-config [--output FILE]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return exitHarnessError
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return exitHarnessError
	}
	cfg, err := sshConfig(env)
	if err != nil {
		fmt.Fprintf(env.stderr, "vmharness ssh-config: %v\n", err)
		return exitHarnessError
	}
	if *output != "" {
		path, err := filepath.Abs(*output)
		if err == nil {
			err = cfg.WriteFile(path)
		}
		if err != nil {
			fmt.Fprintf(env.stderr, "vmharness ssh-config: %v\n", err)
			return exitHarnessError
		}
		return exitPass
	}
	if err := cfg.Write(env.stdout); err != nil {
		fmt.Fprintf(env.stderr, "vmharness ssh-config: %v\n", err)
		return exitHarnessError
	}
	return exitPass
}

// sshConfig returns the ssh config for this binary and the user's key,
// generating the key if needed.
func sshConfig(env *cliEnv) (sshproxy.Config, error) {
	dir, err := stateDir(env)
	if err != nil {
		return sshproxy.Config{}, err
	}
	key, _, err := sshkey.EnsureKey(dir)
	if err != nil {
		return sshproxy.Config{}, err
	}
	self, err := os.Executable()
	if err != nil {
		return sshproxy.Config{}, fmt.Errorf("locate the vmharness binary: %w", err)
	}
	if resolved, err := filepath.EvalSymlinks(self); err == nil {
		self = resolved
	}
	key, err = filepath.Abs(key)
	if err != nil {
		return sshproxy.Config{}, err
	}
	return sshproxy.Config{Proxy: self, IdentityFile: key}, nil
}
