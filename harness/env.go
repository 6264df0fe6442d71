package harness

import (
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/coreos/go-systemd/v22/unit"
)

// EnvVar is one variable set in the test unit's environment (--setenv).
type EnvVar struct {
	Name  string
	Value string
}

// PassthroughEnvNames lists the variables of the runner's own environment
// that reach the test unit unchanged: the ones systemd's upstream test
// scripts (test-control.sh and the tests) read to select subtests, as
// upstream's integration-test-wrapper.py passes them on. --setenv
// overrides them.
func PassthroughEnvNames() []string {
	return []string{"TEST_MATCH_SUBTEST", "TEST_SKIP_SUBTESTS", "TEST_MATCH_TESTCASE", "TEST_RUN_DFUZZER"}
}

// ParseEnvArg parses a --setenv argument, NAME=VALUE. The value may be
// empty and may contain '=' and spaces.
func ParseEnvArg(arg string) (EnvVar, error) {
	name, value, ok := strings.Cut(arg, "=")
	if !ok {
		return EnvVar{}, fmt.Errorf("--setenv %q: want NAME=VALUE", arg)
	}
	v := EnvVar{Name: name, Value: value}
	if err := v.Validate(); err != nil {
		return EnvVar{}, fmt.Errorf("--setenv %q: %w", arg, err)
	}
	return v, nil
}

// Validate accepts what systemd accepts in Environment=: a name of
// letters, digits and underscores not starting with a digit (systemd's
// env_name_is_valid()), and a UTF-8 value. Control characters are refused
// because a drop-in line cannot carry them literally and no test needs them.
func (v EnvVar) Validate() error {
	if v.Name == "" {
		return fmt.Errorf("empty variable name")
	}
	for i, r := range v.Name {
		ok := r == '_' || r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || i > 0 && r >= '0' && r <= '9'
		if !ok {
			return fmt.Errorf("variable name %q: only letters, digits and '_' are allowed, and it must not start with a digit", v.Name)
		}
	}
	if !utf8.ValidString(v.Value) {
		return fmt.Errorf("value of %s is not valid UTF-8", v.Name)
	}
	for _, r := range v.Value {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("value of %s contains the control character %q, which a unit file cannot carry", v.Name, r)
		}
	}
	return nil
}

// MergeEnv returns vars with later assignments of a name replacing earlier
// ones (in the earlier one's place), so the result names each variable once.
func MergeEnv(vars ...[]EnvVar) []EnvVar {
	var out []EnvVar
	index := map[string]int{}
	for _, list := range vars {
		for _, v := range list {
			if i, ok := index[v.Name]; ok {
				out[i] = v
				continue
			}
			index[v.Name] = len(out)
			out = append(out, v)
		}
	}
	return out
}

// environmentDropIn returns the test unit's drop-in settings that set
// vars. A drop-in's Environment= (what upstream's wrapper writes) reaches
// the test unit's processes and nothing else, unlike systemd.setenv= on
// the kernel command line, which every unit would inherit.
func environmentDropIn(vars []EnvVar) []*unit.UnitOption {
	var opts []*unit.UnitOption
	for _, v := range vars {
		opts = append(opts, unit.NewUnitOption("Service", "Environment", quoteEnvironmentAssignment(v)))
	}
	return opts
}

// quoteEnvironmentAssignment renders NAME=VALUE as one double-quoted word
// of Environment=, which systemd unquotes with C escapes, after expanding
// specifiers: '%' is doubled, '\' and '"' are backslash-escaped. This is
// the setting's own syntax, which unit.Serialize leaves to the caller (it
// writes values as they are): unquoted, "A=x y" would be two assignments,
// and a value ending in '\' would continue onto the next line.
func quoteEnvironmentAssignment(v EnvVar) string {
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, `%`, `%%`)
	return `"` + v.Name + "=" + r.Replace(v.Value) + `"`
}
