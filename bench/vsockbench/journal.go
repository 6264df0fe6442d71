package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// journalWatch times the guest's journal stream as the collector reads it:
// for each span it spots the begin and end marker entries in the
// export-format bytes and counts the bytes between them. The collector
// reads only as fast as it hands entries on to systemd-journal-remote, so
// this is the rate at which the whole path (guest journald, vsock,
// collector) moves entries.
type journalWatch struct {
	sample func() cpuSample
	keep   int // bytes kept between reads: the longest marker less one

	mu    sync.Mutex
	spans []*journalSpan
}

// journalSpan is the stretch of the stream between two marker entries.
type journalSpan struct {
	name       string
	begin, end []byte // the markers as MESSAGE fields

	beganAt, endedAt time.Time
	bytes            int64 // stream bytes read from the begin marker to the end marker
	beginCPU, endCPU cpuSample
	endSeen          chan struct{}
}

// spanMarkers are the log lines that open and close span name.
func spanMarkers(name string) (begin, end string) {
	return "VSOCKBENCH-" + name + "-BEGIN", "VSOCKBENCH-" + name + "-END"
}

func newJournalWatch(sample func() cpuSample, names ...string) *journalWatch {
	w := &journalWatch{sample: sample}
	for _, n := range names {
		b, e := spanMarkers(n)
		sp := &journalSpan{
			name:    n,
			begin:   []byte("MESSAGE=" + b + "\n"),
			end:     []byte("MESSAGE=" + e + "\n"),
			endSeen: make(chan struct{}),
		}
		w.spans = append(w.spans, sp)
		w.keep = max(w.keep, len(sp.begin)-1, len(sp.end)-1)
	}
	return w
}

// listener wraps the journal listener so every accepted stream is watched.
func (w *journalWatch) listener(l net.Listener) net.Listener { return &watchedListener{l, w} }

type watchedListener struct {
	net.Listener
	w *journalWatch
}

func (l *watchedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &watchedConn{Conn: c, w: l.w}, nil
}

type watchedConn struct {
	net.Conn
	w    *journalWatch
	tail []byte // the last bytes of the previous read, for markers split across reads
}

func (c *watchedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.tail = c.w.observe(c.tail, p[:n])
	}
	return n, err
}

// observe looks for the markers in tail+data and returns the new tail.
func (w *journalWatch) observe(tail, data []byte) []byte {
	buf := append(tail, data...)
	w.mu.Lock()
	for _, sp := range w.spans {
		from := 0 // where the end marker may start in buf
		switch {
		case sp.beganAt.IsZero():
			i := bytes.Index(buf, sp.begin)
			if i < 0 {
				continue
			}
			sp.beganAt = time.Now()
			sp.beginCPU = w.sample()
			sp.bytes = int64(len(buf) - i)
			from = i + len(sp.begin)
		case sp.endedAt.IsZero():
			sp.bytes += int64(len(data))
		default:
			continue
		}
		// The end marker may be in the same read as the begin marker.
		if j := bytes.Index(buf[from:], sp.end); j >= 0 {
			j += from
			sp.endedAt = time.Now()
			sp.endCPU = w.sample()
			sp.bytes -= int64(len(buf) - j - len(sp.end))
			close(sp.endSeen)
		}
	}
	w.mu.Unlock()
	if len(buf) > w.keep {
		buf = buf[len(buf)-w.keep:]
	}
	return append([]byte(nil), buf...)
}

func (w *journalWatch) span(name string) *journalSpan {
	for _, sp := range w.spans {
		if sp.name == name {
			return sp
		}
	}
	return nil
}

// wait blocks until span name's end marker was read or the timeout passed.
func (w *journalWatch) wait(name string, timeout time.Duration) error {
	sp := w.span(name)
	if sp == nil {
		return fmt.Errorf("no journal span %q", name)
	}
	select {
	case <-sp.endSeen:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("the end marker of %s did not arrive within %s", name, timeout)
	}
}

type journalResult struct {
	elapsed time.Duration
	bytes   int64
	cpu     cpuUse
}

func (w *journalWatch) result(name string) (journalResult, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	sp := w.span(name)
	if sp == nil || sp.beganAt.IsZero() || sp.endedAt.IsZero() {
		return journalResult{}, false
	}
	return journalResult{elapsed: sp.endedAt.Sub(sp.beganAt), bytes: sp.bytes, cpu: sp.beginCPU.to(sp.endCPU)}, true
}

// countJournalLines reads the journal files back with journalctl and
// returns how many of the lines "prefix1" .. "prefixWANT" are there (each
// counted once) and how many lines carried the prefix in all. It matches
// on the message alone, the prefix being the benchmark's own: filtering on
// the unit as well found 0 of 500 lines in one run whose begin and end
// markers both arrived (cause not pinned down), which says nothing about
// whether the lines reached the file.
func countJournalLines(files []string, prefix string, want int) (distinct, total int, err error) {
	if len(files) == 0 {
		return 0, 0, fmt.Errorf("no journal file was written")
	}
	args := []string{"--no-pager", "-o", "cat"}
	for _, f := range files {
		args = append(args, "--file="+f)
	}
	cmd := exec.Command("journalctl", args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, 0, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return 0, 0, fmt.Errorf("journalctl: %w", err)
	}
	seen := make([]bool, want+1)
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), prefix)
		if !ok {
			continue
		}
		total++
		num, _, _ := strings.Cut(rest, " ")
		if i, err := strconv.Atoi(num); err == nil && i >= 1 && i <= want && !seen[i] {
			seen[i] = true
			distinct++
		}
	}
	if err := cmd.Wait(); err != nil {
		return distinct, total, fmt.Errorf("journalctl: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return distinct, total, sc.Err()
}
