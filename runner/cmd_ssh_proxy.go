package runner

import (
	"context"
	"flag"
	"fmt"

	"github.com/vmharness/vmharness/sshproxy"
)

// cmdSSHProxy is the ssh ProxyCommand for harness VMs (see package
// sshproxy). Failures print one line and exit 255, like ssh itself.
func cmdSSHProxy(ctx context.Context, env *cliEnv, args []string) int {
	fs := flag.NewFlagSet("ssh-proxy", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	timeout := fs.Duration("timeout", sshproxy.DefaultTimeout, "give up connecting after this long")
	fs.Usage = func() {
		fmt.Fprintln(env.stderr, "usage: vmharness ssh-proxy [--timeout D] HOST [PORT]")
		fmt.Fprintln(env.stderr, "HOST is vsock/CID, machine/NAME, vsock-mux/PATH or unix/PATH; PORT defaults to 22.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return sshproxy.ExitFailure
	}
	if fs.NArg() < 1 || fs.NArg() > 2 {
		fs.Usage()
		return sshproxy.ExitFailure
	}
	host := fs.Arg(0)
	port, err := sshproxy.ParsePort(fs.Arg(1))
	if err != nil {
		fmt.Fprintf(env.stderr, "vmharness ssh-proxy: %s: %v\n", host, err)
		return sshproxy.ExitFailure
	}
	p := sshproxy.Proxy{
		Dialer: sshproxy.Dialer{Timeout: *timeout},
		Stdin:  env.stdin,
		Stdout: env.stdout,
	}
	// Only vsock/ and machine/ need the registry; a broken runtime dir must
	// not break unix/ and vsock-mux/.
	if reg, err := openRegistry(env); err == nil {
		p.Dialer.Resolver = reg
	} else if needsRegistry(host) {
		fmt.Fprintf(env.stderr, "vmharness ssh-proxy: %s: %v\n", host, err)
		return sshproxy.ExitFailure
	}
	if err := p.Run(ctx, host, port); err != nil {
		fmt.Fprintf(env.stderr, "vmharness ssh-proxy: %v\n", err)
		return sshproxy.ExitFailure
	}
	return exitPass
}

func needsRegistry(host string) bool {
	a, err := sshproxy.ParseAddress(host)
	return err == nil && (a.Kind == sshproxy.KindVsock || a.Kind == sshproxy.KindMachine)
}
