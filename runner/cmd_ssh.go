package runner

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/vmharness/vmharness/harness/registry"
	"github.com/vmharness/vmharness/sshproxy"
)

// cmdSSH replaces vmharness with `ssh -F <generated config> machine/NAME
// [CMD...]`, so an interactive session gets ssh's own terminal handling.
func cmdSSH(ctx context.Context, env *cliEnv, args []string) int {
	argv, err := sshArgv(env, args)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitHarnessError
		}
		fmt.Fprintf(env.stderr, "vmharness ssh: %v\n", err)
		var unknown unknownVMError
		if errors.As(err, &unknown) {
			return exitFail
		}
		return exitHarnessError
	}
	if err := syscall.Exec(argv[0], argv, os.Environ()); err != nil {
		fmt.Fprintf(env.stderr, "vmharness ssh: exec %s: %v\n", argv[0], err)
	}
	return exitHarnessError
}

// sshArgv returns the ssh command line for `vmharness ssh args...`.
func sshArgv(env *cliEnv, args []string) ([]string, error) {
	fs := flag.NewFlagSet("ssh", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	fs.Usage = func() {
		fmt.Fprintln(env.stderr, "usage: vmharness ssh NAME|CID [--] [CMD...]")
		fmt.Fprintln(env.stderr, "Opens an ssh session as root to a running harness VM (see vmharness ps).")
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() < 1 {
		fs.Usage()
		return nil, flag.ErrHelp
	}
	target, cmd := fs.Arg(0), fs.Args()[1:]
	if len(cmd) > 0 && cmd[0] == "--" {
		cmd = cmd[1:]
	}

	reg, err := openRegistry(env)
	if err != nil {
		return nil, err
	}
	host, err := sshHost(reg, target)
	if err != nil {
		return nil, err
	}
	ssh, err := exec.LookPath("ssh")
	if err != nil {
		return nil, fmt.Errorf("the OpenSSH client is needed (install openssh-client): %w", err)
	}
	cfg, err := sshConfig(env)
	if err != nil {
		return nil, err
	}
	dir, err := stateDir(env)
	if err != nil {
		return nil, err
	}
	cfgPath := filepath.Join(dir, sshproxy.ConfigName)
	if err := cfg.WriteFile(cfgPath); err != nil {
		return nil, err
	}
	argv := []string{ssh, "-F", cfgPath, host}
	if len(cmd) > 0 {
		// ssh joins its command words with spaces for the remote shell;
		// "--" keeps words starting with "-" away from ssh's own options.
		argv = append(argv, "--")
		argv = append(argv, cmd...)
	}
	return argv, nil
}

// sshHost maps a VM name, or a CID, to the ssh host name for it.
func sshHost(reg *registry.Registry, target string) (string, error) {
	if _, err := reg.Lookup(target); err == nil {
		return "machine/" + target, nil
	} else if !errors.Is(err, registry.ErrNotFound) {
		return "", err
	}
	if cid, err := strconv.ParseUint(target, 10, 32); err == nil {
		if _, err := reg.LookupCID(uint32(cid)); err == nil {
			return fmt.Sprintf("vsock/%d", cid), nil
		}
	}
	return "", unknownVMError(target)
}

// unknownVMError is a VM name or CID no running harness VM has.
type unknownVMError string

func (n unknownVMError) Error() string {
	return fmt.Sprintf("no running harness VM is called %q (see vmharness ps)", string(n))
}
