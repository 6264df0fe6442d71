// Command vmharness runs a Meson project's integration tests in QEMU VMs,
// one VM per test, and offers the tools to inspect those VMs (ps, ssh,
// stop). See README.md; the code lives in runner/, harness/,
// journalremote/, sshproxy/ and images/.
//
//	go install github.com/vmharness/vmharness@latest
package main

import (
	"os"

	"github.com/vmharness/vmharness/runner"
)

func main() { os.Exit(runner.Main(os.Args[1:])) }
