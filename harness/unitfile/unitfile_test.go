package unitfile

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-systemd/v22/unit"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type option struct{ Section, Name, Value string }

func options(opts []*unit.UnitOption) []option {
	out := []option{}
	for _, o := range opts {
		out = append(out, option{o.Section, o.Name, o.Value})
	}
	return out
}

// readCase is a unit file and what systemd's config_parse() makes of it.
// Keys named Probe<n> are unknown to systemd, so systemd-analyze verify
// names each one it applied (TestReadMatchesSystemdAnalyze).
type readCase struct {
	name string
	text string
	// want is what systemd applies; wantErr, when set, says it refuses
	// the file instead.
	want    []option
	wantErr string
	// wantLines are the numbers systemd reports for the Probe keys.
	wantLines map[string]int
	// libraryDiffers: go-systemd's unit.DeserializeOptions reads this
	// case differently (an error or other options). For a continued
	// value it keeps each "\\\n" in the value, where systemd has a
	// space.
	libraryDiffers bool
}

var long = strings.Repeat("a", 3000)

func readCases() []readCase {
	return []readCase{
		{name: "plain", text: "[Unit]\nDescription=x\n\n[Service]\nExecStart=/bin/true\nProbe1=v\n",
			want:      []option{{"Unit", "Description", "x"}, {"Service", "ExecStart", "/bin/true"}, {"Service", "Probe1", "v"}},
			wantLines: map[string]int{"Probe1": 6}},
		{name: "white space around key and value is dropped", text: "[Service]\n  ExecStart = /bin/true \t\nProbe1 =v \r\n",
			want:      []option{{"Service", "ExecStart", "/bin/true"}, {"Service", "Probe1", "v"}},
			wantLines: map[string]int{"Probe1": 3}},
		{name: "comments", text: "# a\n; b\n[Service]\n  # indented\nExecStart=/bin/true\nProbe1=v # not a comment\n",
			want:      []option{{"Service", "ExecStart", "/bin/true"}, {"Service", "Probe1", "v # not a comment"}},
			wantLines: map[string]int{"Probe1": 6}},
		{name: "continuation joins with a space per backslash", text: "[Service]\nExecStart=/bin/true a \\\n  b\\\nc\nProbe1=v\n",
			want:      []option{{"Service", "ExecStart", "/bin/true a    b c"}, {"Service", "Probe1", "v"}},
			wantLines: map[string]int{"Probe1": 5}, libraryDiffers: true},
		{name: "continuation line starting with '['", text: "[Service]\nExecStart=/bin/sh -c 'true \\\n[ -e / ] && true'\nProbe1=v\n",
			want:      []option{{"Service", "ExecStart", "/bin/sh -c 'true  [ -e / ] && true'"}, {"Service", "Probe1", "v"}},
			wantLines: map[string]int{"Probe1": 4}, libraryDiffers: true},
		{name: "an empty line ends a continuation", text: "[Service]\nExecStart=/bin/true \\\n\nProbe1=v\n",
			want:      []option{{"Service", "ExecStart", "/bin/true"}, {"Service", "Probe1", "v"}},
			wantLines: map[string]int{"Probe1": 4}, libraryDiffers: true},
		{name: "byte order mark", text: "\uFEFF[Service]\nExecStart=/bin/true\nProbe1=v\n",
			want:      []option{{"Service", "ExecStart", "/bin/true"}, {"Service", "Probe1", "v"}},
			wantLines: map[string]int{"Probe1": 3}},
		{name: "CRLF", text: "[Service]\r\nExecStart=/bin/true\r\nProbe1=v\r\n",
			want:      []option{{"Service", "ExecStart", "/bin/true"}, {"Service", "Probe1", "v"}},
			wantLines: map[string]int{"Probe1": 3}},
		{name: "garbage after a header", text: "[Service] x\nExecStart=/bin/true\n", wantErr: `line 1: malformed section header "[Service] x"`},
		{name: "comment after a header", text: "[Service] # c\nExecStart=/bin/true\n", wantErr: "malformed section header"},

		// Where go-systemd's unit package reads differently.
		{name: "line over 2048 bytes", text: "[Service]\nExecStart=/bin/true\nX-Long=" + long + "\nProbe1=v\n",
			want:      []option{{"Service", "ExecStart", "/bin/true"}, {"Service", "X-Long", long}, {"Service", "Probe1", "v"}},
			wantLines: map[string]int{"Probe1": 4}, libraryDiffers: true},
		{name: "comment ending in a backslash", text: "[Unit]\n# ExecStart=/bin/old \\\n[Service]\nExecStart=/bin/true\nProbe1=v\n",
			want:      []option{{"Service", "ExecStart", "/bin/true"}, {"Service", "Probe1", "v"}},
			wantLines: map[string]int{"Probe1": 5}, libraryDiffers: true},
		{name: "comment inside a continuation", text: "[Service]\nExecStart=/bin/true\nX-A=a \\\n# c\nProbe1=v\nProbe2=w\n",
			want:      []option{{"Service", "ExecStart", "/bin/true"}, {"Service", "X-A", "a  Probe1=v"}, {"Service", "Probe2", "w"}},
			wantLines: map[string]int{"Probe2": 6}, libraryDiffers: true},
		{name: "escaped backslash at the end does not continue", text: "[Service]\nExecStart=/bin/true\nX-A=a\\\\\nProbe1=v\n",
			want:      []option{{"Service", "ExecStart", "/bin/true"}, {"Service", "X-A", `a\\`}, {"Service", "Probe1", "v"}},
			wantLines: map[string]int{"Probe1": 4}, libraryDiffers: true},
		{name: "line without '=' is ignored", text: "[Service]\nExecStart=/bin/true\nGarbage\n=x\nProbe1=v\n",
			want:      []option{{"Service", "ExecStart", "/bin/true"}, {"Service", "Probe1", "v"}},
			wantLines: map[string]int{"Probe1": 5}, libraryDiffers: true},
		{name: "lone CR ends a line", text: "[Service]\rExecStart=/bin/true\rProbe1=v\r",
			want:      []option{{"Service", "ExecStart", "/bin/true"}, {"Service", "Probe1", "v"}},
			wantLines: map[string]int{"Probe1": 3}, libraryDiffers: true},
		{name: "NUL ends a line", text: "[Service]\nExecStart=/bin/true\x00Probe1=v\n",
			want:      []option{{"Service", "ExecStart", "/bin/true"}, {"Service", "Probe1", "v"}},
			wantLines: map[string]int{"Probe1": 3}, libraryDiffers: true},
		{name: "assignments before any section are ignored", text: "Probe0=[Unit]\nProbe1=v\n[Service]\nExecStart=/bin/true\n",
			want: []option{{"Service", "ExecStart", "/bin/true"}}, libraryDiffers: true},
		{name: "header cut by a line end", text: "[Service\nExecStart=/bin/true]\n", wantErr: `line 1: malformed section header "[Service"`, libraryDiffers: true},
	}
}

func TestRead(t *testing.T) {
	for _, tt := range readCases() {
		t.Run(tt.name, func(t *testing.T) {
			lines, err := Read([]byte(tt.text))
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, options(Options(lines)))
			for _, l := range lines {
				if name, _, ok := l.Assignment(); ok && tt.wantLines[name] != 0 {
					assert.Equal(t, tt.wantLines[name], l.Number, name)
				}
			}
		})
	}
}

// TestGoSystemdDeserializeDiffers is the measurement behind Read: for
// these cases go-systemd's parser does not read what systemd reads. Should
// a new version agree with systemd, this fails, and Read may go.
func TestGoSystemdDeserializeDiffers(t *testing.T) {
	for _, tt := range readCases() {
		t.Run(tt.name, func(t *testing.T) {
			opts, err := unit.DeserializeOptions(strings.NewReader(tt.text))
			same := err == nil && tt.wantErr == "" && assert.ObjectsAreEqual(tt.want, options(opts)) ||
				err != nil && tt.wantErr != ""
			if tt.libraryDiffers {
				assert.False(t, same, "go-systemd now reads this as systemd does (err %v, options %v)", err, opts)
			} else {
				assert.True(t, same, "go-systemd: err %v, options %v", err, opts)
			}
		})
	}
}

// unknownKey is systemd-analyze's warning for a key it does not know;
// "name" and the quoted section are older systemd's wording.
var unknownKey = regexp.MustCompile(`:(\d+): Unknown key (?:name )?'([^']+)' in section '?\[?([^]',]+)`)

// TestReadMatchesSystemdAnalyze checks the cases against the systemd of
// this machine: the Probe keys it warns about are the ones Read returns,
// on the lines Read says, and it refuses the files Read refuses.
func TestReadMatchesSystemdAnalyze(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed")
	}
	for _, tt := range readCases() {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "probe.service")
			require.NoError(t, os.WriteFile(path, []byte(tt.text), 0o644))
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, analyze, "verify", path)
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			runErr := cmd.Run()
			if tt.wantErr != "" {
				assert.Error(t, runErr, out.String())
				assert.Contains(t, out.String(), "Invalid section header", out.String())
				return
			}
			require.NoError(t, runErr, out.String())
			var got, want []string
			for _, m := range unknownKey.FindAllStringSubmatch(out.String(), -1) {
				if strings.HasPrefix(m[2], "Probe") {
					got = append(got, m[3]+"."+m[2]+":"+m[1])
				}
			}
			for _, o := range tt.want {
				if strings.HasPrefix(o.Name, "Probe") {
					want = append(want, o.Section+"."+o.Name+":"+strconv.Itoa(tt.wantLines[o.Name]))
				}
			}
			sort.Strings(got)
			sort.Strings(want)
			assert.Equal(t, want, got, out.String())
		})
	}
}

func TestReadLimits(t *testing.T) {
	_, err := Read([]byte("[Service]\nX-A=" + strings.Repeat("a", MaxLine) + "\n"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "line 2: longer than")

	half := strings.Repeat("a", MaxLine/2+1)
	_, err = Read([]byte("[Service]\nX-A=" + half + "\\\n" + half + "\n"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "line 3: continued line longer than")

	_, err = Read([]byte("[Service]\nX-A=\xff\n"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "line 2: not valid UTF-8")

	_, err = Read([]byte("[Ser\"vice]\n"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "quotes, backslashes or control characters")

	lines, err := Read([]byte("[Service]\nX-A=a \\"))
	require.NoError(t, err)
	assert.Equal(t, []option{{"Service", "X-A", "a"}}, options(Options(lines)), "a file may end in a continued line")
}

func TestReadLine(t *testing.T) {
	tests := []struct {
		in         string
		line, rest string
	}{
		{"a", "a", ""},
		{"a\nb", "a", "b"},
		{"a\r\nb", "a", "b"},
		{"a\n\rb", "a", "b"},
		{"a\n\nb", "a", "\nb"},
		{"a\r\n\x00b", "a", "b"},
		{"a\x00\nb", "a", "\nb"},
		{"a\n\r\nb", "a", "\nb"},
	}
	for _, tt := range tests {
		line, rest := readLine([]byte(tt.in))
		assert.Equal(t, tt.line, string(line), "%q", tt.in)
		assert.Equal(t, tt.rest, string(rest), "%q", tt.in)
	}
}

func TestSerialize(t *testing.T) {
	opts := []*unit.UnitOption{
		unit.NewUnitOption("Unit", "Wants", "a.service b.service"),
		unit.NewUnitOption("Service", "ExecStart", `/bin/sh -c 'echo "$$x"'`),
		unit.NewUnitOption("Unit", "After", "a.service"),
	}
	text := Serialize(opts)
	assert.Equal(t, "[Unit]\nWants=a.service b.service\nAfter=a.service\n\n[Service]\nExecStart=/bin/sh -c 'echo \"$$x\"'\n", text,
		"grouped by section, in the order sections first appear")
	lines, err := Read([]byte(text))
	require.NoError(t, err)
	assert.ElementsMatch(t, options(opts), options(Options(lines)))
	assert.Equal(t, "", Serialize(nil))
}

// TestSerializeDoesNotEscape is why writers check their values: a line
// break, a trailing backslash or surrounding white space in a value
// reaches systemd as something else.
func TestSerializeDoesNotEscape(t *testing.T) {
	for _, value := range []string{"a\nProbe=1", `a\`, " a "} {
		text := Serialize([]*unit.UnitOption{
			unit.NewUnitOption("Service", "X-A", value),
			unit.NewUnitOption("Service", "X-B", "b"),
		})
		lines, err := Read([]byte(text))
		require.NoError(t, err)
		assert.NotEqual(t, []option{{"Service", "X-A", value}, {"Service", "X-B", "b"}}, options(Options(lines)), "%q", value)
	}
}
