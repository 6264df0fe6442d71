package runner

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/vmharness/vmharness/harness/registry"
	"github.com/vmharness/vmharness/harness/sshkey"
)

// cmdPs lists the live harness VMs of this user.
func cmdPs(ctx context.Context, env *cliEnv, args []string) int {
	fs := flag.NewFlagSet("ps", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	asJSON := fs.Bool("json", false, "print the registry entries as JSON")
	fs.Usage = func() {
		fmt.Fprintln(env.stderr, "usage: vmharness ps [--json]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return exitHarnessError
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return exitHarnessError
	}
	reg, err := openRegistry(env)
	if err != nil {
		fmt.Fprintf(env.stderr, "vmharness ps: %v\n", err)
		return exitHarnessError
	}
	vms, err := reg.List()
	if err != nil {
		fmt.Fprintf(env.stderr, "vmharness ps: %v\n", err)
		return exitHarnessError
	}
	if *asJSON {
		if vms == nil {
			vms = []registry.Entry{}
		}
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(vms); err != nil {
			fmt.Fprintf(env.stderr, "vmharness ps: %v\n", err)
			return exitHarnessError
		}
		return exitPass
	}
	writePs(env, vms, time.Now())
	return exitPass
}

func writePs(env *cliEnv, vms []registry.Entry, now time.Time) {
	tw := tabwriter.NewWriter(env.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tCID\tTRANSPORT\tPID\tUPTIME\tSTATE\tJOURNAL")
	for _, e := range vms {
		pid := "-"
		if e.QEMUPID > 0 {
			pid = fmt.Sprint(e.QEMUPID)
		}
		journal := e.JournalPath
		if journal == "" {
			journal = "-"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\n", e.Name, e.CID, e.Transport, pid,
			now.Sub(e.StartTime).Round(time.Second), vmState(e), journal)
	}
	tw.Flush()
}

// vmState is the STATE column of a live VM.
func vmState(e registry.Entry) string {
	switch {
	case e.QEMUPID == 0:
		return "starting"
	case !e.QEMUAlive():
		// QEMU has exited; its runner still cleans up and holds the name.
		return "stopping"
	case e.Kept():
		return "kept until " + e.KeptUntil.Local().Format("15:04")
	}
	return "running"
}

// openRegistry opens the VM registry in the runtime dir the environment
// selects (see registry.RuntimeDir).
func openRegistry(env *cliEnv) (*registry.Registry, error) {
	return registry.Open(registry.RuntimeDir(env.getenv))
}

// stateDir returns the per-user state dir holding the ssh key and config.
func stateDir(env *cliEnv) (string, error) {
	return sshkey.StateDir(env.getenv)
}
