package main

import (
	"context"
	"fmt"
)

// TODO(owner of this file): replace this placeholder.
func cmdPs(ctx context.Context, env *cliEnv, args []string) int {
	fmt.Fprintln(env.stderr, "vmharness: not implemented yet")
	return exitHarnessError
}
