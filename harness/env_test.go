package harness

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/unitfile"
)

func TestParseEnvArg(t *testing.T) {
	tests := []struct {
		arg     string
		want    EnvVar
		wantErr string
	}{
		{arg: "TEST_MATCH_SUBTEST=foo", want: EnvVar{"TEST_MATCH_SUBTEST", "foo"}},
		{arg: "A=", want: EnvVar{"A", ""}},
		{arg: "_x1=a=b c", want: EnvVar{"_x1", "a=b c"}},
		{arg: `Q="%n\`, want: EnvVar{"Q", `"%n\`}},
		{arg: "NOVALUE", wantErr: "want NAME=VALUE"},
		{arg: "=x", wantErr: "empty variable name"},
		{arg: "1X=2", wantErr: "must not start with a digit"},
		{arg: "A-B=1", wantErr: "only letters, digits and '_'"},
		{arg: "A B=1", wantErr: "only letters, digits and '_'"},
		{arg: "A=line\nbreak", wantErr: "control character"},
		{arg: "A=\xff", wantErr: "not valid UTF-8"},
	}
	for _, tt := range tests {
		t.Run(tt.arg, func(t *testing.T) {
			got, err := ParseEnvArg(tt.arg)
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				assert.Contains(t, err.Error(), "--setenv")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestQuoteEnvironmentAssignment(t *testing.T) {
	tests := []struct {
		v    EnvVar
		want string
	}{
		{EnvVar{"A", "plain"}, `"A=plain"`},
		{EnvVar{"A", "two words"}, `"A=two words"`},
		// systemd expands specifiers, then C-unescapes inside quotes.
		{EnvVar{"A", `50% "q" \x $HOME`}, `"A=50%% \"q\" \\x $HOME"`},
		{EnvVar{"A", ""}, `"A="`},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, quoteEnvironmentAssignment(tt.v))
	}
}

func TestMergeEnv(t *testing.T) {
	passed := []EnvVar{{"TEST_MATCH_SUBTEST", "env"}, {"TEST_SKIP_SUBTESTS", "x"}}
	set := []EnvVar{{"B", "1"}, {"TEST_MATCH_SUBTEST", "flag"}, {"B", "2"}}
	assert.Equal(t, []EnvVar{{"TEST_MATCH_SUBTEST", "flag"}, {"TEST_SKIP_SUBTESTS", "x"}, {"B", "2"}}, MergeEnv(passed, set))
	assert.Nil(t, MergeEnv(nil, nil))
}

func TestEnvironmentDropIn(t *testing.T) {
	assert.Empty(t, environmentDropIn(nil))
	text := unitfile.Serialize(environmentDropIn([]EnvVar{{"A", "1"}, {"B", `x y "q" 50% \`}}))
	assert.Equal(t, "[Service]\nEnvironment=\"A=1\"\nEnvironment=\"B=x y \\\"q\\\" 50%% \\\\\"\n", text)
	// systemd reads each quoted assignment back as one value: a trailing
	// backslash, doubled and inside quotes, does not continue the line.
	lines, err := unitfile.Read([]byte(text))
	require.NoError(t, err)
	var values []string
	for _, o := range unitfile.Options(lines) {
		values = append(values, o.Section+"."+o.Name+"="+o.Value)
	}
	assert.Equal(t, []string{`Service.Environment="A=1"`, `Service.Environment="B=x y \"q\" 50%% \\"`}, values)
}

func TestWithTestUnitDropIn(t *testing.T) {
	creds := []Credential{{Name: "systemd.extra-unit.t.service", Value: []byte("unit")}, {Name: "systemd.unit-dropin.t.service", Value: []byte("[Unit]\n")}}
	orig := append([]byte(nil), creds[1].Value...)
	got := withTestUnitDropIn(creds, "t.service", "[Service]\nEnvironment=A=1\n")
	assert.Equal(t, "[Unit]\n[Service]\nEnvironment=A=1\n", string(got[1].Value))
	assert.Equal(t, "unit", string(got[0].Value))
	assert.Equal(t, orig, []byte("[Unit]\n"))
	assert.Len(t, withTestUnitDropIn([]Credential{}, "t.service", "x"), 1, "no drop-in yet: one is added")
	assert.Len(t, withTestUnitDropIn([]Credential{}, "t.service", ""), 0, "nothing to add")
}
