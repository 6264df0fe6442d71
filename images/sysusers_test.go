package images

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseSysusersLine(t *testing.T) {
	tests := []struct {
		line    string
		want    sysusersLine
		wantErr string
	}{
		{line: `u testuser 4711 "Test User" /home/testuser /bin/bash`, want: sysusersLine{kind: "u", name: "testuser", home: "/home/testuser"}},
		{line: `u  spaced   -   'It'\''s me'`, want: sysusersLine{kind: "u", name: "spaced"}},
		{line: `u svc 4711:4712 - /nonexistent`, want: sysusersLine{kind: "u", name: "svc", home: "/nonexistent"}},
		{line: `u svc 4711:grp`, want: sysusersLine{kind: "u", name: "svc"}},
		{line: `u svc /usr/bin/svc`, want: sysusersLine{kind: "u", name: "svc"}},
		{line: `u svc`, want: sysusersLine{kind: "u", name: "svc"}},
		{line: `g grp 4712`, want: sysusersLine{kind: "g", name: "grp"}},
		{line: `g grp - - - -`, want: sysusersLine{kind: "g", name: "grp"}},
		{line: `m testuser grp`, want: sysusersLine{kind: "m", name: "testuser"}},
		{line: `r - 500-900`, want: sysusersLine{kind: "r", name: "-"}},

		{line: ``, wantErr: "empty"},
		{line: `x testuser 4711`, wantErr: `type "x": want u (user), g (group), m (membership) or r (ID range)`},
		{line: `U testuser`, wantErr: `type "U"`},
		{line: `#u testuser`, wantErr: `type "#u"`},
		{line: `u`, wantErr: `no name`},
		{line: `u -`, wantErr: `name "-"`},
		{line: `u 1user`, wantErr: `name "1user"`},
		{line: `u a:b`, wantErr: `name "a:b"`},
		{line: `u averyveryveryveryverylongusername`, wantErr: `at most 31`},
		{line: `r x 500-900`, wantErr: `an r line's name must be "-"`},
		{line: `r - 500`, want: sysusersLine{kind: "r", name: "-"}},
		{line: `r - lots`, wantErr: `range "lots"`},
		{line: `u t abc`, wantErr: `ID "abc"`},
		{line: `u t 65535`, wantErr: `ID "65535"`},
		{line: `u t 4711:`, wantErr: `ID "4711:"`},
		{line: `g grp x`, wantErr: `ID "x"`},
		{line: `m testuser`, wantErr: `group "-"`},
		{line: `u t 1 - home`, wantErr: `home directory "home"`},
		{line: `u t 1 - /home/../etc`, wantErr: `home directory "/home/../etc"`},
		{line: `u t 1 - /home/t sh`, wantErr: `shell "sh"`},
		{line: `g grp 1 "GECOS"`, wantErr: "a g line takes no GECOS, home or shell"},
		{line: `u t 1 - - - extra`, wantErr: "7 fields, at most 6"},
		{line: `u t 1 "unterminated`, wantErr: "unterminated"},
		{line: "u t 1\nu root 0", wantErr: "control characters"},
		{line: "u\tt", wantErr: "control characters"},
	}
	for _, tt := range tests {
		t.Run(tt.line, func(t *testing.T) {
			got, err := parseSysusersLine(tt.line)
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestHomesToCreate(t *testing.T) {
	r := &Recipe{Sysusers: []string{
		`u a 1 - /home/a`,
		`u b 2 - /`,
		`u c 3 - /nonexistent`,
		`u d 4`,
		`u e 5 "E" /var/lib/e /usr/sbin/nologin`,
		`g f 6`,
	}}
	assert.Equal(t, []sysusersLine{
		{kind: "u", name: "a", home: "/home/a"},
		{kind: "u", name: "e", home: "/var/lib/e"},
	}, r.homesToCreate())
}

func TestCheckSymlink(t *testing.T) {
	tests := []struct {
		path, target string
		wantErr      string
	}{
		{path: "etc/foo", target: "/usr/lib/foo"},
		{path: "usr/local/bin/jq-link", target: "../../bin/jq"},
		{path: "etc/foo", target: "../usr/lib/foo"},
		{path: "foo", target: "bar"},
		{path: "etc/foo", target: "./foo.d/../x"},

		{path: "/etc/foo", target: "/x", wantErr: "without the leading /"},
		{path: "../etc/foo", target: "/x", wantErr: "no . or .. elements"},
		{path: "etc/../../foo", target: "/x", wantErr: "no . or .. elements"},
		{path: "etc/./foo", target: "/x", wantErr: "no . or .. elements"},
		{path: "etc//foo", target: "/x", wantErr: "no . or .. elements"},
		{path: "etc/foo/", target: "/x", wantErr: "no . or .. elements"},
		{path: ".", target: "/x", wantErr: "no . or .. elements"},
		{path: "", target: "/x", wantErr: "no . or .. elements"},
		{path: "etc/foo", target: "", wantErr: "want a non-empty path"},
		{path: "etc/foo", target: "/x\ny", wantErr: "want a non-empty path without control characters"},
		{path: "etc/foo", target: "../../x", wantErr: "climbs out of the tree; use an absolute target"},
		{path: "foo", target: "../x", wantErr: "climbs out of the tree"},
		{path: "etc/foo", target: "a/../../../x", wantErr: "climbs out of the tree"},
	}
	for _, tt := range tests {
		t.Run(tt.path+"->"+tt.target, func(t *testing.T) {
			err := checkSymlink(tt.path, tt.target)
			if tt.wantErr == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
		})
	}
}
