// Package shard splits a Meson test suite into N shards of about equal
// wall time, so that N CI jobs (or N runs back to back) each run one shard
// and together run every test exactly once.
//
// The plan is a pure function of the selected tests, their recorded
// durations and N: longest-processing-time-first greedy (each test, longest
// first, goes to the shard with the least total so far), with ties broken
// by test name and shard number, so every job that plans from the same
// inputs gets the same plan. A test without a recorded duration counts as
// the median of those with one; with no durations at all every test counts
// the same and shards are balanced by count.
//
// Durations come from Meson's own meson-logs/testlog.json or from a
// durations file (a JSON object of test name to seconds) that CI can cache;
// see durations.go. The tests come from `meson introspect --tests`; see
// meson.go.
package shard

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
)

// Job is one test to place in a shard.
type Job struct {
	// ID is how the test is named on `meson test`'s command line; unique.
	ID string
	// Seconds is the test's recorded duration; used only when Known.
	Seconds float64
	Known   bool
}

// Plan is the result of Split.
type Plan struct {
	// Shards[i] lists the IDs of shard i (0-based here; the command line
	// numbers shards from 1), sorted by ID.
	Shards [][]string
	// Loads[i] is shard i's total estimated seconds (tests when ByCount).
	Loads []float64
	// ByCount is set when no test had a known duration: every test
	// counted as 1 and the shards are balanced by number of tests.
	ByCount bool
	// Unknown lists the tests that counted as Median, the median of the
	// known durations, because they had no recorded duration (only when
	// !ByCount), sorted.
	Unknown []string
	Median  float64
}

// ErrTooFewTests is returned by Split when there are fewer tests than
// shards: some shard would be empty, and `meson test` given no test names
// runs every test, so an empty shard cannot be expressed.
var ErrTooFewTests = errors.New("fewer tests than shards")

// Split places every job in exactly one of n shards. It is deterministic:
// the same jobs (in any order) and n give the same plan.
func Split(jobs []Job, n int) (*Plan, error) {
	if n < 1 {
		return nil, fmt.Errorf("the number of shards must be at least 1, not %d", n)
	}
	if len(jobs) < n {
		return nil, fmt.Errorf("%w: %d tests cannot fill %d shards", ErrTooFewTests, len(jobs), n)
	}
	seen := make(map[string]bool, len(jobs))
	for _, j := range jobs {
		if seen[j.ID] {
			return nil, fmt.Errorf("test %q is listed twice", j.ID)
		}
		seen[j.ID] = true
		if j.Known && (j.Seconds < 0 || math.IsNaN(j.Seconds) || math.IsInf(j.Seconds, 0)) {
			return nil, fmt.Errorf("test %q has an invalid duration %v", j.ID, j.Seconds)
		}
	}

	p := &Plan{Shards: make([][]string, n), Loads: make([]float64, n)}
	var known []float64
	for _, j := range jobs {
		if j.Known {
			known = append(known, j.Seconds)
		}
	}
	type weighted struct {
		id string
		w  float64
	}
	ws := make([]weighted, 0, len(jobs))
	if len(known) == 0 {
		p.ByCount = true
		for _, j := range jobs {
			ws = append(ws, weighted{j.ID, 1})
		}
	} else {
		p.Median = median(known)
		for _, j := range jobs {
			w := j.Seconds
			if !j.Known {
				w = p.Median
				p.Unknown = append(p.Unknown, j.ID)
			}
			ws = append(ws, weighted{j.ID, w})
		}
		sort.Strings(p.Unknown)
	}
	// Longest first; equal lengths by name, so input order never matters.
	sort.Slice(ws, func(a, b int) bool {
		if ws[a].w != ws[b].w {
			return ws[a].w > ws[b].w
		}
		return ws[a].id < ws[b].id
	})
	counts := make([]int, n)
	for _, w := range ws {
		best := 0
		for i := 1; i < n; i++ {
			// Least loaded; then fewest tests (so zero-length tests still
			// fill empty shards first); then the lowest shard number.
			if p.Loads[i] < p.Loads[best] || p.Loads[i] == p.Loads[best] && counts[i] < counts[best] {
				best = i
			}
		}
		p.Shards[best] = append(p.Shards[best], w.id)
		p.Loads[best] += w.w
		counts[best]++
	}
	for _, s := range p.Shards {
		sort.Strings(s)
	}
	return p, nil
}

// median of a non-empty slice (the mean of the middle two for an even
// count).
func median(xs []float64) float64 {
	s := slices.Clone(xs)
	sort.Float64s(s)
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

// Imbalance is how much longer the longest shard is than the shortest,
// as a fraction of the shortest (0.25: 25% longer); +Inf when the
// shortest is empty of work.
func (p *Plan) Imbalance() float64 {
	lo, hi := math.Inf(1), 0.0
	for _, l := range p.Loads {
		lo, hi = min(lo, l), max(hi, l)
	}
	if lo == 0 {
		if hi == 0 {
			return 0
		}
		return math.Inf(1)
	}
	return (hi - lo) / lo
}

// Describe is one line about the plan for stderr, e.g. "shard 1 of 2: 6
// tests, est. 6m10s (shards 6m10s/6m02s)".
func (p *Plan) Describe(index int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "shard %d of %d: %d tests", index+1, len(p.Shards), len(p.Shards[index]))
	if p.ByCount {
		b.WriteString(", balanced by test count (no recorded durations)")
		return b.String()
	}
	loads := make([]string, len(p.Loads))
	for i, l := range p.Loads {
		loads[i] = formatSeconds(l)
	}
	fmt.Fprintf(&b, ", estimated %s (all shards: %s)", formatSeconds(p.Loads[index]), strings.Join(loads, " "))
	if len(p.Unknown) > 0 {
		fmt.Fprintf(&b, "; %d tests without a recorded duration counted as the median %s", len(p.Unknown), formatSeconds(p.Median))
	}
	return b.String()
}

func formatSeconds(s float64) string {
	return fmt.Sprintf("%.0fs", s)
}
