package shard

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sort"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func jobs(durations map[string]float64, unknown ...string) []Job {
	var js []Job
	for id, s := range durations {
		js = append(js, Job{ID: id, Seconds: s, Known: true})
	}
	for _, id := range unknown {
		js = append(js, Job{ID: id})
	}
	return js
}

// randomSuite is n tests with durations between lo and hi seconds, from a
// fixed seed.
func randomSuite(seed uint64, n int, lo, hi float64) map[string]float64 {
	r := rand.New(rand.NewPCG(seed, 1))
	d := map[string]float64{}
	for i := range n {
		d[fmt.Sprintf("test-%03d", i)] = lo + r.Float64()*(hi-lo)
	}
	return d
}

// recordedSuite is this repository's integration suite as a testlog.json
// of `scripts/integration --num-processes 2` recorded it.
func recordedSuite(t *testing.T) map[string]float64 {
	t.Helper()
	d, f, err := ReadFile(filepath.Join("testdata", "integration-testlog.json"))
	require.NoError(t, err)
	require.Equal(t, FormatTestlog, f)
	return d
}

func TestSplitCoversEveryTestOnce(t *testing.T) {
	tests := []struct {
		name string
		jobs []Job
		n    int
	}{
		{"one shard", jobs(map[string]float64{"a": 1, "b": 2}), 1},
		{"as many shards as tests", jobs(map[string]float64{"a": 1, "b": 2, "c": 3}), 3},
		{"durations known", jobs(randomSuite(1, 30, 20, 120)), 4},
		{"some unknown", jobs(randomSuite(2, 10, 20, 120), "new-1", "new-2", "new-3"), 3},
		{"none known", jobs(nil, "a", "b", "c", "d", "e"), 2},
		{"all zero seconds", jobs(map[string]float64{"a": 0, "b": 0, "c": 0, "d": 0}), 4},
		{"one huge test", jobs(map[string]float64{"huge": 1000, "a": 1, "b": 1, "c": 1}), 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Split(tt.jobs, tt.n)
			require.NoError(t, err)
			require.Len(t, p.Shards, tt.n)
			var all []string
			for i, s := range p.Shards {
				assert.NotEmpty(t, s, "shard %d is empty", i)
				assert.True(t, sort.StringsAreSorted(s), "shard %d sorted", i)
				all = append(all, s...)
			}
			var want []string
			for _, j := range tt.jobs {
				want = append(want, j.ID)
			}
			sort.Strings(all)
			sort.Strings(want)
			assert.Equal(t, want, all, "every test in exactly one shard")
		})
	}
}

func TestSplitIsDeterministic(t *testing.T) {
	base := jobs(randomSuite(3, 25, 10, 100), "u1", "u2")
	// Equal durations are where a careless tie-break would depend on order.
	for i := range 6 {
		base = append(base, Job{ID: fmt.Sprintf("tie-%d", i), Seconds: 50, Known: true})
	}
	want, err := Split(base, 3)
	require.NoError(t, err)
	r := rand.New(rand.NewPCG(4, 4))
	for range 20 {
		shuffled := slices.Clone(base)
		r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		got, err := Split(shuffled, 3)
		require.NoError(t, err)
		assert.Equal(t, want, got)
	}
}

// TestSplitBalance: with known durations, the longest shard is within 25%
// of the shortest.
func TestSplitBalance(t *testing.T) {
	tests := []struct {
		name      string
		durations map[string]float64
		n         int
	}{
		{"this suite, 2 shards", recordedSuite(t), 2},
		{"this suite, 3 shards", recordedSuite(t), 3},
		{"40 tests 30-120s, 2 shards", randomSuite(5, 40, 30, 120), 2},
		{"40 tests 30-120s, 4 shards", randomSuite(6, 40, 30, 120), 4},
		{"100 tests 5-600s, 8 shards", randomSuite(7, 100, 5, 600), 8},
		{"12 tests 40-90s, 2 shards", randomSuite(8, 12, 40, 90), 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Split(jobs(tt.durations), tt.n)
			require.NoError(t, err)
			assert.False(t, p.ByCount)
			assert.LessOrEqual(t, p.Imbalance(), 0.25, "loads %v", p.Loads)
			var total float64
			for _, l := range p.Loads {
				total += l
			}
			var want float64
			for _, s := range tt.durations {
				want += s
			}
			assert.InDelta(t, want, total, 1e-6)
		})
	}
}

func TestSplitWeights(t *testing.T) {
	tests := []struct {
		name        string
		jobs        []Job
		n           int
		wantShards  [][]string
		wantByCount bool
		wantUnknown []string
		wantMedian  float64
	}{
		{
			name:       "longest first, each to the least loaded shard",
			jobs:       jobs(map[string]float64{"a": 10, "b": 8, "c": 5, "d": 4, "e": 1}),
			n:          2,
			wantShards: [][]string{{"a", "d"}, {"b", "c", "e"}},
			wantMedian: 5,
		},
		{
			name:        "unknown tests count as the median",
			jobs:        jobs(map[string]float64{"a": 10, "b": 30, "c": 20}, "x"),
			n:           2,
			wantShards:  [][]string{{"a", "b"}, {"c", "x"}},
			wantUnknown: []string{"x"},
			wantMedian:  20,
		},
		{
			name:        "no durations: by count, in name order",
			jobs:        jobs(nil, "d", "a", "c", "b", "e"),
			n:           2,
			wantShards:  [][]string{{"a", "c", "e"}, {"b", "d"}},
			wantByCount: true,
		},
		{
			name:       "zero-second tests still fill every shard",
			jobs:       jobs(map[string]float64{"a": 0, "b": 0, "c": 0}),
			n:          3,
			wantShards: [][]string{{"a"}, {"b"}, {"c"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Split(tt.jobs, tt.n)
			require.NoError(t, err)
			assert.Equal(t, tt.wantShards, p.Shards)
			assert.Equal(t, tt.wantByCount, p.ByCount)
			assert.Equal(t, tt.wantUnknown, p.Unknown)
			assert.Equal(t, tt.wantMedian, p.Median)
		})
	}
}

func TestSplitErrors(t *testing.T) {
	tests := []struct {
		name    string
		jobs    []Job
		n       int
		wantErr string
		isFew   bool
	}{
		{"zero shards", jobs(nil, "a"), 0, "at least 1", false},
		{"more shards than tests", jobs(nil, "a", "b"), 3, "2 tests cannot fill 3 shards", true},
		{"no tests", nil, 1, "0 tests cannot fill 1 shards", true},
		{"duplicate", []Job{{ID: "a"}, {ID: "a"}}, 1, `"a" is listed twice`, false},
		{"negative duration", []Job{{ID: "a", Seconds: -1, Known: true}}, 1, "invalid duration", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Split(tt.jobs, tt.n)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.Equal(t, tt.isFew, errors.Is(err, ErrTooFewTests))
		})
	}
}

func TestDescribe(t *testing.T) {
	p, err := Split(jobs(map[string]float64{"a": 60, "b": 50, "c": 10}, "x"), 2)
	require.NoError(t, err)
	assert.Equal(t, "shard 1 of 2: 2 tests, estimated 70s (all shards: 70s 100s); 1 tests without a recorded duration counted as the median 50s", p.Describe(0))
	p, err = Split(jobs(nil, "a", "b"), 2)
	require.NoError(t, err)
	assert.Equal(t, "shard 2 of 2: 1 tests, balanced by test count (no recorded durations)", p.Describe(1))
}
