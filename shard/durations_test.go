package shard

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name       string
		data       string
		want       Durations
		wantFormat Format
		wantErr    string
	}{
		{
			name:       "durations file",
			data:       `{"boot": 61.5, "fail": 58}`,
			want:       Durations{"boot": 61.5, "fail": 58},
			wantFormat: FormatDurations,
		},
		{
			name:       "empty durations file",
			data:       `{}`,
			want:       Durations{},
			wantFormat: FormatDurations,
		},
		{
			// Meson 1.0.1 with a single suite in the build writes bare names.
			name: "testlog, one suite",
			data: `{"name": "boot", "stdout": "", "result": "OK", "starttime": 1796060272.9, "duration": 61.25, "returncode": 0, "env": {}, "command": ["/usr/bin/env"]}
{"name": "fail", "stdout": "", "result": "OK", "starttime": 1796060273.0, "duration": 40.5, "returncode": 0, "env": {}, "command": ["/usr/bin/env"]}
`,
			want:       Durations{"boot": 61.25, "fail": 40.5},
			wantFormat: FormatTestlog,
		},
		{
			// With more than one suite: "project:suite1+suite2 / name".
			name: "testlog, several suites and a name with spaces",
			data: `{"name": "t:x+y / b", "result": "FAIL", "duration": 2.0, "returncode": 1}
{"name": "t / d d", "result": "OK", "duration": 3.0, "returncode": 0}`,
			want:       Durations{"b": 2, "d d": 3},
			wantFormat: FormatTestlog,
		},
		{
			name:       "testlog of a single test",
			data:       `{"name": "boot", "result": "OK", "duration": 7.5, "returncode": 0}`,
			want:       Durations{"boot": 7.5},
			wantFormat: FormatTestlog,
		},
		{
			name: "testlog with --repeat: the mean",
			data: `{"name": "boot", "duration": 10}
{"name": "boot", "duration": 20}
{"name": "boot", "duration": 60}`,
			want:       Durations{"boot": 30},
			wantFormat: FormatTestlog,
		},
		{name: "empty", data: "\n", wantErr: "empty file"},
		{name: "not JSON", data: "boot 61\n", wantErr: "neither a durations file"},
		{name: "durations not numbers", data: `{"boot": "61s"}`, wantErr: `test "boot": duration "61s" is not a number of seconds`},
		{name: "negative duration", data: `{"boot": -1}`, wantErr: "not a number of seconds >= 0"},
		{name: "truncated testlog", data: "{\"name\": \"a\", \"duration\": 1}\n{\"name\": \"b\", \"dur", wantErr: "line 2 is not a testlog.json entry"},
		{name: "testlog line without duration", data: "{\"name\": \"a\", \"duration\": 1}\n{\"name\": \"b\"}", wantErr: `line 2 has no "name" and "duration"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, format, err := Parse([]byte(tt.data))
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
			assert.Equal(t, tt.wantFormat, format)
		})
	}
}

func TestWriteFileRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "durations.json")
	d := Merge(Durations{"a": 1, "b": 2}, Durations{"b": 3, "c d": 4.5})
	require.NoError(t, WriteFile(path, d))
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "{\n  \"a\": 1,\n  \"b\": 3,\n  \"c d\": 4.5\n}\n", string(data), "sorted, later sources win")
	got, format, err := ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, FormatDurations, format)
	assert.Equal(t, d, got)
}

func TestRecordedTestlogParses(t *testing.T) {
	d := recordedSuite(t)
	assert.Contains(t, d, "boot")
	assert.Contains(t, d, "hang")
}
