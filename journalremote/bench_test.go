package journalremote

import (
	"bytes"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// benchStream is n journald-shaped entries of about 330 bytes each, the
// size of a short test log line with journald's metadata.
func benchStream(n int) []byte {
	var buf []byte
	for i := range n {
		buf = append(buf, guestEntry(bootA, "foo.service", fmt.Sprintf("test output line %d: some text of typical length here", i), baseRealtime+uint64(i))...)
	}
	return buf
}

// BenchmarkParser measures parsing alone (informational).
func BenchmarkParser(b *testing.B) {
	stream := benchStream(10000)
	b.SetBytes(int64(len(stream)))
	b.ReportAllocs()
	var e Entry
	for b.Loop() {
		p := NewParser(bytes.NewReader(stream), Limits{})
		n := 0
		for p.Next(&e) == nil {
			n++
		}
		if n != 10000 {
			b.Fatalf("parsed %d entries", n)
		}
	}
	b.ReportMetric(float64(b.N)*10000/b.Elapsed().Seconds(), "entries/s")
}

// BenchmarkPipeline measures parsing, sanitising and summarising, without
// systemd-journal-remote (informational).
func BenchmarkPipeline(b *testing.B) {
	stream := benchStream(10000)
	b.SetBytes(int64(len(stream)))
	b.ReportAllocs()
	var e Entry
	out := make([]byte, 0, 256<<10)
	s := newSummarizer("foo.service", 30)
	for b.Loop() {
		p := NewParser(bytes.NewReader(stream), Limits{})
		for p.Next(&e) == nil {
			var info entryInfo
			out, info = appendForJournalRemote(out[:0], &e, "", time.Time{})
			s.observe(&e, info)
		}
	}
	b.ReportMetric(float64(b.N)*10000/b.Elapsed().Seconds(), "entries/s")
}

// BenchmarkCollectorToJournalFile measures the whole path a guest's journal
// takes on the host: Unix socket, Collector, systemd-journal-remote, file
// closed (informational; the lead's journal throughput numbers).
func BenchmarkCollectorToJournalFile(b *testing.B) {
	requireJournalTools(b)
	const lines = 50000
	stream := benchStream(lines)
	b.SetBytes(int64(len(stream)))
	for b.Loop() {
		c, addr := testCollector(b, Config{})
		conn := dialGuest(b, addr)
		_, err := io.Copy(conn, bytes.NewReader(stream))
		require.NoError(b, err)
		require.NoError(b, conn.Close())
		require.NoError(b, c.Close())
		require.Equal(b, int64(lines), c.Summary().Entries)
	}
	b.ReportMetric(float64(b.N)*lines/b.Elapsed().Seconds(), "lines/s")
}
