package runner

import (
	"context"
	"errors"
	"io"
	"net"

	"github.com/vmharness/vmharness/harness"
	"github.com/vmharness/vmharness/harness/verdict"
	"github.com/vmharness/vmharness/journalremote"
)

// journalRun is the guest journal collection of one run: a Collector
// serving the journal listener until the VM is gone.
type journalRun struct {
	// explicit is true when the user asked for journals (--journal-dir);
	// then a missing systemd-journal-remote is a harness error.
	explicit  bool
	collector *journalremote.Collector
	served    chan struct{}
	stop      context.CancelFunc
}

func startJournal(ctx context.Context, r *testRun, l net.Listener, path, unit string, explicit bool) (*journalRun, error) {
	c, err := journalremote.New(journalremote.Config{
		JournalPath:       path,
		JournalRemotePath: r.env.getenv("VMHARNESS_JOURNAL_REMOTE"),
		TestUnit:          unit,
		MarkerIdentifier:  verdict.JournalMarkerIdentifier,
	})
	if err != nil {
		return nil, err
	}
	if d := c.Degraded(); d != nil {
		if explicit {
			c.Close()
			c.Remove()
			return nil, d
		}
		r.logf("%v", d)
	}
	serveCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	j := &journalRun{explicit: explicit, collector: c, served: make(chan struct{}), stop: stop}
	go func() {
		defer close(j.served)
		err := c.Serve(serveCtx, l)
		if err != nil && !errors.Is(err, journalremote.ErrClosed) && !errors.Is(err, context.Canceled) {
			r.logf("journal: %v", err)
		}
	}()
	return j, nil
}

// finish waits until everything the guest sent is in the journal file.
// Call it once QEMU has exited.
func (j *journalRun) finish() error {
	err := j.collector.Close()
	j.stop()
	<-j.served
	return err
}

// hasMarker reports whether the journal marker has arrived.
func (j *journalRun) hasMarker(marker string) bool { return j.collector.HasMarker(marker) }

// abort ends collection after a harness failure; the files are removed.
func (j *journalRun) abort() {
	j.finish()
	j.collector.Remove()
}

func (j *journalRun) remove() { j.collector.Remove() }

// unitResult is the test unit's result as its journal recorded it; call
// it after finish.
func (j *journalRun) unitResult() verdict.JournalUnitResult {
	r := j.collector.Summary().UnitResult
	return verdict.JournalUnitResult{Found: r.Found, Result: verdict.UnitResult{Result: r.Result, ExitCode: r.ExitCode, ExitStatus: r.ExitStatus}}
}

func (j *journalRun) summary(w io.Writer) {
	journalremote.WriteSummary(w, j.collector.Summary())
}

// keepPolicy decides from the outcome whether the journal stays.
type keepPolicy struct{ p journalremote.Policy }

func parseKeepPolicy(s string) (keepPolicy, error) {
	p, err := journalremote.ParsePolicy(s)
	return keepPolicy{p}, err
}

func (k keepPolicy) keep(o harness.Outcome) bool {
	return k.p.Keep(journalremote.OutcomeFromExitCode(o.ExitCode))
}
