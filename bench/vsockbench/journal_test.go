package main

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestJournalWatchFindsMarkersSplitAcrossReads(t *testing.T) {
	begin, end := spanMarkers(spanJournal)
	stream := "MESSAGE=boot noise\n\nMESSAGE=" + begin + "\n\n" +
		strings.Repeat("MESSAGE=bench-journal 000001 x\n\n", 50) +
		"MESSAGE=" + end + "\n\nMESSAGE=after\n\n"
	for _, chunk := range []int{1, 3, 7, 64, len(stream)} {
		w := newJournalWatch(func() cpuSample { return cpuSample{at: time.Now()} }, spanJournal, spanConsole)
		var tail []byte
		for off := 0; off < len(stream); off += chunk {
			tail = w.observe(tail, []byte(stream[off:min(off+chunk, len(stream))]))
		}
		require.NoError(t, w.wait(spanJournal, time.Second), "chunk %d", chunk)
		r, ok := w.result(spanJournal)
		require.True(t, ok, "chunk %d", chunk)
		first := strings.Index(stream, "MESSAGE="+begin+"\n")
		last := strings.Index(stream, "MESSAGE="+end+"\n") + len("MESSAGE="+end+"\n")
		assert.Equal(t, int64(last-first), r.bytes, "chunk %d: the bytes from the begin marker to the end marker", chunk)
		_, ok = w.result(spanConsole)
		assert.False(t, ok, "chunk %d: the console span never began", chunk)
	}
}

func TestJournalWatchNeedsBeginBeforeEnd(t *testing.T) {
	_, end := spanMarkers(spanJournal)
	w := newJournalWatch(func() cpuSample { return cpuSample{at: time.Now()} }, spanJournal)
	w.observe(nil, []byte("MESSAGE="+end+"\n"))
	_, ok := w.result(spanJournal)
	assert.False(t, ok)
	assert.Error(t, w.wait(spanJournal, time.Millisecond))
}

func TestPercentile(t *testing.T) {
	ms := func(n ...int) []time.Duration {
		var d []time.Duration
		for _, v := range n {
			d = append(d, time.Duration(v)*time.Millisecond)
		}
		return d
	}
	for _, tc := range []struct {
		name string
		in   []time.Duration
		p    float64
		want time.Duration
	}{
		{"empty", nil, 50, 0},
		{"one", ms(7), 95, 7 * time.Millisecond},
		{"median of odd", ms(3, 1, 2), 50, 2 * time.Millisecond},
		{"nearest rank p95 of 20", ms(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20), 95, 19 * time.Millisecond},
		{"p100 is the max", ms(5, 9, 1), 100, 9 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, percentile(sortedCopy(tc.in), tc.p))
		})
	}
}

func TestGuestScriptLineLength(t *testing.T) {
	p := guestParams{Bytes: 1 << 20, BlockSize: 4096, Lines: 10, ConsoleLines: 2, LineLen: 100}
	line := journalPrefix + "000001 " + p.journalLinePad()
	assert.Len(t, line, 100)
	s := guestScript(p)
	assert.Contains(t, s, "PAD="+p.journalLinePad())
	assert.NotContains(t, s, "%!", "a formatting verb without its argument")
}
