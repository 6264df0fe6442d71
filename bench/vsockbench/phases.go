package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmharness/vmharness/harness/vsock"
)

// throughput is one measured stream.
type throughput struct {
	name    string
	want    int64 // bytes the stream should carry
	got     int64 // bytes that arrived
	elapsed time.Duration
	cpu     cpuUse
	err     error
	note    string
}

func (t throughput) mbps() float64 {
	if t.elapsed <= 0 {
		return 0
	}
	return float64(t.got) / t.elapsed.Seconds() / 1e6
}

// latency is the connection setup phase.
type latency struct {
	dials []time.Duration
	cpu   cpuUse
	err   error
}

// bench is the host side: it answers the guest script's control requests
// and runs the host end of each phase.
type bench struct {
	transport vsock.Transport
	size      int64
	// senderBuffer is the big-buffer guest sender's socket buffer.
	senderBuffer int64
	dials        int
	logf         func(format string, args ...any)
	profile      string // CPU profile file, "" for none
	journal      *journalWatch
	// forwarding is false when the guest journal is not forwarded (to
	// time the guest's journald alone).
	forwarding bool

	qemuPID atomic.Int64

	// Guest→host streams, as the readers finish them.
	g2hDone     chan throughput
	g2hUnixDone chan throughput
	g2hParDone  chan throughput
	parallel    int // connections of the parallel phase

	mu       sync.Mutex
	baseline time.Duration // guest socat /dev/zero → /dev/null
	streams  []throughput
	lat      latency
	// journalGuest is the guest's own time per journal span: logging
	// until journald has taken in every line.
	journalGuest map[string]time.Duration
	problems     []string
	profFile     *os.File // open while profiling
	finished     bool     // the guest said done
	// emptyRequests counts control connections without a request.
	emptyRequests int
}

func (b *bench) sample() cpuSample { return sampleCPU(int(b.qemuPID.Load())) }

func (b *bench) problem(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	b.logf("%s", msg)
	b.mu.Lock()
	b.problems = append(b.problems, msg)
	b.mu.Unlock()
}

func (b *bench) addStream(t throughput) {
	if t.err == nil && t.got != t.want {
		t.err = fmt.Errorf("%d bytes arrived, %d were sent", t.got, t.want)
	}
	if t.err != nil {
		b.problem("%s: %v", t.name, t.err)
	} else {
		b.logf("%s: %.1f MB/s (%d bytes in %.2fs)", t.name, t.mbps(), t.got, t.elapsed.Seconds())
	}
	b.mu.Lock()
	b.streams = append(b.streams, t)
	b.mu.Unlock()
}

// receive measures the guest→host streams accepted on l in groups of
// streams connections (1 for a single stream): the bytes of the whole
// group, from the first byte of any of its streams to the EOF of the last.
func (b *bench) receive(l net.Listener, name string, streams int, done chan<- throughput) {
	var g *streamGroup
	waiting := 0 // connections the current group still expects
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		if waiting == 0 {
			g = &streamGroup{t: throughput{name: name, want: b.size}}
			waiting = streams
		}
		waiting--
		g.wg.Add(1)
		go b.readInto(g, c)
		if waiting == 0 {
			go func(g *streamGroup) {
				g.wg.Wait()
				done <- g.result(b.sample())
			}(g)
		}
	}
}

// streamGroup is one run of a guest→host phase.
type streamGroup struct {
	wg    sync.WaitGroup
	mu    sync.Mutex
	t     throughput
	reads int
	start time.Time
	begin cpuSample
}

// readInto reads c to its end, adding to g.
func (b *bench) readInto(g *streamGroup, c net.Conn) {
	defer g.wg.Done()
	defer c.Close()
	buf := make([]byte, 256<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			g.mu.Lock()
			if g.start.IsZero() {
				g.start = time.Now()
				g.begin = b.sample()
			}
			g.t.got += int64(n)
			g.reads++
			g.mu.Unlock()
		}
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			g.mu.Lock()
			if g.t.err == nil {
				g.t.err = err
			}
			g.mu.Unlock()
			return
		}
	}
}

// result is the group's throughput once every stream has ended at end.
func (g *streamGroup) result(end cpuSample) throughput {
	t := g.t
	if !g.start.IsZero() {
		t.elapsed = end.at.Sub(g.start)
		t.cpu = g.begin.to(end)
		t.note = fmt.Sprintf("%d reads of %.1f KiB on average", g.reads, float64(t.got)/float64(g.reads)/1024)
	}
	return t
}

// send measures one host→guest stream: from the first write until the
// guest, having read everything, closes its end.
func (b *bench) send(ctx context.Context, name string, dial func(context.Context) (net.Conn, error)) throughput {
	t := throughput{name: name, want: b.size}
	c, err := dialRetry(ctx, dial)
	if err != nil {
		t.err = err
		return t
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	begin := b.sample()
	var sent int64
	for sent < b.size && err == nil {
		n := int(min(int64(len(buf)), b.size-sent))
		n, err = c.Write(buf[:n])
		sent += int64(n)
	}
	if err == nil {
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			err = cw.CloseWrite()
		}
	}
	if err == nil {
		// The guest's sink closes once it has read everything.
		_, err = io.Copy(io.Discard, c)
	}
	end := b.sample()
	t.elapsed, t.cpu = end.at.Sub(begin.at), begin.to(end)
	// What arrived is checked against the guest's count later; until
	// then, what left.
	t.got = sent
	t.err = err
	return t
}

// dialRetry dials until the guest's listener is up: the guest starts it in
// the background just before asking for the phase.
func dialRetry(ctx context.Context, dial func(context.Context) (net.Conn, error)) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for {
		c, err := dial(ctx)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("the guest did not accept within 60s: %w", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// dialHybrid connects to port in the guest through the transport's hybrid
// Unix socket, the way `ssh vsock-mux/...` and Firecracker clients do.
func dialHybrid(ctx context.Context, path string, port uint32) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		c.Close()
		return nil, err
	}
	// Byte by byte: nothing after the answer's newline may be consumed.
	var line []byte
	one := make([]byte, 1)
	for len(line) < 32 {
		if _, err := io.ReadFull(c, one); err != nil {
			c.Close()
			return nil, fmt.Errorf("hybrid CONNECT %d: no answer: %w", port, err)
		}
		if one[0] == '\n' {
			break
		}
		line = append(line, one[0])
	}
	if !strings.HasPrefix(string(line), "OK ") {
		c.Close()
		return nil, fmt.Errorf("hybrid CONNECT %d: answer %q", port, line)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// measureDials times n sequential Dials to a guest port whose listener
// accepts and closes, after one untimed dial that waits for the listener.
func (b *bench) measureDials(ctx context.Context, port uint32) latency {
	dial := func(ctx context.Context) (net.Conn, error) { return b.transport.Dial(ctx, port) }
	c, err := dialRetry(ctx, dial)
	if err != nil {
		return latency{err: err}
	}
	c.Close()
	l := latency{dials: make([]time.Duration, 0, b.dials)}
	begin := b.sample()
	for range b.dials {
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		t0 := time.Now()
		c, err := b.transport.Dial(dctx, port)
		d := time.Since(t0)
		cancel()
		if err != nil {
			l.err = fmt.Errorf("dial %d of %d: %w", len(l.dials)+1, b.dials, err)
			break
		}
		l.dials = append(l.dials, d)
		c.Close()
	}
	l.cpu = begin.to(b.sample())
	return l
}

// serveControl answers the guest's control requests, one per connection,
// in order, until l is closed.
func (b *bench) serveControl(ctx context.Context, l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		line, err := bufio.NewReader(io.LimitReader(c, 256)).ReadString('\n')
		if err != nil {
			// The guest retries a request whose connect timed out on
			// its side; the host saw a connection without a request.
			b.logf("control: a connection ended without a request (%v)", err)
			b.mu.Lock()
			b.emptyRequests++
			b.mu.Unlock()
			c.Close()
			continue
		}
		c.SetReadDeadline(time.Time{})
		reply := b.handle(ctx, strings.Fields(line))
		c.SetWriteDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "%s\n", reply)
		c.Close()
	}
}

// handle runs the host side of one request and returns the answer.
func (b *bench) handle(ctx context.Context, req []string) string {
	if len(req) == 0 {
		return "error empty request"
	}
	arg := func(i int) int64 {
		if i >= len(req) {
			return -1
		}
		v, err := strconv.ParseInt(req[i], 10, 64)
		if err != nil {
			return -1
		}
		return v
	}
	switch req[0] {
	case "hello":
		b.logf("guest is up; waiting for it to settle")
	case "baseline":
		b.mu.Lock()
		b.baseline = time.Duration(arg(1))
		b.mu.Unlock()
	case "settled":
		b.logf("the guest was idle after %ds; measuring", arg(1))
		b.startProfile()
	case "g2h-end":
		kind := ""
		if len(req) > 1 {
			kind = req[1]
		}
		done, name := b.g2hDone, ""
		switch kind {
		case "write":
			name = "guest→host, vsock Listen, write loop"
		case "write-bigbuf":
			name = fmt.Sprintf("guest→host, vsock Listen, write loop, %d KiB socket buffer", b.senderBuffer>>10)
		case "parallel":
			done, name = b.g2hParDone, fmt.Sprintf("guest→host, vsock Listen, write loop, %d streams", b.parallel)
		case "socat":
			name = "guest→host, vsock Listen, socat"
		case "unix":
			done, name = b.g2hUnixDone, "guest→host, Unix socket fallback, write loop"
		default:
			b.problem("control: unknown guest→host stream %q", kind)
			return "error unknown stream"
		}
		select {
		case t := <-done:
			t.name = name
			sender := fmt.Sprintf("guest sender took %.2fs", time.Duration(arg(2)).Seconds())
			if t.note == "" {
				t.note = sender
			} else {
				t.note = sender + "; " + t.note
			}
			b.addStream(t)
		case <-time.After(2 * time.Minute):
			b.problem("%s: the host saw no stream", name)
		}
	case "h2g", "h2g-hybrid":
		port := uint32(arg(1))
		name, dial := "host→guest, vsock Dial", func(ctx context.Context) (net.Conn, error) {
			return b.transport.Dial(ctx, port)
		}
		if req[0] == "h2g-hybrid" {
			name, dial = "host→guest, hybrid CONNECT", func(ctx context.Context) (net.Conn, error) {
				return dialHybrid(ctx, b.transport.HybridSocket(), port)
			}
		}
		t := b.send(ctx, name, dial)
		b.mu.Lock()
		b.streams = append(b.streams, t)
		b.mu.Unlock()
	case "h2g-count", "h2g-hybrid-count":
		// The guest's sink reports what it read; settle the stream.
		b.mu.Lock()
		if len(b.streams) == 0 {
			b.mu.Unlock()
			b.problem("control: %s before any host→guest stream", req[0])
			return "error out of order"
		}
		final := b.streams[len(b.streams)-1]
		b.streams = b.streams[:len(b.streams)-1]
		b.mu.Unlock()
		final.got = arg(1)
		b.addStream(final)
	case "latency":
		l := b.measureDials(ctx, uint32(arg(1)))
		if l.err != nil {
			b.problem("connection latency: %v", l.err)
		}
		if d := sortedCopy(l.dials); len(d) > 0 {
			b.logf("connect latency: median %s, p95 %s over %d dials", ms(percentile(d, 50)), ms(percentile(d, 95)), len(d))
		}
		b.mu.Lock()
		b.lat = l
		b.mu.Unlock()
	case "journal-wait":
		if len(req) < 2 {
			return "error journal-wait needs a span name"
		}
		b.mu.Lock()
		b.journalGuest[req[1]] = time.Duration(arg(2))
		b.mu.Unlock()
		if !b.forwarding {
			break // nothing reaches the host
		}
		if err := b.journal.wait(req[1], 5*time.Minute); err != nil {
			b.problem("journal: %v", err)
		} else if r, ok := b.journal.result(req[1]); ok {
			b.logf("journal %s: %.2fs from the first marker to the last", req[1], r.elapsed.Seconds())
		}
	case "done":
		b.stopProfile()
		b.mu.Lock()
		b.finished = true
		b.mu.Unlock()
	default:
		b.problem("control: unknown request %q", strings.Join(req, " "))
		return "error unknown request"
	}
	return "ok"
}

func (b *bench) startProfile() {
	if b.profile == "" {
		return
	}
	f, err := os.Create(b.profile)
	if err != nil {
		b.problem("cpu profile: %v", err)
		return
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		b.problem("cpu profile: %v", err)
		f.Close()
		return
	}
	b.mu.Lock()
	b.profFile = f
	b.mu.Unlock()
}

func (b *bench) stopProfile() {
	b.mu.Lock()
	f := b.profFile
	b.profFile = nil
	b.mu.Unlock()
	if f != nil {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			b.problem("cpu profile: %v", err)
		}
	}
}

// percentile returns the nearest-rank p-th percentile of sorted ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	i := int(p/100*float64(len(ds))+0.999999) - 1
	i = max(0, min(i, len(ds)-1))
	return ds[i]
}

func sortedCopy(ds []time.Duration) []time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s
}

// phaseSummary is every run of one throughput phase.
type phaseSummary struct {
	runs, failed int
	median       throughput // the run with the median rate (the lower one of two for an even count)
	min, max     float64    // MB/s over the runs that did not fail
}

func (p phaseSummary) spread() string {
	if p.runs-p.failed < 2 {
		return ""
	}
	return fmt.Sprintf("%.1f–%.1f", p.min, p.max)
}

// summarize groups streams by phase name, in the order the phases first
// ran.
func summarize(streams []throughput) []phaseSummary {
	var order []string
	byName := map[string][]throughput{}
	for _, t := range streams {
		if _, ok := byName[t.name]; !ok {
			order = append(order, t.name)
		}
		byName[t.name] = append(byName[t.name], t)
	}
	var out []phaseSummary
	for _, name := range order {
		runs := byName[name]
		ps := phaseSummary{runs: len(runs)}
		var ok []throughput
		for _, t := range runs {
			if t.err != nil {
				ps.failed++
				ps.median = t
				continue
			}
			ok = append(ok, t)
		}
		if len(ok) > 0 {
			sort.Slice(ok, func(i, j int) bool { return ok[i].mbps() < ok[j].mbps() })
			ps.min, ps.max = ok[0].mbps(), ok[len(ok)-1].mbps()
			if ps.failed == 0 {
				ps.median = ok[(len(ok)-1)/2]
			}
		}
		out = append(out, ps)
	}
	return out
}
