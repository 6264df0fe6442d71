package journalremote

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Config configures a Collector.
type Config struct {
	// JournalPath is the output journal file, "<dir>/<test>.journal". It
	// must end in ".journal" (systemd-journal-remote insists) and its
	// directory must exist. Output of an earlier run at this path is
	// removed by New.
	JournalPath string
	// JournalRemotePath overrides where systemd-journal-remote is looked
	// for; empty searches /usr/lib/systemd, /lib/systemd and PATH.
	JournalRemotePath string
	// TestUnit is the unit under test, e.g. "foo.service"; the summary
	// shows its log the way `journalctl -u` would.
	TestUnit string
	// SummaryLines is how many of the unit's last lines the summary keeps;
	// 0 means 30.
	SummaryLines int
	// DrainTimeout bounds how long Close waits for open connections to reach
	// EOF before cutting them; 0 means 5 seconds.
	DrainTimeout time.Duration
	// Limits bound one guest entry; zero fields take DefaultLimits.
	Limits Limits
	// MarkerIdentifier is the SYSLOG_IDENTIFIER of marker entries (see
	// HasMarker); empty means none are tracked.
	MarkerIdentifier string
}

// Collector turns the guest's journal streams of one test into a journal
// file. It is safe for concurrent use; Close must be called once the VM is
// gone.
type Collector struct {
	cfg        Config
	exportPath string
	degraded   error // ErrJournalRemoteMissing and the fallback note, or nil

	sinkMu  sync.Mutex // serialises whole-entry writes from all connections
	sink    sink
	sinkErr error // first write error; later writes go to the export file
	// journalRemote is the process behind sink, if any; set once by New.
	journalRemote *journalRemoteSink

	mu        sync.Mutex
	closing   bool
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{}
	sum       *summarizer

	serving   sync.WaitGroup // Serve loops
	handlers  sync.WaitGroup // connections
	closeOnce sync.Once
	closeErr  error
}

// New prepares the output and starts systemd-journal-remote. When the tool
// is missing New still succeeds: entries then go to "<test>.export" next to
// the journal path, and Degraded says so.
func New(cfg Config) (*Collector, error) {
	if !strings.HasSuffix(cfg.JournalPath, ".journal") || filepath.Base(cfg.JournalPath) == ".journal" {
		return nil, fmt.Errorf("journal output %q: the file name must end in .journal", cfg.JournalPath)
	}
	abs, err := filepath.Abs(cfg.JournalPath)
	if err != nil {
		return nil, fmt.Errorf("journal output %q: %w", cfg.JournalPath, err)
	}
	cfg.JournalPath = abs
	if fi, err := os.Stat(filepath.Dir(abs)); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("journal output directory %s does not exist", filepath.Dir(abs))
	}
	if cfg.SummaryLines <= 0 {
		cfg.SummaryLines = 30
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = 5 * time.Second
	}
	cfg.Limits = cfg.Limits.withDefaults()

	c := &Collector{
		cfg:        cfg,
		exportPath: strings.TrimSuffix(abs, ".journal") + ".export",
		listeners:  make(map[net.Listener]struct{}),
		conns:      make(map[net.Conn]struct{}),
		sum:        newSummarizer(cfg.TestUnit, cfg.SummaryLines),
	}
	c.sum.markerID = cfg.MarkerIdentifier
	// A rerun must not append to the previous run's journal.
	if err := removeFiles(c.outputFiles()); err != nil {
		return nil, fmt.Errorf("removing the previous run's journal: %w", err)
	}

	binary, err := FindJournalRemote(cfg.JournalRemotePath)
	if err != nil {
		s, ferr := createExportFile(c.exportPath)
		if ferr != nil {
			return nil, ferr
		}
		c.sink = s
		c.degraded = fmt.Errorf("%w; raw journal export kept at %s; convert with: %s --output=%s %s",
			err, c.exportPath, journalRemoteCandidates[1], shellQuote(abs), shellQuote(c.exportPath))
		return c, nil
	}
	s, err := startJournalRemote(binary, abs)
	if err != nil {
		return nil, err
	}
	c.sink, c.journalRemote = s, s
	return c, nil
}

// Degraded returns nil when entries go to a journal file. Otherwise it
// returns an error wrapping ErrJournalRemoteMissing whose message says where
// the raw export is and how to convert it; print it once. Whether that fails
// the run (the user asked for journals explicitly) is the runner's call.
func (c *Collector) Degraded() error { return c.degraded }

// ErrClosed is returned by Serve after Close.
var ErrClosed = errors.New("journal collector closed")

// Serve accepts the guest's journal connections on l until Close is called,
// ctx is done or l fails, and handles each connection in the background
// until its EOF. Like http.Server.Serve it takes ownership of l and closes
// it. It returns ErrClosed after Close, ctx.Err() when ctx ended it, or the
// accept error. Open connections are not cut when Serve returns; Close
// drains them, and accepts what is still queued on l for a moment first.
// Start Serve before the guest can connect.
func (c *Collector) Serve(ctx context.Context, l net.Listener) error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		l.Close()
		return ErrClosed
	}
	c.listeners[l] = struct{}{}
	c.serving.Add(1)
	c.mu.Unlock()
	defer c.serving.Done()
	defer func() {
		c.mu.Lock()
		delete(c.listeners, l)
		c.mu.Unlock()
		l.Close()
	}()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()

	for {
		conn, err := l.Accept()
		if err != nil {
			c.mu.Lock()
			closing := c.closing
			c.mu.Unlock()
			switch {
			case closing:
				return ErrClosed
			case ctx.Err() != nil:
				return ctx.Err()
			}
			return fmt.Errorf("accepting journal connections: %w", err)
		}
		// A connection accepted while Close waits for stragglers is
		// handled like any other.
		c.mu.Lock()
		if len(c.conns) >= maxConcurrentConns {
			c.mu.Unlock()
			conn.Close()
			c.sum.refused()
			continue
		}
		c.conns[conn] = struct{}{}
		c.handlers.Add(1)
		c.mu.Unlock()
		go c.handle(conn)
	}
}

// maxConcurrentConns bounds what a guest can make the host hold in memory
// (each connection may buffer up to two Limits.MaxEntrySize); journald uses
// one connection at a time.
const maxConcurrentConns = 8

// flushThreshold is how many bytes of entries a connection gathers before
// it writes them out even while more input is waiting.
const flushThreshold = 128 << 10

// handle parses one connection and forwards whole entries. Entries are
// gathered while the guest keeps the socket busy and written as soon as it
// pauses, so little sits in our memory if the host process dies.
func (c *Collector) handle(conn net.Conn) {
	defer c.handlers.Done()
	defer func() {
		c.mu.Lock()
		delete(c.conns, conn)
		c.mu.Unlock()
		conn.Close()
	}()

	n := c.sum.connection()
	p := NewParser(conn, c.cfg.Limits)
	var e Entry
	var out []byte
	pending := 0
	flush := func() {
		if pending > 0 {
			c.write(out, pending)
		}
		out, pending = out[:0], 0
	}
	for {
		err := p.Next(&e)
		if err == nil || e.Len() > 0 {
			var cut string
			switch {
			case errors.Is(err, ErrMalformed):
				cut = "malformed-stream"
			case err != nil:
				cut = "connection-ended-mid-entry"
			case e.TruncatedFields() > 0:
				cut = "field-over-" + strconv.Itoa(c.cfg.Limits.MaxFieldSize) + "-bytes"
			}
			var info entryInfo
			out, info = appendForJournalRemote(out, &e, cut, time.Now())
			c.sum.observe(&e, info)
			pending++
		}
		if err != nil {
			flush()
			c.sum.streamEnded(n, p.Offset(), e.Len(), err, c.isClosing())
			return
		}
		if len(out) >= flushThreshold || p.Buffered() == 0 {
			flush()
		}
	}
}

func (c *Collector) isClosing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closing
}

// write hands whole entries to the sink. If systemd-journal-remote died,
// the rest of the test's entries go to the raw export file instead.
func (c *Collector) write(entries []byte, n int) {
	c.sinkMu.Lock()
	defer c.sinkMu.Unlock()
	err := c.sink.write(entries, n)
	if err == nil {
		return
	}
	if c.sinkErr == nil {
		c.sinkErr = err
	}
	if _, ok := c.sink.(*exportFileSink); ok {
		return
	}
	fallback, ferr := createExportFile(c.exportPath)
	if ferr != nil {
		c.sinkErr = errors.Join(c.sinkErr, ferr)
		return
	}
	if cerr := c.sink.close(); cerr != nil {
		c.sinkErr = errors.Join(c.sinkErr, cerr)
	}
	c.sink = fallback
	c.sinkErr = fmt.Errorf("%w; the rest of the journal is kept raw at %s", c.sinkErr, c.exportPath)
	if werr := fallback.write(entries, n); werr != nil {
		c.sinkErr = errors.Join(c.sinkErr, werr)
	}
}

// Close stops accepting connections, lets the open ones run to EOF for up to
// DrainTimeout (the VM is gone, so they end) and then cuts them, and finally
// closes systemd-journal-remote's input and waits until it has written the
// journal file. Everything the guest sent before its streams ended is in the
// file when Close returns. Problems of the guest's stream (malformed input)
// are in the Summary, not here; Close reports host-side failures.
func (c *Collector) Close() error {
	c.closeOnce.Do(func() { c.closeErr = c.close() })
	return c.closeErr
}

// acceptGrace is how long Close keeps accepting after it was called: a
// guest may have connected (and even written and hung up) an instant before
// the VM stopped, with the connection still queued in the listener.
const acceptGrace = 50 * time.Millisecond

func (c *Collector) close() error {
	c.mu.Lock()
	c.closing = true
	listening := len(c.listeners) > 0
	c.mu.Unlock()
	if listening {
		time.Sleep(acceptGrace)
	}
	c.mu.Lock()
	for l := range c.listeners {
		l.Close()
	}
	c.mu.Unlock()
	// No connection is added once every Serve loop has returned.
	c.serving.Wait()

	drained := make(chan struct{})
	go func() {
		c.handlers.Wait()
		close(drained)
	}()
	timer := time.NewTimer(c.cfg.DrainTimeout)
	defer timer.Stop()
	select {
	case <-drained:
	case <-timer.C:
		c.mu.Lock()
		for conn := range c.conns {
			conn.Close()
		}
		c.mu.Unlock()
		// Handlers now only wait for the sink; if systemd-journal-remote
		// hangs instead of reading, stop it so they fail and return.
		stuck := time.AfterFunc(journalRemoteExitTimeout, func() {
			if c.journalRemote != nil {
				c.journalRemote.abort()
			}
		})
		<-drained
		stuck.Stop()
	}

	c.sinkMu.Lock()
	defer c.sinkMu.Unlock()
	return errors.Join(c.sinkErr, c.sink.close())
}

// Files lists the output files that exist: the journal file, the files
// systemd-journal-remote rotated it into, and the raw export file.
func (c *Collector) Files() []string {
	var files []string
	for _, f := range c.outputFiles() {
		if _, err := os.Lstat(f); err == nil {
			files = append(files, f)
		}
	}
	return files
}

// outputFiles is every name this collector may write, existing or not.
func (c *Collector) outputFiles() []string {
	stem := escapeGlob(strings.TrimSuffix(c.cfg.JournalPath, ".journal"))
	files := []string{c.cfg.JournalPath}
	// Rotated by systemd-journal-remote: NAME@SEQNUMID-SEQNUM-TIME.journal,
	// or NAME@TIME-RANDOM.journal~ for a file it found corrupted.
	for _, suffix := range []string{"@*.journal", "@*.journal~"} {
		m, _ := filepath.Glob(stem + suffix)
		files = append(files, m...)
	}
	return append(files, c.exportPath)
}

// escapeGlob quotes the glob metacharacters of a literal path prefix.
func escapeGlob(s string) string {
	var b strings.Builder
	for _, r := range s {
		if strings.ContainsRune(`*?[\`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// Remove deletes the output files (see Files). Call it after Close when the
// keep policy says so.
func (c *Collector) Remove() error {
	return removeFiles(c.outputFiles())
}

func removeFiles(files []string) error {
	var errs []error
	for _, f := range files {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// HasMarker reports whether an entry with Config.MarkerIdentifier and
// the message text has arrived: the guest logs one to learn when the host
// has its journal up to that point, entries arriving in order.
func (c *Collector) HasMarker(text string) bool { return c.sum.hasMarker(text) }

// Summary returns what the runner shows about the journal. Call it after
// Close for the complete picture.
func (c *Collector) Summary() Summary {
	s := c.sum.snapshot()
	s.TestUnit = c.cfg.TestUnit
	for _, f := range c.Files() {
		if f == c.exportPath {
			s.RawExport = f
		} else {
			s.JournalFiles = append(s.JournalFiles, f)
		}
	}
	if c.degraded != nil {
		s.Degraded = c.degraded.Error()
	}
	return s
}

// realtimeMax is the largest __REALTIME_TIMESTAMP journald accepts
// (9999-12-31 23:59:59 UTC in microseconds).
const realtimeMax = 253402300799999999

// appendForJournalRemote writes e for systemd-journal-remote 252 and returns
// what the summary needs. journal-remote aborts the whole input on a
// _BOOT_ID or timestamp it cannot parse, drops entries without
// __REALTIME_TIMESTAMP, and carries the previous entry's timestamps and
// boot ID over to an entry that lacks them, even across our connections. So every entry leaves here with exactly one valid
// __REALTIME_TIMESTAMP (the host's receive time if the guest sent none or a
// bad one; journald sends its own), one __MONOTONIC_TIMESTAMP (0 when
// the guest sent none; journald forwards it since 256) and at most one well-formed
// _BOOT_ID; other "__" metadata (__CURSOR, __SEQNUM...) is dropped as the
// format asks. cut, when set, adds VMHARNESS_TRUNCATED=cut.
func appendForJournalRemote(dst []byte, e *Entry, cut string, now time.Time) ([]byte, entryInfo) {
	var info entryInfo
	var realtime, monotonic uint64
	haveRealtime, haveMonotonic, haveBoot := false, false, false
	for i := range e.Len() {
		name, value := e.Field(i)
		if len(name) > 1 && name[0] == '_' && name[1] == '_' {
			switch string(name) {
			case "__REALTIME_TIMESTAMP":
				if v, err := strconv.ParseUint(string(value), 10, 64); err == nil && v > 0 && v <= realtimeMax && !haveRealtime {
					realtime, haveRealtime = v, true
				}
			case "__MONOTONIC_TIMESTAMP":
				if v, err := strconv.ParseUint(string(value), 10, 64); err == nil && v < 1<<63 && !haveMonotonic {
					monotonic, haveMonotonic = v, true
				}
			}
			continue
		}
		if string(name) == "_BOOT_ID" {
			if haveBoot || !validID128(value) {
				info.droppedBootID = true
				continue
			}
			haveBoot = true
			info.bootID = value
		}
		dst = appendExportField(dst, name, value)
	}
	if cut != "" {
		dst = appendExportField(dst, []byte("VMHARNESS_TRUNCATED"), []byte(cut))
		info.truncated = true
	}
	if !haveRealtime {
		realtime = uint64(now.UnixMicro())
		info.synthesizedTime = true
	}
	info.realtime = realtime
	dst = append(dst, "__REALTIME_TIMESTAMP="...)
	dst = strconv.AppendUint(dst, realtime, 10)
	dst = append(dst, "\n__MONOTONIC_TIMESTAMP="...)
	dst = strconv.AppendUint(dst, monotonic, 10)
	dst = append(dst, "\n\n"...)
	return dst, info
}

// validID128 accepts what sd_id128_from_string does: 32 hex digits, or the
// 36-character UUID form.
func validID128(b []byte) bool {
	switch len(b) {
	case 32:
		return isHex(b)
	case 36:
		return b[8] == '-' && b[13] == '-' && b[18] == '-' && b[23] == '-' &&
			isHex(b[0:8]) && isHex(b[9:13]) && isHex(b[14:18]) && isHex(b[19:23]) && isHex(b[24:36])
	}
	return false
}

func isHex(b []byte) bool {
	for _, c := range b {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
			return false
		}
	}
	return true
}
