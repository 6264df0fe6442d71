package runner

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmharness/vmharness/harness"
	"github.com/vmharness/vmharness/harness/registry"
	"github.com/vmharness/vmharness/report"
)

// ciOptions are the flags of `vmharness run` for CI: infrastructure
// retries and the report directory.
type ciOptions struct {
	noRetry   bool
	reportDir string
}

func (c *ciOptions) register(fs *flag.FlagSet, env *cliEnv) {
	fs.BoolVar(&c.noRetry, "no-retry", env.getenv("VMHARNESS_NO_RETRY") == "1", "do not run the test again when QEMU itself died before the test had a result (env VMHARNESS_NO_RETRY=1)")
	fs.StringVar(&c.reportDir, "report-dir", env.getenv("VMHARNESS_REPORT_DIR"), "write the run's report (report.json, journal, console log) to DIR/NAME/ (env VMHARNESS_REPORT_DIR)")
}

// maxAttempts bounds the boots of one run: a run whose QEMU died before
// the test had a result (verdict.Outcome.Retry) gets one more.
const maxAttempts = 2

// attemptState is what one attempt (one testRun.run) leaves behind for
// runAttempts: its outcome, files and timings.
type attemptState struct {
	number     int
	name       string // the VM's registered name, once registered
	journalDir string
	unit       string
	outcome    *harness.Outcome
	exitCode   int
	files      []string // journal and console files kept
	retried    bool
	start, end time.Time
	wait, qemu time.Duration
	// slot is the admitted VM's place, held until QEMU has exited.
	slot interface{ Release() }
}

// failed records a harness error, unless the attempt already has an
// outcome.
func (a *attemptState) failed(reason string) {
	if a.outcome == nil {
		a.outcome = &harness.Outcome{ExitCode: harness.ExitHarnessError, Reason: reason}
	}
}

// finished records the judged outcome and what the run kept.
func (a *attemptState) finished(o harness.Outcome, qemu time.Duration, journalFiles []string, consoleLog string) {
	a.outcome, a.qemu = &o, qemu
	a.files = append([]string(nil), journalFiles...)
	if _, err := os.Stat(consoleLog); err == nil {
		a.files = append(a.files, consoleLog)
	}
}

// releaseSlot gives the VM slot back once QEMU has exited (a kept VM's
// QEMU exits only when the VM is stopped).
func (a *attemptState) releaseSlot() {
	if a.slot != nil {
		a.slot.Release()
	}
}

// runAttempts runs the test, once more if QEMU itself died before the
// test had a result (never for a test that failed, timed out or panicked),
// and writes the report.
func runAttempts(ctx context.Context, env *cliEnv, opts *runOptions) int {
	start := time.Now()
	var runs []*testRun
	var code int
	for n := 1; ; n++ {
		r := &testRun{env: env, opts: opts}
		r.attempt.number, r.attempt.start = n, time.Now()
		code = r.run(ctx)
		r.attempt.end, r.attempt.exitCode = time.Now(), code
		runs = append(runs, r)
		o := r.attempt.outcome
		if o == nil || !o.Retry || r.detached || ctx.Err() != nil {
			break
		}
		name := r.attempt.name
		if opts.ci.noRetry {
			r.logf("%s: QEMU itself failed before the test had a result; not retried (--no-retry)", name)
			break
		}
		if n >= maxAttempts {
			r.logf("%s: QEMU failed again on attempt %d of %d; giving up", name, n, maxAttempts)
			break
		}
		r.attempt.retried = true
		r.attempt.files = keepAsTry(r, n)
		kept := "nothing was kept of it"
		if len(r.attempt.files) > 0 {
			kept = "its files are kept as " + strings.Join(baseNames(r.attempt.files), ", ")
		}
		r.logf("%s: RETRY: QEMU itself failed before the test had a result (%s); running the test again (attempt %d of %d); %s",
			name, o.Reason, n+1, maxAttempts, kept)
	}
	last := runs[len(runs)-1]
	if len(runs) == 1 && last.attempt.name != "" {
		removeStaleTries(last.attempt.journalDir, last.attempt.name)
	}
	// A kept VM's keeper gets here when the VM is stopped; its output
	// goes to the keeper's log by then.
	if opts.ci.reportDir != "" {
		writeRunReport(last, runs, code, start)
	}
	return code
}

// tryName is what attempt n's file of the VM name keeps as its name once
// the run is retried: NAME.journal becomes NAME.tryN.journal.
func tryName(path, name string, n int) string {
	dir, base := filepath.Split(path)
	rest, ok := strings.CutPrefix(base, name)
	if !ok {
		return path
	}
	return filepath.Join(dir, fmt.Sprintf("%s.try%d%s", name, n, rest))
}

// keepAsTry renames a retried attempt's files out of the next attempt's
// way (a new run of a name replaces that name's journal).
func keepAsTry(r *testRun, n int) []string {
	var kept []string
	for _, f := range r.attempt.files {
		to := tryName(f, r.attempt.name, n)
		if err := os.Rename(f, to); err != nil {
			r.logf("%s: keeping %s of attempt %d: %v", r.attempt.name, f, n, err)
			continue
		}
		kept = append(kept, to)
	}
	return kept
}

// removeStaleTries removes the try files an earlier, retried run of name
// left in the journal directory, so they are not mistaken for this run's.
func removeStaleTries(dir, name string) {
	for n := 1; n < maxAttempts; n++ {
		stem := filepath.Join(dir, escapeGlobMeta(fmt.Sprintf("%s.try%d", name, n)))
		for _, pattern := range []string{stem + ".*", stem + "@*"} {
			m, _ := filepath.Glob(pattern)
			for _, f := range m {
				os.Remove(f)
			}
		}
	}
}

func escapeGlobMeta(s string) string {
	var b strings.Builder
	for _, r := range s {
		if strings.ContainsRune(`*?[\`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

func baseNames(paths []string) []string {
	out := make([]string, len(paths))
	for i, p := range paths {
		out[i] = filepath.Base(p)
	}
	return out
}

// writeRunReport writes DIR/NAME/ (package report) and prints its path.
func writeRunReport(last *testRun, runs []*testRun, code int, start time.Time) {
	opts := last.opts
	name := last.attempt.name
	if name == "" {
		name = fallbackName(last.env, opts)
	}
	end := time.Now()
	rep := report.Report{
		Name:           name,
		Unit:           last.attempt.unit,
		Result:         report.Result(code),
		ExitCode:       code,
		Start:          start.UTC(),
		End:            end.UTC(),
		ElapsedSeconds: end.Sub(start).Seconds(),
	}
	if o := last.attempt.outcome; o != nil {
		rep.Verdict = report.Verdict{ExitCode: o.ExitCode, Reason: o.Reason}
	} else {
		rep.Verdict = report.Verdict{ExitCode: code}
	}
	if opts.expectFailure != nil {
		rep.ExpectFailure = opts.expectFailure.String()
	}
	var files []string
	for _, r := range runs {
		a := r.attempt
		at := report.Attempt{
			Attempt:        a.number,
			Name:           a.name,
			Start:          a.start.UTC(),
			End:            a.end.UTC(),
			WaitSeconds:    a.wait.Seconds(),
			QEMUSeconds:    a.qemu.Seconds(),
			ElapsedSeconds: a.end.Sub(a.start).Seconds(),
			ExitCode:       a.exitCode,
			Retried:        a.retried,
			Files:          baseNames(a.files),
		}
		if a.outcome != nil {
			at.ExitCode, at.Reason = a.outcome.ExitCode, a.outcome.Reason
		}
		rep.Attempts = append(rep.Attempts, at)
		files = append(files, a.files...)
	}
	dir, err := report.Write(opts.ci.reportDir, rep, files)
	if dir == "" {
		last.logf("%s: report: %v", name, err)
		return
	}
	if err != nil {
		last.logf("%s: %v", name, err)
	}
	last.logf("%s: report: %s", name, dir)
}

// fallbackName names the report of a run that ended before its VM was
// registered (bad input, interrupted while waiting for a slot).
func fallbackName(env *cliEnv, opts *runOptions) string {
	name := opts.name
	if name == "" {
		name = strings.TrimSuffix(filepath.Base(opts.unitPath), ".service")
	}
	name = registry.SanitizeName(name)
	if it := env.getenv("MESON_TEST_ITERATION"); it != "" && it != "1" {
		name += "-iter" + it
	}
	return name
}
