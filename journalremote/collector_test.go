package journalremote

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const (
	bootA = "0123456789abcdef0123456789abcdef"
	bootB = "fedcba9876543210fedcba9876543210"
)

// requireJournalTools skips the test when the real tools are not installed;
// CI installs them, so a skip there is a setup bug.
func requireJournalTools(t testing.TB) {
	t.Helper()
	if _, err := FindJournalRemote(""); err != nil {
		t.Skipf("needs systemd-journal-remote (Debian package systemd-journal-remote): %v", err)
	}
	if _, err := exec.LookPath("journalctl"); err != nil {
		t.Skip("needs journalctl on PATH")
	}
}

// guestEntry is an entry the way journald's forward_to_socket writes it:
// journald's fields, then __REALTIME_TIMESTAMP last.
func guestEntry(boot, unit, message string, realtime uint64) []byte {
	var e Entry
	must(e.Add("_BOOT_ID", []byte(boot)))
	must(e.Add("_MACHINE_ID", []byte("a91663387a90b89f185d4e860000001a")))
	must(e.Add("_HOSTNAME", []byte("guest")))
	must(e.Add("_TRANSPORT", []byte("stdout")))
	must(e.Add("PRIORITY", []byte("6")))
	must(e.Add("SYSLOG_IDENTIFIER", []byte("test")))
	must(e.Add("_PID", []byte("42")))
	must(e.Add("_SYSTEMD_UNIT", []byte(unit)))
	must(e.Add("MESSAGE", []byte(message)))
	must(e.Add("__REALTIME_TIMESTAMP", []byte(strconv.FormatUint(realtime, 10))))
	return e.AppendExport(nil)
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

var baseRealtime = uint64(time.Date(2026, 11, 22, 1, 0, 0, 0, time.UTC).UnixMicro())

// testCollector starts a Collector serving on a Unix socket and returns it
// with the socket address.
func testCollector(t testing.TB, cfg Config) (*Collector, string) {
	t.Helper()
	if cfg.JournalPath == "" {
		cfg.JournalPath = filepath.Join(t.TempDir(), "test.journal")
	}
	if cfg.TestUnit == "" {
		cfg.TestUnit = "foo.service"
	}
	c, err := New(cfg)
	require.NoError(t, err)
	// Socket paths are limited to 108 bytes; t.TempDir() can be longer.
	sockDir, err := os.MkdirTemp("", "jr")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	addr := filepath.Join(sockDir, "s")
	l, err := net.Listen("unix", addr)
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- c.Serve(context.Background(), l) }()
	t.Cleanup(func() {
		c.Close()
		assert.ErrorIs(t, <-served, ErrClosed)
	})
	// The runner starts Serve long before the VM stops; here the guest
	// would otherwise race the goroutine.
	require.Eventually(t, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.listeners) == 1
	}, 5*time.Second, time.Millisecond)
	return c, addr
}

func dialGuest(t testing.TB, addr string) net.Conn {
	t.Helper()
	conn, err := net.Dial("unix", addr)
	require.NoError(t, err)
	return conn
}

// waitEntries waits until the collector has taken in n entries: a guest's
// next connection comes after a reboot, seconds later, and the journal's
// order is the order of arrival.
func waitEntries(t *testing.T, c *Collector, n int64) {
	t.Helper()
	require.Eventually(t, func() bool { return c.Summary().Entries == n }, 10*time.Second, time.Millisecond)
}

func journalctl(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command("journalctl", append([]string{"--no-pager"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "journalctl %v: %s", args, stderr.String())
	return string(out)
}

func lines(s string) []string {
	s = strings.TrimSuffix(s, "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

// writeLines sends n numbered lines (with prefix) and returns the messages.
func writeLines(t *testing.T, w io.Writer, boot, prefix string, n int) []string {
	return writeLinesAt(t, w, boot, prefix, n, baseRealtime)
}

func writeLinesAt(t *testing.T, w io.Writer, boot, prefix string, n int, start uint64) []string {
	t.Helper()
	var buf []byte
	var msgs []string
	for i := range n {
		msg := fmt.Sprintf("%s %d", prefix, i)
		msgs = append(msgs, msg)
		buf = append(buf, guestEntry(boot, "foo.service", msg, start+uint64(i))...)
		if len(buf) > 32<<10 {
			_, err := w.Write(buf)
			require.NoError(t, err)
			buf = buf[:0]
		}
	}
	_, err := w.Write(buf)
	require.NoError(t, err)
	return msgs
}

func TestCollectorManyLinesAndFinalMarker(t *testing.T) {
	requireJournalTools(t)
	c, addr := testCollector(t, Config{})

	conn := dialGuest(t, addr)
	want := writeLines(t, conn, bootA, "line", 20000)
	_, err := conn.Write(guestEntry(bootA, "foo.service", "FINAL-MARKER", baseRealtime+1e9))
	require.NoError(t, err)
	want = append(want, "FINAL-MARKER")
	require.NoError(t, conn.Close())
	require.NoError(t, c.Close())

	file := c.Files()[0]
	got := lines(journalctl(t, "--file="+file, "-u", "foo.service", "-o", "cat"))
	require.Len(t, got, 20001)
	assert.Equal(t, want, got)
	assert.Contains(t, journalctl(t, "--file="+file, "--header"), "OFFLINE",
		"Close must return only after systemd-journal-remote closed the file")

	s := c.Summary()
	assert.Equal(t, int64(20001), s.Entries)
	assert.Equal(t, int64(20001), s.UnitLinesTotal)
	require.Len(t, s.UnitLines, 30)
	assert.True(t, strings.HasSuffix(s.UnitLines[29], "test[42]: FINAL-MARKER"), s.UnitLines[29])
	assert.True(t, strings.HasSuffix(s.UnitLines[0], ": line 19971"), s.UnitLines[0])
	assert.Equal(t, []string{bootA}, s.Boots)
	assert.Empty(t, s.StreamErrors)
	assert.Zero(t, s.SynthesizedTimestamps)
	assert.Equal(t, []string{file}, s.JournalFiles)
}

func TestCollectorTwoBootsOneFile(t *testing.T) {
	requireJournalTools(t)
	c, addr := testCollector(t, Config{})

	// The first boot's journald connection ends when that boot shuts down;
	// the second boot connects anew.
	conn := dialGuest(t, addr)
	wantA := writeLines(t, conn, bootA, "boot-a", 100)
	require.NoError(t, conn.Close())
	waitEntries(t, c, 100)
	conn = dialGuest(t, addr)
	wantB := writeLinesAt(t, conn, bootB, "boot-b", 100, baseRealtime+60e6)
	require.NoError(t, conn.Close())
	require.NoError(t, c.Close())

	file := c.Files()[0]
	boots := lines(journalctl(t, "--file="+file, "--list-boots"))
	require.Len(t, boots, 3, "header plus two boots:\n%s", strings.Join(boots, "\n"))
	assert.Contains(t, boots[1], bootA)
	assert.Contains(t, boots[2], bootB)
	assert.Equal(t, wantA, lines(journalctl(t, "--file="+file, "-b", bootA, "-o", "cat")))
	assert.Equal(t, wantB, lines(journalctl(t, "--file="+file, "-b", bootB, "-o", "cat")))
	// The hint WriteSummary prints.
	assert.Equal(t, wantA, lines(journalctl(t, "--file="+file, "-b", "-1", "-o", "cat")))
	assert.Equal(t, wantB, lines(journalctl(t, "--file="+file, "-b", "0", "-o", "cat")))

	s := c.Summary()
	assert.Equal(t, []string{bootA, bootB}, s.Boots)
	assert.Equal(t, 2, s.Connections)
	var out bytes.Buffer
	require.NoError(t, WriteSummary(&out, s))
	assert.Contains(t, out.String(), "several boots")
}

func TestCollectorOverlappingConnections(t *testing.T) {
	requireJournalTools(t)
	c, addr := testCollector(t, Config{})

	// journald of the next boot may connect before the old connection's
	// EOF has been seen; entries of both must arrive whole.
	a, b := dialGuest(t, addr), dialGuest(t, addr)
	done := make(chan []string)
	go func() {
		msgs := writeLines(t, a, bootA, "a", 3000)
		a.Close()
		done <- msgs
	}()
	wantB := writeLines(t, b, bootB, "b", 3000)
	require.NoError(t, b.Close())
	wantA := <-done
	require.NoError(t, c.Close())

	file := c.Files()[0]
	assert.Equal(t, wantA, lines(journalctl(t, "--file="+file, "-b", bootA, "-o", "cat")))
	assert.Equal(t, wantB, lines(journalctl(t, "--file="+file, "-b", bootB, "-o", "cat")))
}

func TestCollectorBinaryFields(t *testing.T) {
	requireJournalTools(t)
	c, addr := testCollector(t, Config{})

	var e Entry
	must(e.Add("_BOOT_ID", []byte(bootA)))
	must(e.Add("_SYSTEMD_UNIT", []byte("foo.service")))
	must(e.Add("MESSAGE", []byte("first line\nsecond line")))
	must(e.Add("BLOB", []byte{0, 1, 2, 0xff}))
	must(e.Add("EMPTY", nil))
	must(e.Add("__REALTIME_TIMESTAMP", []byte(strconv.FormatUint(baseRealtime, 10))))
	// journald >= 256 forwards its monotonic time too.
	must(e.Add("__MONOTONIC_TIMESTAMP", []byte("12345678")))
	conn := dialGuest(t, addr)
	_, err := conn.Write(e.AppendExport(nil))
	require.NoError(t, err)
	require.NoError(t, conn.Close())
	require.NoError(t, c.Close())

	var got map[string]any
	require.NoError(t, json.Unmarshal([]byte(journalctl(t, "--file="+c.Files()[0], "-o", "json")), &got))
	assert.Equal(t, "first line\nsecond line", got["MESSAGE"])
	assert.Equal(t, []any{0.0, 1.0, 2.0, 255.0}, got["BLOB"])
	assert.Equal(t, "", got["EMPTY"])
	assert.Equal(t, strconv.FormatUint(baseRealtime, 10), got["__REALTIME_TIMESTAMP"])
	assert.Equal(t, "12345678", got["__MONOTONIC_TIMESTAMP"])
	assert.Equal(t, []string{`first line\nsecond line`}, trimTimes(c.Summary().UnitLines))
}

// trimTimes drops the "Jan 02 15:04:05.000 ident[pid]: " prefix.
func trimTimes(ls []string) []string {
	out := make([]string, len(ls))
	for i, l := range ls {
		_, out[i], _ = strings.Cut(l, ": ")
	}
	return out
}

func TestCollectorTruncatedTrailingEntry(t *testing.T) {
	requireJournalTools(t)
	c, addr := testCollector(t, Config{})

	conn := dialGuest(t, addr)
	want := writeLines(t, conn, bootA, "whole", 10)
	// The last entry stops in the middle of a field: MESSAGE arrived, the
	// next field did not.
	_, err := conn.Write([]byte("_BOOT_ID=" + bootA + "\n_SYSTEMD_UNIT=foo.service\nMESSAGE=last words\n_HOSTNAME=gu"))
	require.NoError(t, err)
	require.NoError(t, conn.Close())
	waitEntries(t, c, 11)
	// The next connection's first entry must not be glued to it.
	conn = dialGuest(t, addr)
	_, err = conn.Write(guestEntry(bootB, "foo.service", "next connection", baseRealtime+500))
	require.NoError(t, err)
	require.NoError(t, conn.Close())
	require.NoError(t, c.Close())

	file := c.Files()[0]
	want = append(want, "last words", "next connection")
	assert.Equal(t, want, lines(journalctl(t, "--file="+file, "-o", "cat")))
	assert.Equal(t, []string{"last words"},
		lines(journalctl(t, "--file="+file, "VMHARNESS_TRUNCATED=connection-ended-mid-entry", "-o", "cat")))

	s := c.Summary()
	assert.Equal(t, int64(1), s.TruncatedEntries)
	assert.Equal(t, int64(1), s.SynthesizedTimestamps, "the cut entry lost its __REALTIME_TIMESTAMP")
	require.Len(t, s.StreamErrors, 1)
	assert.Contains(t, s.StreamErrors[0], "ended inside an entry")
	assert.Contains(t, s.StreamErrors[0], "3 complete fields")
}

func TestCollectorSanitizesWhatJournalRemoteWouldChokeOn(t *testing.T) {
	requireJournalTools(t)
	c, addr := testCollector(t, Config{})

	// systemd-journal-remote 252 aborts its whole input on the first two
	// and drops the third; none may cost us an entry.
	stream := "_BOOT_ID=not-a-boot-id\nMESSAGE=bad boot id\n__REALTIME_TIMESTAMP=1700000000000000\n\n" +
		"_BOOT_ID=" + bootA + "\nMESSAGE=bad timestamp\n__REALTIME_TIMESTAMP=soon\n\n" +
		"MESSAGE=no timestamp\n__CURSOR=s=1;i=2\n__SEQNUM=7\n\n" +
		"MESSAGE=after\n_BOOT_ID=" + bootA + "\n__REALTIME_TIMESTAMP=1700000000000001\n\n"
	conn := dialGuest(t, addr)
	_, err := conn.Write([]byte(stream))
	require.NoError(t, err)
	require.NoError(t, conn.Close())
	require.NoError(t, c.Close())

	assert.Equal(t, []string{"bad boot id", "bad timestamp", "no timestamp", "after"},
		lines(journalctl(t, "--file="+c.Files()[0], "-o", "cat")))
	s := c.Summary()
	assert.Equal(t, int64(2), s.SynthesizedTimestamps)
	assert.Equal(t, int64(1), s.DroppedBootIDs)
}

func TestCollectorMalformedStreamKeepsWhatCameBefore(t *testing.T) {
	requireJournalTools(t)
	c, addr := testCollector(t, Config{})

	conn := dialGuest(t, addr)
	want := writeLines(t, conn, bootA, "ok", 5)
	_, err := conn.Write([]byte("MESSAGE=fine\nlower=case\n\n"))
	require.NoError(t, err)
	require.NoError(t, conn.Close())
	waitEntries(t, c, 6)
	conn = dialGuest(t, addr)
	want = append(want, writeLines(t, conn, bootA, "other", 2)...)
	require.NoError(t, conn.Close())
	require.NoError(t, c.Close(), "a bad guest stream is not a host error")

	got := lines(journalctl(t, "--file="+c.Files()[0], "-o", "cat"))
	assert.Equal(t, append(want[:5:5], append([]string{"fine"}, want[5:]...)...), got)
	s := c.Summary()
	require.Len(t, s.StreamErrors, 1)
	assert.Contains(t, s.StreamErrors[0], "invalid field name")
}

func TestCollectorCloseWaitsForEverything(t *testing.T) {
	requireJournalTools(t)

	t.Run("stream ended", func(t *testing.T) {
		c, addr := testCollector(t, Config{})
		conn := dialGuest(t, addr)
		want := writeLines(t, conn, bootA, "x", 5000)
		_, err := conn.Write(guestEntry(bootA, "foo.service", "powering off", baseRealtime+1e9))
		require.NoError(t, err)
		require.NoError(t, conn.Close())
		// No waiting: Close itself must drain the socket and the pipe.
		require.NoError(t, c.Close())
		got := lines(journalctl(t, "--file="+c.Files()[0], "-o", "cat"))
		assert.Equal(t, append(want, "powering off"), got)
	})

	t.Run("stream left open", func(t *testing.T) {
		c, addr := testCollector(t, Config{DrainTimeout: 200 * time.Millisecond})
		conn := dialGuest(t, addr)
		defer conn.Close()
		want := writeLines(t, conn, bootA, "y", 1000)
		// Make sure the collector has read it before we cut.
		require.Eventually(t, func() bool { return c.Summary().Entries == 1000 }, 10*time.Second, 10*time.Millisecond)
		start := time.Now()
		require.NoError(t, c.Close())
		assert.Less(t, time.Since(start), 5*time.Second)
		assert.Equal(t, want, lines(journalctl(t, "--file="+c.Files()[0], "-o", "cat")))
		s := c.Summary()
		require.Len(t, s.StreamErrors, 1)
		assert.Contains(t, s.StreamErrors[0], "still open after the VM stopped")
	})
}

func TestCollectorWithoutJournalRemote(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "no-such-journal-remote")
	c, addr := testCollector(t, Config{JournalPath: filepath.Join(dir, "t.journal"), JournalRemotePath: missing})

	err := c.Degraded()
	require.ErrorIs(t, err, ErrJournalRemoteMissing)
	exportPath := filepath.Join(dir, "t.export")
	assert.Contains(t, err.Error(), "raw journal export kept at "+exportPath)
	assert.Contains(t, err.Error(), "convert with: /lib/systemd/systemd-journal-remote --output="+filepath.Join(dir, "t.journal")+" "+exportPath)

	conn := dialGuest(t, addr)
	want := writeLines(t, conn, bootA, "raw", 300)
	_, err = conn.Write([]byte("MESSAGE=cut off\n_PI"))
	require.NoError(t, err)
	require.NoError(t, conn.Close())
	require.NoError(t, c.Close())

	assert.Equal(t, []string{exportPath}, c.Files())
	s := c.Summary()
	assert.Equal(t, exportPath, s.RawExport)
	assert.Empty(t, s.JournalFiles)
	var out bytes.Buffer
	require.NoError(t, WriteSummary(&out, s))
	assert.Contains(t, out.String(), "convert with: ")

	// The export file holds whole entries only.
	f, err := os.Open(exportPath)
	require.NoError(t, err)
	defer f.Close()
	entries, _, err := parseAll(t, f, Limits{})
	require.ErrorIs(t, err, io.EOF)
	require.Len(t, entries, 301)

	// And the advertised conversion works.
	if _, err := FindJournalRemote(""); err != nil {
		t.Skip("conversion check needs systemd-journal-remote")
	}
	requireJournalTools(t)
	binary, _ := FindJournalRemote("")
	journal := filepath.Join(dir, "t.journal")
	out.Reset()
	cmd := exec.Command(binary, "--output="+journal, exportPath)
	cmd.Stderr = &out
	require.NoError(t, cmd.Run(), out.String())
	assert.Equal(t, append(want, "cut off"), lines(journalctl(t, "--file="+journal, "-o", "cat")))
}

func TestFindJournalRemote(t *testing.T) {
	_, err := FindJournalRemote("/nonexistent/systemd-journal-remote")
	require.ErrorIs(t, err, ErrJournalRemoteMissing)
	notExec := filepath.Join(t.TempDir(), "x")
	require.NoError(t, os.WriteFile(notExec, nil, 0o644))
	_, err = FindJournalRemote(notExec)
	require.ErrorIs(t, err, ErrJournalRemoteMissing)
}

func TestCollectorFilesAndRemove(t *testing.T) {
	requireJournalTools(t)
	dir := t.TempDir()
	journal := filepath.Join(dir, "t.journal")
	// Output of an earlier run, including a rotated file and a raw export;
	// another test's file must survive.
	stale := []string{journal, filepath.Join(dir, "t@0123-0001-0002.journal"), filepath.Join(dir, "t.export")}
	for _, f := range append(stale, filepath.Join(dir, "tt.journal")) {
		require.NoError(t, os.WriteFile(f, []byte("old"), 0o644))
	}
	c, addr := testCollector(t, Config{JournalPath: journal})
	for _, f := range stale[1:] {
		assert.NoFileExists(t, f)
	}
	conn := dialGuest(t, addr)
	writeLines(t, conn, bootA, "z", 3)
	require.NoError(t, conn.Close())
	require.NoError(t, c.Close())

	// Pretend systemd-journal-remote rotated once.
	rotated := filepath.Join(dir, "t@abcd-0000000000000001-0006.journal")
	require.NoError(t, os.WriteFile(rotated, nil, 0o644))
	assert.Equal(t, []string{journal, rotated}, c.Files())
	s := c.Summary()
	assert.Equal(t, "journalctl --file="+journal+" --file="+rotated+" -u foo.service", s.JournalctlCommand())

	require.NoError(t, c.Remove())
	assert.Empty(t, c.Files())
	assert.FileExists(t, filepath.Join(dir, "tt.journal"))
}

func TestNewRejectsBadPaths(t *testing.T) {
	_, err := New(Config{JournalPath: filepath.Join(t.TempDir(), "t.log")})
	require.ErrorContains(t, err, "must end in .journal")
	_, err = New(Config{JournalPath: "/nonexistent-dir/t.journal"})
	require.ErrorContains(t, err, "does not exist")
}

func TestServeAfterCloseAndContextCancel(t *testing.T) {
	c, err := New(Config{JournalPath: filepath.Join(t.TempDir(), "t.journal"), JournalRemotePath: "/nonexistent"})
	require.NoError(t, err)

	ctx, cancel := context.WithCancel(context.Background())
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- c.Serve(ctx, l) }()
	cancel()
	require.ErrorIs(t, <-served, context.Canceled)

	require.NoError(t, c.Close())
	l2, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	require.ErrorIs(t, c.Serve(context.Background(), l2), ErrClosed)
	_, err = l2.Accept()
	require.True(t, errors.Is(err, net.ErrClosed), "Serve closes the listener it was given")
}

// TestCollectorRotationKeepsEverything writes more distinct lines than one
// systemd-journal-remote 252 file holds (its data hash table is full at
// about 175,000 distinct values), so the tool rotates; every line must still
// be in the files the Collector lists.
func TestCollectorRotationKeepsEverything(t *testing.T) {
	if testing.Short() {
		t.Skip("writes 200,000 entries")
	}
	requireJournalTools(t)
	c, addr := testCollector(t, Config{})
	conn := dialGuest(t, addr)
	const n = 200000
	writeLines(t, conn, bootA, "rot", n)
	require.NoError(t, conn.Close())
	require.NoError(t, c.Close())

	s := c.Summary()
	require.Greater(t, len(s.JournalFiles), 1, "expected a rotation")
	args := []string{"-o", "cat"}
	for _, f := range s.JournalFiles {
		args = append(args, "--file="+f)
	}
	got := lines(journalctl(t, args...))
	require.Len(t, got, n)
	assert.Equal(t, "rot 0", got[0])
	assert.Equal(t, fmt.Sprintf("rot %d", n-1), got[n-1])
}

// fakeJournalRemote writes a shell script standing in for
// systemd-journal-remote.
func fakeJournalRemote(t *testing.T, script string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "fake-journal-remote")
	require.NoError(t, os.WriteFile(path, []byte("#!/bin/sh\n"+script+"\n"), 0o755))
	return path
}

func TestCollectorJournalRemoteDiesMidStream(t *testing.T) {
	dir := t.TempDir()
	fake := fakeJournalRemote(t, `head -c 1000 >/dev/null; echo "Assertion 'boom' failed" >&2; exit 1`)
	c, addr := testCollector(t, Config{JournalPath: filepath.Join(dir, "t.journal"), JournalRemotePath: fake})
	require.NoError(t, c.Degraded())

	conn := dialGuest(t, addr)
	writeLines(t, conn, bootA, "l", 5000)
	require.NoError(t, conn.Close())
	err := c.Close()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "writing to systemd-journal-remote")
	assert.Contains(t, err.Error(), "Assertion 'boom' failed")
	assert.Contains(t, err.Error(), "kept raw at "+filepath.Join(dir, "t.export"))

	s := c.Summary()
	assert.Equal(t, filepath.Join(dir, "t.export"), s.RawExport)
	f, err := os.Open(s.RawExport)
	require.NoError(t, err)
	defer f.Close()
	entries, _, err := parseAll(t, f, Limits{})
	require.ErrorIs(t, err, io.EOF)
	assert.NotEmpty(t, entries, "what journal-remote could not take is in the raw export")
}

func TestCollectorNoticesDroppedEntries(t *testing.T) {
	fake := fakeJournalRemote(t, `cat >/dev/null; echo "Finishing after writing 1 entries" >&2`)
	c, addr := testCollector(t, Config{JournalRemotePath: fake})
	conn := dialGuest(t, addr)
	writeLines(t, conn, bootA, "l", 10)
	require.NoError(t, conn.Close())
	require.ErrorContains(t, c.Close(), "wrote 1 of the 10 entries")
}

func TestCollectorBoundsConcurrentConnections(t *testing.T) {
	c, addr := testCollector(t, Config{JournalRemotePath: "/nonexistent"})
	var open []net.Conn
	for i := range maxConcurrentConns {
		conn := dialGuest(t, addr)
		open = append(open, conn)
		_, err := conn.Write(guestEntry(bootA, "foo.service", fmt.Sprint(i), baseRealtime))
		require.NoError(t, err)
	}
	waitEntries(t, c, maxConcurrentConns)
	extra := dialGuest(t, addr)
	defer extra.Close()
	require.NoError(t, extra.SetReadDeadline(time.Now().Add(5*time.Second)))
	_, err := extra.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF, "the connection over the limit is closed")
	for _, conn := range open {
		conn.Close()
	}
	require.NoError(t, c.Close())
	assert.Contains(t, c.Summary().StreamErrors, fmt.Sprintf("refused a connection: already %d open", maxConcurrentConns))
}
