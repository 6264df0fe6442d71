package images

import (
	"errors"
	"fmt"
	"path"
	"regexp"
	"strconv"
	"strings"
	"unicode"
)

// SysusersConf is where a recipe's sysusers lines go in the tree; the
// build applies it with the tree's systemd-sysusers, and so does every boot
// (a no-op once the users exist).
const SysusersConf = "usr/lib/sysusers.d/vmharness-recipe.conf"

var (
	// userNameRE is systemd's strict user and group name rule.
	userNameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_-]{0,30}$`)
	idRangeRE  = regexp.MustCompile(`^[0-9]+(-[0-9]+)?$`)
)

// sysusersLine is the part of a sysusers.d line the build needs.
type sysusersLine struct {
	kind, name string
	// home is a u line's home directory, "" if it names none.
	home string
}

// parseSysusersLine splits and checks one sysusers.d(5) line: type u, g, m
// or r, a name, and an ID, GECOS, home and shell where the type takes them.
// It checks what would otherwise only fail in the middle of a build, or
// silently do something else (a line break would start a second line).
func parseSysusersLine(line string) (sysusersLine, error) {
	bad := func(format string, args ...any) (sysusersLine, error) {
		return sysusersLine{}, fmt.Errorf("sysusers line %q: %s", line, fmt.Sprintf(format, args...))
	}
	if strings.IndexFunc(line, unicode.IsControl) >= 0 {
		return bad("control characters (a line break, a tab) are not allowed; give one line per list entry")
	}
	fields, err := splitSysusersFields(line)
	if err != nil {
		return bad("%v", err)
	}
	switch len(fields) {
	case 0:
		return bad("empty")
	case 1:
		return bad("no name; a line is TYPE NAME [ID [GECOS [HOME [SHELL]]]]")
	}
	for len(fields) < 6 {
		fields = append(fields, "-")
	}
	l := sysusersLine{kind: fields[0], name: fields[1]}
	id, gecos, home, shell := fields[2], fields[3], fields[4], fields[5]
	switch l.kind {
	case "u", "g", "m":
		if !userNameRE.MatchString(l.name) {
			return bad("name %q: want a user or group name (letters, digits, '_', '-'; at most 31)", l.name)
		}
	case "r":
		if l.name != "-" {
			return bad("an r line's name must be \"-\"")
		}
	default:
		return bad("type %q: want u (user), g (group), m (membership) or r (ID range)", l.kind)
	}
	switch l.kind {
	case "u":
		uid, gid, _ := strings.Cut(id, ":")
		if !validID(uid) || strings.Contains(id, ":") && !validID(gid) && !userNameRE.MatchString(gid) {
			return bad("ID %q: want -, a number, UID:GID, UID:GROUP or a path", id)
		}
		if home != "-" {
			if !path.IsAbs(home) || path.Clean(home) != home {
				return bad("home directory %q: want an absolute, clean path", home)
			}
			l.home = home
		}
		if shell != "-" && !path.IsAbs(shell) {
			return bad("shell %q: want an absolute path", shell)
		}
		_ = gecos // free text
	case "g":
		if !validID(id) {
			return bad("ID %q: want -, a number or a path", id)
		}
	case "m":
		if !userNameRE.MatchString(id) {
			return bad("group %q: an m line adds the user to this group", id)
		}
	case "r":
		if !idRangeRE.MatchString(id) {
			return bad("range %q: want FROM-TO such as 500-900", id)
		}
	}
	if l.kind != "u" && (gecos != "-" || home != "-" || shell != "-") {
		return bad("a %s line takes no GECOS, home or shell", l.kind)
	}
	return l, nil
}

// validID accepts a sysusers ID field: "-", a number sysusers allows, or
// the path of a file whose owner gives the ID.
func validID(s string) bool {
	if s == "-" || path.IsAbs(s) {
		return true
	}
	n, err := strconv.ParseUint(s, 10, 32)
	// 65535 and 4294967295 are the 16- and 32-bit "no user" values.
	return err == nil && n != 65535 && n != 4294967295
}

// splitSysusersFields splits a line at whitespace, honouring single and
// double quotes and backslash escapes the way systemd-sysusers does.
func splitSysusersFields(line string) ([]string, error) {
	var (
		fields  []string
		cur     strings.Builder
		inField bool
		quote   rune
		escaped bool
	)
	for _, c := range line {
		switch {
		case escaped:
			cur.WriteRune(c)
			escaped = false
		case c == '\\':
			escaped, inField = true, true
		case quote != 0:
			if c == quote {
				quote = 0
			} else {
				cur.WriteRune(c)
			}
		case c == '"' || c == '\'':
			quote, inField = c, true
		case c == ' ':
			if inField {
				fields = append(fields, cur.String())
				cur.Reset()
				inField = false
			}
		default:
			cur.WriteRune(c)
			inField = true
		}
	}
	if quote != 0 || escaped {
		return nil, errors.New("unterminated quote or escape")
	}
	if inField {
		fields = append(fields, cur.String())
	}
	if len(fields) > 6 {
		return nil, fmt.Errorf("%d fields, at most 6 (type, name, ID, GECOS, home, shell)", len(fields))
	}
	return fields, nil
}

// checkSysusers checks a recipe file's sysusers lines.
func checkSysusers(lines []string) error {
	var errs []error
	for _, line := range lines {
		if _, err := parseSysusersLine(line); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// addSysusers appends a layer's lines to the merged ones. sysusers keeps
// the first definition of a user or group and ignores later ones, so a
// second, different definition is an error instead of being lost.
func (r *Recipe) addSysusers(lines []string) error {
	var errs []error
	for _, line := range lines {
		l, err := parseSysusersLine(line)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if prev := r.definition(l); prev != "" && prev != line {
			errs = append(errs, fmt.Errorf("sysusers line %q: %s is already defined by %q", line, l.name, prev))
			continue
		}
		r.Sysusers = appendNew(r.Sysusers, line)
	}
	return errors.Join(errs...)
}

// definition is the line that already defines l's user or group, if any;
// m and r lines define nothing.
func (r *Recipe) definition(l sysusersLine) string {
	if l.kind != "u" && l.kind != "g" {
		return ""
	}
	for _, prev := range r.Sysusers {
		if p, err := parseSysusersLine(prev); err == nil && p.kind == l.kind && p.name == l.name {
			return prev
		}
	}
	return ""
}

// sysusersConf is the content of SysusersConf.
func (r *Recipe) sysusersConf() []byte {
	return []byte("# Written by vmharness from the image recipe's \"sysusers\".\n" + strings.Join(r.Sysusers, "\n") + "\n")
}

// homesToCreate lists the users whose home directory the build creates:
// sysusers only records a home, it never makes one. A home that already
// exists in the tree (/, /root, a package's directory) is left alone when
// building, and /nonexistent is by convention never created.
func (r *Recipe) homesToCreate() []sysusersLine {
	var homes []sysusersLine
	for _, line := range r.Sysusers {
		l, err := parseSysusersLine(line)
		if err != nil || l.kind != "u" || l.home == "" || l.home == "/" {
			continue
		}
		if l.home == "/nonexistent" || strings.HasPrefix(l.home, "/nonexistent/") {
			continue
		}
		homes = append(homes, l)
	}
	return homes
}
