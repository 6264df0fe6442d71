// Package journalremote turns the journal a guest streams to the host into a
// journal file that journalctl reads, and summarises it for the test output.
//
// The guest's journald (systemd >= 256) is started with the credential
// journal.forward_to_socket=vsock-stream:2:PORT. It connects to the host and
// writes every entry in Journal Export Format (systemd's
// docs/JOURNAL_EXPORT_FORMATS.md), reconnecting after a reboot, so one test
// can produce several connections. A Collector owns everything for one test:
//
//	c, err := journalremote.New(journalremote.Config{
//		JournalPath: filepath.Join(dir, test+".journal"),
//		TestUnit:    "foo.service",
//	})
//	if err != nil { ... }                      // bad path: harness error
//	if err := c.Degraded(); err != nil {       // no systemd-journal-remote
//		if userAskedForJournal { ... exit 99 } // errors.Is(err, ErrJournalRemoteMissing)
//		fmt.Fprintln(stderr, "vmharness:", err) // print once
//	}
//	go c.Serve(ctx, listener)                  // takes ownership of listener
//	... boot the VM, wait for it to stop ...
//	err = c.Close()                            // drains, waits for the file
//	policy, _ := journalremote.ParsePolicy(flagOrEnv) // --keep-journal / VMHARNESS_KEEP_JOURNAL
//	if policy.Keep(journalremote.OutcomeFromExitCode(code)) {
//		journalremote.WriteSummary(stderr, c.Summary())
//	} else {
//		c.Remove()
//	}
//
// # What reaches the file
//
// Each connection is parsed in Go (Parser: streaming, bounded by Limits, an
// untrusted guest can make its own stream fail but nothing else) and whole
// entries are fed to one long-lived `systemd-journal-remote --output=FILE
// --split-mode=none -` per test, so all connections and boots land in the
// same file and a connection that ends mid-entry cannot corrupt the next
// one. Entries are rewritten on the way (see appendForJournalRemote): every
// entry gets a valid __REALTIME_TIMESTAMP (journald sends one; otherwise the
// host's receive time), because systemd-journal-remote 252 drops entries
// without one, aborts its whole input on an unparsable timestamp or
// _BOOT_ID, and silently reuses the previous entry's values for missing
// ones. An entry the guest could not finish (its connection ended, or a
// field was over Limits.MaxFieldSize) is kept with the fields that arrived
// and VMHARNESS_TRUNCATED set. Close waits until systemd-journal-remote has
// exited and checks that it wrote as many entries as it was sent.
//
// systemd-journal-remote 252 (Debian bookworm) has no size options; it
// renames a full file to "<test>@....journal" and starts a new one (after
// about 175,000 distinct field values or 128 MiB), deleting nothing.
// Collector.Files and Summary.JournalctlCommand include such files, and
// Remove deletes them.
//
// When systemd-journal-remote is missing the same sanitised stream is kept
// in "<test>.export", whole entries only; systemd-journal-remote converts it
// later (journalctl cannot import export format). If it dies mid-test the
// rest goes to the same file and Close reports it.
//
// # What the runner shows
//
// Summary collects, while entries pass, the last lines of Config.TestUnit
// (matched like `journalctl -u`: _SYSTEMD_UNIT, PID 1's UNIT=, privileged
// OBJECT_SYSTEMD_UNIT=, core dumps), kernel splats and unit failures from
// anywhere in the journal, the boots seen and any stream trouble; and, for
// the verdict, the test unit's result as PID 1 logged it, the core dumps
// systemd-coredump logged and the sanitizer reports in any message
// (findings.go). WriteSummary prints it with the journalctl command to
// open the file.
// Guest text is escaped before it reaches a terminal.
package journalremote
