package main

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSummarize(t *testing.T) {
	// run is a stream that moved mb megabytes in one second, so its rate
	// is mb MB/s.
	run := func(name string, mb int64, err error) throughput {
		return throughput{name: name, want: mb * 1e6, got: mb * 1e6, elapsed: time.Second, err: err}
	}
	broken := errors.New("reset")
	tests := []struct {
		name    string
		streams []throughput
		want    []phaseSummary
	}{
		{
			name:    "one run has no spread",
			streams: []throughput{run("a", 10, nil)},
			want:    []phaseSummary{{runs: 1, median: run("a", 10, nil), min: 10, max: 10}},
		},
		{
			name:    "odd count takes the middle rate, phases keep their first order",
			streams: []throughput{run("b", 30, nil), run("a", 5, nil), run("b", 10, nil), run("b", 20, nil)},
			want: []phaseSummary{
				{runs: 3, median: run("b", 20, nil), min: 10, max: 30},
				{runs: 1, median: run("a", 5, nil), min: 5, max: 5},
			},
		},
		{
			name:    "even count takes the lower middle",
			streams: []throughput{run("a", 40, nil), run("a", 10, nil), run("a", 30, nil), run("a", 20, nil)},
			want:    []phaseSummary{{runs: 4, median: run("a", 20, nil), min: 10, max: 40}},
		},
		{
			name:    "a failed run is the one reported",
			streams: []throughput{run("a", 40, nil), run("a", 10, broken), run("a", 30, nil)},
			want:    []phaseSummary{{runs: 3, failed: 1, median: run("a", 10, broken), min: 30, max: 40}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := summarize(tt.streams)
			require.Len(t, got, len(tt.want))
			for i := range tt.want {
				assert.Equal(t, tt.want[i], got[i])
			}
		})
	}
}

func TestPhaseSummarySpread(t *testing.T) {
	assert.Equal(t, "", phaseSummary{runs: 1, min: 5, max: 5}.spread())
	assert.Equal(t, "", phaseSummary{runs: 2, failed: 1, min: 5, max: 5}.spread())
	assert.Equal(t, "10.0–30.0", phaseSummary{runs: 3, min: 10, max: 30}.spread())
}

// TestReceiveGroups checks that receive counts a group of concurrent
// streams as one run, and that the next connections start the next run.
func TestReceiveGroups(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	b := &bench{size: 8}
	done := make(chan throughput)
	go b.receive(l, "pair", 2, done)
	send := func(payload string) {
		c, err := net.Dial("tcp", l.Addr().String())
		require.NoError(t, err)
		_, err = c.Write([]byte(payload))
		require.NoError(t, err)
		require.NoError(t, c.Close())
	}
	for run := 0; run < 2; run++ {
		send("abc")
		send("defgh")
		select {
		case got := <-done:
			assert.Equal(t, "pair", got.name)
			assert.NoError(t, got.err)
			assert.Equal(t, int64(8), got.got, "run %d: the bytes of both streams", run)
			assert.Equal(t, int64(8), got.want)
			assert.Contains(t, got.note, "reads of")
		case <-time.After(10 * time.Second):
			t.Fatalf("run %d: no result for the pair", run)
		}
	}
}
