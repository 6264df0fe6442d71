package shard

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"strings"
)

// Durations maps a test's name (as in meson.build's test(), without the
// project) to its recorded wall time in seconds.
//
// Two file formats hold them, told apart by content:
//
//   - a durations file: one JSON object of test name to seconds,
//     {"boot": 61.2, "fail": 58.0}, written by WriteFile (vmharness shard
//     --write-durations) for CI to cache;
//   - Meson's meson-logs/testlog.json: one JSON object per line and test
//     run, with "name" ("project:suite / test", or just "test" when the
//     build has a single suite) and "duration" in seconds. A test run more
//     than once (--repeat) counts with the mean of its runs.
//
// Tests of different subprojects with one name share an entry.
type Durations map[string]float64

// Format says which kind of file durations were read from.
type Format string

const (
	FormatDurations Format = "durations file"
	FormatTestlog   Format = "Meson testlog"
)

// ReadFile reads durations from a durations file or a testlog.json.
func ReadFile(path string) (Durations, Format, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, "", err
	}
	d, f, err := Parse(data)
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", path, err)
	}
	return d, f, nil
}

// Parse reads either format (see Durations).
func Parse(data []byte) (Durations, Format, error) {
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 {
		return nil, "", errors.New("empty file")
	}
	// A whole-file JSON object is a durations file, unless it is a
	// one-line testlog (a "name" that is a string, not seconds).
	var obj map[string]json.RawMessage
	err := json.Unmarshal(trimmed, &obj)
	switch {
	case err == nil:
		var name string
		if json.Unmarshal(obj["name"], &name) != nil {
			d, err := parseDurationsObject(obj)
			return d, FormatDurations, err
		}
	case trimmed[0] != '{':
		return nil, "", errors.New("neither a durations file (a JSON object of test name to seconds) nor a Meson testlog.json")
	case !bytes.Contains(trimmed, []byte("\n")):
		return nil, "", fmt.Errorf("not valid JSON: %w", err)
	}
	d, err := parseTestlog(trimmed)
	return d, FormatTestlog, err
}

func parseDurationsObject(obj map[string]json.RawMessage) (Durations, error) {
	d := make(Durations, len(obj))
	for name, raw := range obj {
		var s float64
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, fmt.Errorf("test %q: duration %s is not a number of seconds", name, raw)
		}
		if err := checkSeconds(s); err != nil {
			return nil, fmt.Errorf("test %q: %w", name, err)
		}
		if name == "" {
			return nil, errors.New("a test with an empty name")
		}
		d[name] = s
	}
	return d, nil
}

// testlogEntry is the part of a testlog.json line the planner reads.
type testlogEntry struct {
	Name     *string  `json:"name"`
	Duration *float64 `json:"duration"`
}

func parseTestlog(data []byte) (Durations, error) {
	sum := map[string]float64{}
	n := map[string]int{}
	for i, line := range bytes.Split(data, []byte("\n")) {
		line = bytes.TrimSpace(line)
		if len(line) == 0 {
			continue
		}
		var e testlogEntry
		if err := json.Unmarshal(line, &e); err != nil {
			return nil, fmt.Errorf("line %d is not a testlog.json entry: %w", i+1, err)
		}
		if e.Name == nil || e.Duration == nil {
			return nil, fmt.Errorf("line %d has no \"name\" and \"duration\"", i+1)
		}
		if err := checkSeconds(*e.Duration); err != nil {
			return nil, fmt.Errorf("line %d: %w", i+1, err)
		}
		name := TestlogTestName(*e.Name)
		sum[name] += *e.Duration
		n[name]++
	}
	d := make(Durations, len(sum))
	for name, s := range sum {
		d[name] = s / float64(n[name])
	}
	return d, nil
}

// TestlogTestName is the test's own name in a testlog.json "name": Meson
// writes "project:suite1+suite2 / name" when the build has more than one
// suite, and the bare name otherwise.
func TestlogTestName(s string) string {
	if _, name, ok := strings.Cut(s, " / "); ok {
		return name
	}
	return s
}

func checkSeconds(s float64) error {
	if s < 0 || math.IsNaN(s) || math.IsInf(s, 0) {
		return fmt.Errorf("duration %v is not a number of seconds >= 0", s)
	}
	return nil
}

// Merge returns the union of ds; a later map's entry for a test replaces
// an earlier one's.
func Merge(ds ...Durations) Durations {
	out := Durations{}
	for _, d := range ds {
		for k, v := range d {
			out[k] = v
		}
	}
	return out
}

// WriteFile writes d as a durations file (keys sorted, one per line),
// replacing path atomically.
func WriteFile(path string, d Durations) error {
	if d == nil {
		d = Durations{}
	}
	// encoding/json sorts map keys, so the same durations give the same
	// bytes.
	data, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}
