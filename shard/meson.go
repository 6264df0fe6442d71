package shard

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// Test is one test as `meson introspect --tests` lists it.
type Test struct {
	Name string `json:"name"`
	// Suites are "project:suite" (or just "project" for a test declared
	// without a suite).
	Suites []string `json:"suite"`
}

// Project is the (sub)project that declared the test.
func (t Test) Project() string {
	if len(t.Suites) == 0 {
		return ""
	}
	p, _, _ := strings.Cut(t.Suites[0], ":")
	return p
}

// ErrNotBuildDir is returned by ListTests for a directory meson setup has
// not configured.
var ErrNotBuildDir = errors.New("not a Meson build directory")

// ListTests runs `meson introspect --tests buildDir`.
func ListTests(ctx context.Context, buildDir string) ([]Test, error) {
	if _, err := os.Stat(filepath.Join(buildDir, "meson-info", "intro-tests.json")); err != nil {
		return nil, fmt.Errorf("%s is %w (no meson-info/intro-tests.json); run meson setup first, or pass -C BUILD", buildDir, ErrNotBuildDir)
	}
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "meson", "introspect", "--tests", buildDir)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return nil, fmt.Errorf("meson not found on PATH; install meson: %w", err)
		}
		return nil, fmt.Errorf("meson introspect --tests %s failed (%v): %s", buildDir, err, strings.TrimSpace(stderr.String()))
	}
	tests, err := ParseIntrospect(out)
	if err != nil {
		return nil, fmt.Errorf("meson introspect --tests %s: %w", buildDir, err)
	}
	return tests, nil
}

// ParseIntrospect parses `meson introspect --tests` output.
func ParseIntrospect(data []byte) ([]Test, error) {
	var tests []Test
	if err := json.Unmarshal(data, &tests); err != nil {
		return nil, fmt.Errorf("unexpected output: %w", err)
	}
	return tests, nil
}

// Select returns the tests in any of suites, matched the way `meson test
// --suite` matches them: "S" selects the tests of any project in suite S
// (and every test of a project named S), "P:S" the tests of project P in
// suite S. No suites selects every test. A suite that selects nothing is an
// error naming the suites there are.
func Select(tests []Test, suites []string) ([]Test, error) {
	if len(suites) == 0 {
		return tests, nil
	}
	var out []Test
	matched := make([]bool, len(suites))
	for _, t := range tests {
		in := false
		for i, s := range suites {
			if inSuite(t, s) {
				matched[i], in = true, true
			}
		}
		if in {
			out = append(out, t)
		}
	}
	for i, s := range suites {
		if !matched[i] {
			return nil, fmt.Errorf("no test is in suite %q (suites: %s)", s, strings.Join(suiteNames(tests), ", "))
		}
	}
	return out, nil
}

// inSuite is mtest.py's TestHarness.test_in_suites for one suite.
func inSuite(t Test, suite string) bool {
	prjMatch, stMatch, _ := strings.Cut(suite, ":")
	for _, ps := range t.Suites {
		prj, st, _ := strings.Cut(ps, ":")
		if stMatch == "" && st == prjMatch {
			return true
		}
		if prjMatch != "" && prj != prjMatch {
			continue
		}
		if stMatch != "" && st != stMatch {
			continue
		}
		return true
	}
	return false
}

func suiteNames(tests []Test) []string {
	set := map[string]bool{}
	for _, t := range tests {
		for _, ps := range t.Suites {
			if _, st, ok := strings.Cut(ps, ":"); ok {
				set[st] = true
			}
		}
	}
	names := make([]string, 0, len(set))
	for n := range set {
		names = append(names, n)
	}
	sort.Strings(names)
	if len(names) == 0 {
		return []string{"none"}
	}
	return names
}

// Jobs turns the selected tests into the planner's jobs, with durations
// from d. A test's ID is its name, which is what `meson test NAME`
// selects; it is "project:name" when the name alone would be misread
// (it contains ':') or would also select another selected test (two
// subprojects' tests of one name).
func Jobs(tests []Test, d Durations) []Job {
	count := map[string]int{}
	for _, t := range tests {
		count[t.Name]++
	}
	seen := map[string]bool{}
	var jobs []Job
	for _, t := range tests {
		id := t.Name
		if strings.Contains(id, ":") || count[id] > 1 {
			id = t.Project() + ":" + t.Name
		}
		if seen[id] {
			// The same test listed twice (one name declared twice in one
			// project): `meson test NAME` runs both, so it is one job.
			continue
		}
		seen[id] = true
		s, ok := d[t.Name]
		jobs = append(jobs, Job{ID: id, Seconds: s, Known: ok})
	}
	return jobs
}
