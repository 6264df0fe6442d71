// Command vsockbench measures the data paths of one vmharness VM: vsock
// throughput in both directions (through the transport's Listen and Dial,
// its Unix socket fallback and its hybrid CONNECT socket), connection setup
// latency, and the rate at which the guest journal reaches the journal file.
//
// It boots one VM from the cached default image, wired as `vmharness run`
// wires one (vsock transport, notify and journal listeners, credentials,
// harness.Machine), with a test unit that runs the guest side of every phase
// in turn. The guest script asks the host for each phase over a control
// port, and the host answers once its side is done, so the phases never
// overlap. Along with each rate it prints the CPU that QEMU, this process and
// systemd-journal-remote used during the phase, as a share of one host core,
// which tells a guest-bound phase from a host-bound one.
//
// Run it with bench/vsock.sh.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/vmharness/vmharness/harness"
	"github.com/vmharness/vmharness/harness/vsock"
	"github.com/vmharness/vmharness/images"
	"github.com/vmharness/vmharness/journalremote"
)

type options struct {
	sizeMiB    int64
	repeat     int
	sockBuf    int64
	streams    int
	blockSize  int
	dials      int
	lines      int
	conLines   int
	lineLen    int
	mode       string
	cpuModel   string
	timeout    time.Duration
	cpuProfile string
	keepDir    string
	verbose    bool
	forward    bool
}

func main() {
	var o options
	flag.Int64Var(&o.sizeMiB, "size", 256, "MiB per throughput stream")
	flag.IntVar(&o.repeat, "repeat", 3, "runs of each throughput phase; the table gives the median run")
	flag.IntVar(&o.streams, "streams", 4, "concurrent connections of the parallel guest→host phase")
	flag.Int64Var(&o.sockBuf, "sender-buffer", 4<<20, "vsock socket buffer in bytes of the guest's big-buffer sender (Linux's default is 256 KiB)")
	flag.IntVar(&o.blockSize, "block", 256<<10, "guest socat and sink block size in bytes")
	flag.IntVar(&o.dials, "dials", 200, "sequential Dials timed for the connection latency")
	flag.IntVar(&o.lines, "lines", 20000, "journal lines the guest logs through systemd-cat (journal only)")
	flag.IntVar(&o.conLines, "console-lines", 1000, "journal lines the guest logs on the unit's stdout, which the harness copies to the serial console")
	flag.IntVar(&o.lineLen, "line-len", 100, "bytes per journal line")
	flag.StringVar(&o.mode, "vsock", string(vsock.ModeUser), "vsock backend: user, kernel or auto")
	flag.StringVar(&o.cpuModel, "cpu", "", "guest CPU model, QEMU's -cpu value (default: the harness's choice)")
	flag.DurationVar(&o.timeout, "timeout", 30*time.Minute, "bound on the whole VM run")
	flag.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of this process during the measured phases to `file`")
	flag.StringVar(&o.keepDir, "keep", "", "keep the journal and console log in `dir`")
	flag.BoolVar(&o.forward, "journal-forward", true, "forward the guest journal to the host (false: time the guest's journald alone)")
	flag.BoolVar(&o.verbose, "v", false, "log the transport's and QEMU's messages")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	code, err := run(ctx, o, os.Stdout)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vsockbench: %v\n", err)
	}
	os.Exit(code)
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "vsockbench: "+format+"\n", args...)
}

// run boots the VM, runs the phases and prints the results to out. It
// returns 0 when every phase ran and every check passed.
func run(ctx context.Context, o options, out io.Writer) (int, error) {
	mode, err := vsock.ParseMode(o.mode)
	if err != nil {
		return 2, err
	}
	if o.sizeMiB <= 0 || o.repeat <= 0 || o.sockBuf <= 0 || o.streams <= 0 || o.dials <= 0 || o.lines <= 0 || o.conLines <= 0 || o.lineLen < 30 || o.blockSize <= 0 {
		return 2, errors.New("-size, -repeat, -sender-buffer, -streams, -dials, -lines, -console-lines and -block must be positive and -line-len at least 30")
	}
	recipe, err := images.Default()
	if err != nil {
		return 1, err
	}
	img, releaseImage, err := images.Acquire(ctx, os.Getenv, recipe, os.Stderr)
	if err != nil {
		return 1, err
	}
	defer releaseImage()
	accel, err := harness.DetectAccel(os.Getenv)
	if err != nil {
		return 1, err
	}

	workDir, err := os.MkdirTemp("", "vsockbench-")
	if err != nil {
		return 1, err
	}
	defer os.RemoveAll(workDir)
	outDir := workDir
	if o.keepDir != "" {
		if err := os.MkdirAll(o.keepDir, 0o755); err != nil {
			return 1, err
		}
		outDir = o.keepDir
	}

	quiet := func(string, ...any) {}
	transportLog := quiet
	if o.verbose {
		transportLog = logf
	}
	transport, err := vsock.New(ctx, vsock.Config{Mode: mode, RuntimeDir: workDir, Logf: transportLog})
	if err != nil {
		return 1, err
	}
	defer transport.Close()

	journalL, journalPort, err := vsock.ListenFree(transport)
	if err != nil {
		return 1, fmt.Errorf("listening for the guest's journal: %w", err)
	}
	ctlL, err := transport.Listen(ctlPort)
	if err != nil {
		return 1, err
	}
	defer ctlL.Close()
	g2hL, err := transport.Listen(g2hPort)
	if err != nil {
		return 1, err
	}
	defer g2hL.Close()
	var g2hUnixL net.Listener
	if transport.Kind() == vsock.KindUser {
		// A guest connection to a host port nobody Listens on goes to
		// this Unix socket (see package vsock).
		g2hUnixL, err = net.Listen("unix", fmt.Sprintf("%s_%d", transport.HybridSocket(), g2hUnixPort))
	} else {
		g2hUnixL, err = transport.Listen(g2hUnixPort)
	}
	if err != nil {
		return 1, err
	}
	defer g2hUnixL.Close()

	b := &bench{
		transport:    transport,
		size:         o.sizeMiB << 20,
		senderBuffer: o.sockBuf,
		dials:        o.dials,
		logf:         logf,
		profile:      o.cpuProfile,
		g2hDone:      make(chan throughput, 1),
		g2hUnixDone:  make(chan throughput, 1),
		g2hParDone:   make(chan throughput, 1),
		parallel:     o.streams,
		forwarding:   o.forward,
		journalGuest: make(map[string]time.Duration),
	}
	b.journal = newJournalWatch(b.sample, spanJournal, spanConsole)
	go b.receive(g2hL, "guest→host, vsock Listen", 1, b.g2hDone)
	fallbackName := "guest→host, Unix socket fallback"
	if transport.Kind() != vsock.KindUser {
		fallbackName = "guest→host, vsock Listen (second port)"
	}
	go b.receive(g2hUnixL, fallbackName, 1, b.g2hUnixDone)
	g2hParL, err := transport.Listen(g2hParPort)
	if err != nil {
		return 1, err
	}
	defer g2hParL.Close()
	go b.receive(g2hParL, "guest→host, vsock Listen, parallel", o.streams, b.g2hParDone)

	collector, err := journalremote.New(journalremote.Config{
		JournalPath: filepath.Join(outDir, "vsockbench.journal"),
		TestUnit:    unitName,
	})
	if err != nil {
		return 1, err
	}
	if d := collector.Degraded(); d != nil {
		collector.Close()
		return 1, fmt.Errorf("the journal phase needs systemd-journal-remote: %w", d)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		collector.Serve(context.WithoutCancel(ctx), b.journal.listener(journalL))
	}()

	script := guestScript(guestParams{Bytes: b.size, BlockSize: o.blockSize, Lines: o.lines, ConsoleLines: o.conLines, LineLen: o.lineLen, Repeat: o.repeat, SenderBuffer: o.sockBuf, Streams: o.streams})
	creds := []harness.Credential{
		{Name: scriptCredName, Value: []byte(script)},
		{Name: "journal.storage", Value: []byte("volatile")},
	}
	if o.forward {
		creds = append(creds, harness.Credential{Name: "journal.forward_to_socket", Value: []byte(fmt.Sprintf("vsock-stream:%d:%d", vsock.HostCID, journalPort))})
	}
	m, err := harness.NewMachine(ctx, harness.Config{
		Name:        "vsockbench",
		Image:       bootImage(img),
		Unit:        harness.TestUnit{Name: unitName, Text: []byte(unitText)},
		Credentials: creds,
		Accel:       accel,
		CPUModel:    o.cpuModel,
		WorkDir:     workDir,
		ConsoleLog:  filepath.Join(outDir, "vsockbench.console.log"),
		Transport:   transport,
		Timeout:     o.timeout,
		BootTimeout: 45 * time.Second * accel.TimeoutScale(),
		Logf:        logf,
	})
	if err != nil {
		collector.Close()
		return 1, err
	}
	go b.serveControl(ctx, ctlL)

	logf("booting on %s, cpu %s, vsock %s; each throughput phase moves %d MiB", accel, m.CPU(), transport.Kind(), o.sizeMiB)
	res, err := m.Run(ctx, func(pid int) { b.qemuPID.Store(int64(pid)) })
	b.stopProfile()
	if err != nil {
		collector.Close()
		return 1, err
	}
	journalErr := collector.Close()
	<-served
	summary := collector.Summary()

	b.mu.Lock()
	defer b.mu.Unlock()
	report := &reportData{
		opts: o, accel: accel, cpu: m.CPU(), kind: transport.Kind(), outcome: res.Outcome, elapsed: res.Elapsed,
		baseline: b.baseline, streams: b.streams, lat: b.lat,
		unitLines: summary.UnitLinesTotal, emptyRequests: b.emptyRequests,
	}
	problems := append([]string(nil), b.problems...)
	for _, sp := range []spanReport{
		{name: spanJournal, label: "journal: systemd-cat→journal file", prefix: journalPrefix, want: o.lines},
		{name: spanConsole, label: "journal: unit stdout (+console)→file", prefix: consolePrefix, want: o.conLines},
	} {
		sp.guest = b.journalGuest[sp.name]
		if !o.forward {
			report.spans = append(report.spans, sp)
			continue
		}
		sp.res, sp.ok = b.journal.result(sp.name)
		if !sp.ok {
			problems = append(problems, fmt.Sprintf("journal %s: the begin and end markers were not both seen", sp.name))
		}
		var err error
		sp.distinct, sp.total, err = countJournalLines(summary.JournalFiles, sp.prefix, sp.want)
		if err != nil {
			problems = append(problems, fmt.Sprintf("journal %s: reading the journal back: %v", sp.name, err))
		} else if sp.distinct != sp.want {
			problems = append(problems, fmt.Sprintf("journal %s: %d of %d lines are in the journal file", sp.name, sp.distinct, sp.want))
		}
		report.spans = append(report.spans, sp)
	}
	if !res.Outcome.Passed() {
		problems = append(problems, "the guest side failed: "+res.Outcome.Reason)
		for _, l := range res.ConsoleTail {
			logf("console: %s", l)
		}
		for _, l := range strings.Split(res.QEMUStderr, "\n") {
			if l != "" {
				logf("qemu: %s", l)
			}
		}
	}
	if !b.finished {
		problems = append(problems, "the guest script did not get to its end")
	}
	if journalErr != nil {
		problems = append(problems, "journal: "+journalErr.Error())
	}
	report.print(out)
	for _, p := range problems {
		fmt.Fprintf(out, "PROBLEM: %s\n", p)
	}
	if o.keepDir != "" {
		fmt.Fprintf(out, "journal and console log kept in %s\n", o.keepDir)
	}
	if len(problems) > 0 {
		return 1, nil
	}
	return 0, nil
}

type reportData struct {
	opts      options
	accel     harness.Accel
	cpu       string
	kind      vsock.Kind
	outcome   harness.Outcome
	elapsed   time.Duration
	baseline  time.Duration
	streams   []throughput
	lat       latency
	spans     []spanReport
	unitLines int64
	// emptyRequests counts control connections without a request.
	emptyRequests int
}

// spanReport is one journal span's rate and its check against the file.
type spanReport struct {
	name, label, prefix string
	want                int
	res                 journalResult
	ok                  bool
	distinct, total     int
	guest               time.Duration // the guest's own time: logging until journald took every line in
}

func (r *reportData) print(out io.Writer) {
	host, _ := os.Hostname()
	fmt.Fprintf(out, "vsockbench %s on %s: accel %s, cpu %s, vsock %s, %d host CPUs, VM run %.1fs\n",
		time.Now().UTC().Format(time.RFC3339), host, r.accel.Name, r.cpu, r.kind, runtime.NumCPU(), r.elapsed.Seconds())
	fmt.Fprintf(out, "MB = 10^6 bytes; CPU columns: share of one host core during the phase: QEMU (all threads), QEMU wait (its threads runnable but waiting for a CPU: other load on the machine), host (this process: vsock device, relays, collector), j-remote (systemd-journal-remote)\n\n")
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "phase\tamount\ttime\trate\tmin–max\tQEMU\tQEMU wait\thost\tj-remote\t\n")
	if r.baseline > 0 {
		size := r.opts.sizeMiB << 20
		fmt.Fprintf(tw, "guest-only: socat /dev/zero→/dev/null\t%d MiB\t%.2fs\t%.1f MB/s\t\t\t\t\t\t\n",
			r.opts.sizeMiB, r.baseline.Seconds(), float64(size)/r.baseline.Seconds()/1e6)
	}
	phases := summarize(r.streams)
	for _, ph := range phases {
		t := ph.median
		rate := fmt.Sprintf("%.1f MB/s", t.mbps())
		if ph.failed > 0 {
			rate = fmt.Sprintf("%d of %d FAILED", ph.failed, ph.runs)
		}
		fmt.Fprintf(tw, "%s\t%d × %d MiB\t%.2fs\t%s\t%s\t%s\t%s\t%s\t%s\t\n", t.name, ph.runs, t.want>>20, t.elapsed.Seconds(), rate,
			ph.spread(), pct(t.cpu.qemu), pct(t.cpu.qemuWait), pct(t.cpu.self), pct(t.cpu.children))
	}
	if d := sortedCopy(r.lat.dials); len(d) > 0 {
		fmt.Fprintf(tw, "connect: vsock Dial, sequential\t%d dials\tmedian %s\tp95 %s\t\t%s\t%s\t%s\t%s\t\n",
			len(d), ms(percentile(d, 50)), ms(percentile(d, 95)), pct(r.lat.cpu.qemu), pct(r.lat.cpu.qemuWait), pct(r.lat.cpu.self), pct(r.lat.cpu.children))
	}
	for _, sp := range r.spans {
		if sp.guest > 0 {
			fmt.Fprintf(tw, "  guest: logging until journald has it all\t%d lines\t%.2fs\t%.0f lines/s\t\t\t\t\t\t\n",
				sp.want, sp.guest.Seconds(), float64(sp.want)/sp.guest.Seconds())
		}
		if !sp.ok {
			continue
		}
		j := sp.res
		secs := j.elapsed.Seconds()
		msg := float64(sp.want*(r.opts.lineLen+1)) / 1e6
		fmt.Fprintf(tw, "%s\t%d lines\t%.2fs\t%.0f lines/s\t\t%s\t%s\t%s\t%s\t\n",
			sp.label, sp.want, secs, float64(sp.want)/secs, pct(j.cpu.qemu), pct(j.cpu.qemuWait), pct(j.cpu.self), pct(j.cpu.children))
		fmt.Fprintf(tw, "  message / export-format bytes\t%.1f / %.1f MB\t\t%.2f / %.2f MB/s\t\t\t\t\t\t\n",
			msg, float64(j.bytes)/1e6, msg/secs, float64(j.bytes)/secs/1e6)
	}
	tw.Flush()
	if len(r.lat.dials) > 0 {
		d := sortedCopy(r.lat.dials)
		fmt.Fprintf(out, "\nconnect latency: min %s, median %s, p95 %s, max %s over %d dials\n",
			ms(d[0]), ms(percentile(d, 50)), ms(percentile(d, 95)), ms(d[len(d)-1]), len(d))
	}
	for _, sp := range r.spans {
		if !r.opts.forward {
			fmt.Fprintf(out, "journal %s: not forwarded to the host (-journal-forward=false)\n", sp.name)
			continue
		}
		fmt.Fprintf(out, "journal check %s: %d of %d lines in the journal file (%d with the prefix)\n", sp.name, sp.distinct, sp.want, sp.total)
	}
	fmt.Fprintf(out, "collector summary: %d lines of %s\n", r.unitLines, unitName)
	for _, ph := range phases {
		t := ph.median
		var notes []string
		if t.note != "" {
			notes = append(notes, t.note)
		}
		// What the host side costs per byte bounds the rate it could
		// carry with a whole core, whatever the guest does.
		if t.err == nil && t.cpu.self > 0 && t.got > 0 {
			cpuPerMB := t.cpu.self * t.elapsed.Seconds() / (float64(t.got) / 1e6)
			notes = append(notes, fmt.Sprintf("this process used %.2f ms CPU per MB (one core would carry %.0f MB/s)", cpuPerMB*1e3, 1/cpuPerMB))
		}
		if len(notes) > 0 {
			fmt.Fprintf(out, "%s, median run: %s\n", t.name, strings.Join(notes, "; "))
		}
	}
	if r.emptyRequests > 0 {
		fmt.Fprintf(out, "control connections without a request (the guest's connect timed out and it retried): %d\n", r.emptyRequests)
	}
	fmt.Fprintf(out, "guest outcome: exit %d %s\n", r.outcome.ExitCode, strings.TrimSpace(r.outcome.Reason))
}

func pct(f float64) string { return fmt.Sprintf("%.0f%%", f*100) }

func ms(d time.Duration) string { return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond)) }

// bootImage boots img as the runner does (runner's bootImage).
func bootImage(img *images.Image) harness.BootImage {
	b := harness.BootImage{Kernel: img.Kernel, KernelELF: img.KernelELF, Rootfs: img.Rootfs, RootfsFormat: img.RootfsFormat,
		RootDevice: img.Manifest.RootDevice, RootCmdline: img.Manifest.KernelCmdline}
	if img.Manifest.BootsInitrd() {
		b.Initrd = img.Initrd
	}
	return b
}
