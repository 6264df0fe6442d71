// Package runner is the vmharness command line: it runs integration tests
// in QEMU VMs booted from a shared cached image, and offers the tools to
// inspect those VMs (ps, ssh, stop). The binary is the module's root
// package (go install github.com/vmharness/vmharness@latest).
//
// Exit codes follow Meson's convention: 0 pass, 77 skip, 99 harness error,
// anything else a test failure.
package runner

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// Exit codes shared by every subcommand.
const (
	exitPass         = 0
	exitFail         = 1
	exitSkip         = 77
	exitHarnessError = 99
)

// command is one vmharness subcommand. It gets its arguments (without the
// subcommand name) and returns the process exit code.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, env *cliEnv, args []string) int
}

// cliEnv is what a subcommand may touch of the process: its streams and
// environment, so tests can run subcommands in-process.
type cliEnv struct {
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	getenv func(string) string
}

func commands() []command {
	return []command{
		{"run", "boot a VM and run one test unit in it", cmdRun},
		{"image", "build or locate the cached base image (image build), remove old ones (image prune)", cmdImage},
		{"ps", "list running harness VMs", cmdPs},
		{"ssh", "open an ssh session to a harness VM: ssh NAME [-- CMD...]", cmdSSH},
		{"ssh-proxy", "ssh ProxyCommand for vsock/CID, vsock-mux/PATH, unix/PATH, machine/NAME", cmdSSHProxy},
		{"ssh-config", "print an ssh_config fragment for harness VMs", cmdSSHConfig},
		{"stop", "stop a kept harness VM and clean up after it", cmdStop},
		{"shard", "print the test names of one shard of a Meson suite: shard --index I --total N [-C BUILD] [--suite S]", cmdShard},
	}
}

// Main runs the vmharness command line (args without the program name)
// with the process's own streams and environment and returns the exit
// code. The vmharness binary is the module's root package, which calls it.
func Main(args []string) int {
	env := &cliEnv{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv}
	if err := prepareKeeperProcess(env.getenv); err != nil {
		fmt.Fprintf(env.stderr, "vmharness: %v\n", err)
		return exitHarnessError
	}
	return dispatch(env, args)
}

func dispatch(env *cliEnv, args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(env.stderr)
		if len(args) == 0 {
			return exitHarnessError
		}
		return exitPass
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		// SIGTERM is what Meson sends on timeout; SIGINT is a user's ^C. Both
		// cancel the context so every resource owner can clean up.
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		return c.run(ctx, env, args[1:])
	}
	fmt.Fprintf(env.stderr, "vmharness: unknown command %q (see vmharness help)\n", args[0])
	return exitHarnessError
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: vmharness COMMAND [ARGS]")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-11s %s\n", c.name, c.summary)
	}
}
