package journalremote_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/vmharness/vmharness/journalremote"
)

// The runner's use of a Collector for one test. The listener is the host
// side of the guest's journal.forward_to_socket=vsock-stream:2:PORT.
func ExampleCollector() {
	run := func(ctx context.Context, dir string, l net.Listener, keep string, journalRequired bool, bootAndWait func() int) int {
		c, err := journalremote.New(journalremote.Config{
			JournalPath: filepath.Join(dir, "foo.journal"),
			TestUnit:    "foo.service",
		})
		if err != nil {
			fmt.Fprintln(os.Stderr, "vmharness:", err)
			return 99
		}
		if err := c.Degraded(); err != nil {
			if journalRequired && errors.Is(err, journalremote.ErrJournalRemoteMissing) {
				c.Close()
				fmt.Fprintln(os.Stderr, "vmharness:", err)
				return 99
			}
			fmt.Fprintln(os.Stderr, "vmharness:", err)
		}
		go c.Serve(ctx, l)

		code := bootAndWait() // returns once QEMU has exited

		if err := c.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "vmharness: journal:", err)
		}
		policy, err := journalremote.ParsePolicy(keep)
		if err != nil {
			fmt.Fprintln(os.Stderr, "vmharness:", err)
			return 99
		}
		if policy.Keep(journalremote.OutcomeFromExitCode(code)) {
			journalremote.WriteSummary(os.Stderr, c.Summary())
		} else if err := c.Remove(); err != nil {
			fmt.Fprintln(os.Stderr, "vmharness:", err)
		}
		return code
	}
	_ = run
}
