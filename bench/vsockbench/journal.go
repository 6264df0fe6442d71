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
// it spots the begin and end marker entries in the export-format bytes and
// counts the bytes between them. The collector reads only as fast as it
// hands entries on to systemd-journal-remote, so this is the rate at which
// the whole path (guest journald, vsock, collector) moves entries.
type journalWatch struct {
	begin, end []byte // the markers as MESSAGE fields

	mu        sync.Mutex
	beganAt   time.Time
	endedAt   time.Time
	bytes     int64 // stream bytes read from the begin marker to the end marker
	beginCPU  cpuSample
	endCPU    cpuSample
	sample    func() cpuSample
	endSeen   chan struct{}
	endClosed bool
}

func newJournalWatch(sample func() cpuSample) *journalWatch {
	return &journalWatch{
		begin:   []byte("MESSAGE=" + journalBegin + "\n"),
		end:     []byte("MESSAGE=" + journalEnd + "\n"),
		sample:  sample,
		endSeen: make(chan struct{}),
	}
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
	keep := len(w.begin)
	if len(w.end) > keep {
		keep = len(w.end)
	}
	buf := append(tail, data...)
	w.mu.Lock()
	if !w.beganAt.IsZero() && w.endedAt.IsZero() {
		w.bytes += int64(len(data))
	}
	if w.beganAt.IsZero() && bytes.Contains(buf, w.begin) {
		w.beganAt = time.Now()
		w.beginCPU = w.sample()
	}
	if !w.beganAt.IsZero() && w.endedAt.IsZero() && bytes.Contains(buf, w.end) {
		w.endedAt = time.Now()
		w.endCPU = w.sample()
		close(w.endSeen)
	}
	w.mu.Unlock()
	if len(buf) > keep-1 {
		buf = buf[len(buf)-(keep-1):]
	}
	return append([]byte(nil), buf...)
}

// wait blocks until the end marker was read or the timeout passed.
func (w *journalWatch) wait(timeout time.Duration) error {
	select {
	case <-w.endSeen:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("the end marker did not arrive within %s", timeout)
	}
}

type journalResult struct {
	elapsed time.Duration
	bytes   int64
	cpu     cpuUse
}

func (w *journalWatch) result() (journalResult, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.beganAt.IsZero() || w.endedAt.IsZero() {
		return journalResult{}, false
	}
	return journalResult{elapsed: w.endedAt.Sub(w.beganAt), bytes: w.bytes, cpu: w.beginCPU.to(w.endCPU)}, true
}

// countJournalLines reads the journal files back with journalctl and
// returns how many of the lines 1..want are there (each counted once) and
// how many lines carried the prefix in all.
func countJournalLines(files []string, want int) (distinct, total int, err error) {
	if len(files) == 0 {
		return 0, 0, fmt.Errorf("no journal file was written")
	}
	args := []string{"--no-pager", "-o", "cat", "--unit=" + unitName}
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
		rest, ok := strings.CutPrefix(sc.Text(), linePrefix)
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
