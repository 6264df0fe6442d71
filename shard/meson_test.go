package shard

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// introspected is `meson introspect --tests` of a build with a subproject,
// trimmed to the fields the planner reads.
const introspected = `[
 {"name": "boot", "suite": ["vmharness:integration-tests"], "cmd": ["/usr/bin/env"], "timeout": 300},
 {"name": "fail", "suite": ["vmharness:integration-tests"]},
 {"name": "unit", "suite": ["vmharness:unit", "vmharness:fast"]},
 {"name": "plain", "suite": ["vmharness"]},
 {"name": "boot", "suite": ["sub:integration-tests"]},
 {"name": "a:b", "suite": ["sub:integration-tests"]}
]`

func names(tests []Test) []string {
	var out []string
	for _, t := range tests {
		out = append(out, t.Project()+"/"+t.Name)
	}
	return out
}

func TestSelect(t *testing.T) {
	tests, err := ParseIntrospect([]byte(introspected))
	require.NoError(t, err)
	cases := []struct {
		name    string
		suites  []string
		want    []string
		wantErr string
	}{
		{"no suite: all", nil, []string{"vmharness/boot", "vmharness/fail", "vmharness/unit", "vmharness/plain", "sub/boot", "sub/a:b"}, ""},
		{"suite of any project", []string{"integration-tests"}, []string{"vmharness/boot", "vmharness/fail", "sub/boot", "sub/a:b"}, ""},
		{"project:suite", []string{"sub:integration-tests"}, []string{"sub/boot", "sub/a:b"}, ""},
		{"a project name selects its tests", []string{"sub"}, []string{"sub/boot", "sub/a:b"}, ""},
		{"several suites", []string{"unit", "sub:integration-tests"}, []string{"vmharness/unit", "sub/boot", "sub/a:b"}, ""},
		{"second suite of a test", []string{"fast"}, []string{"vmharness/unit"}, ""},
		{"unknown suite", []string{"integration"}, nil, `no test is in suite "integration" (suites: fast, integration-tests, unit)`},
		{"one of several unknown", []string{"unit", "nope"}, nil, `no test is in suite "nope"`},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Select(tests, tt.suites)
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, names(got))
		})
	}
}

func TestJobs(t *testing.T) {
	tests, err := ParseIntrospect([]byte(introspected))
	require.NoError(t, err)
	sel, err := Select(tests, []string{"integration-tests"})
	require.NoError(t, err)
	got := Jobs(sel, Durations{"boot": 60, "a:b": 5})
	assert.Equal(t, []Job{
		// Two selected tests are named boot: each is qualified.
		{ID: "vmharness:boot", Seconds: 60, Known: true},
		{ID: "fail"},
		{ID: "sub:boot", Seconds: 60, Known: true},
		// meson test splits NAME at the first ':' into project and name.
		{ID: "sub:a:b", Seconds: 5, Known: true},
	}, got)

	only, err := Select(tests, []string{"vmharness:integration-tests"})
	require.NoError(t, err)
	assert.Equal(t, []Job{{ID: "boot", Seconds: 60, Known: true}, {ID: "fail"}}, Jobs(only, Durations{"boot": 60}),
		"a name is bare when it selects one test of the selection")
}

func TestParseIntrospectError(t *testing.T) {
	_, err := ParseIntrospect([]byte("No tests defined."))
	assert.ErrorContains(t, err, "unexpected output")
}
