// Package unitfile reads and writes systemd unit files and drop-ins.
//
// Writing goes through github.com/coreos/go-systemd/v22/unit: a file is a
// list of unit.UnitOption and unit.Serialize lays it out. Reading does not:
// go-systemd's unit.DeserializeSections reads differently from systemd's
// own parser (src/shared/conf-parser.c, config_parse()) in cases a test
// unit can hit, so Read follows config_parse() instead. The cases,
// measured against the library and against systemd-analyze, are in
// unitfile_test.go (TestGoSystemdDeserializeDiffers):
//
//   - a line longer than 2048 bytes is an error to the library; systemd
//     reads lines of up to 1 MiB (LONG_LINE_MAX);
//   - a comment ending in '\' swallows the next line in the library (a
//     commented-out continued ExecStart= then hides the [Service] header
//     after it); systemd drops comment lines before it looks for a
//     continuation;
//   - a comment line inside a continued value ends the value in the
//     library, and the rest is then a syntax error; systemd skips it and
//     goes on with the value;
//   - a line ending in an escaped backslash ("\\") continues in the
//     library; to systemd it does not;
//   - a line without '=' stops the library with an error; systemd ignores
//     the line with a warning;
//   - a lone '\r' does not end a line for the library; it does for systemd;
//   - text before the first section header is silently dropped by the
//     library (a '[' in it even starts a section); systemd warns about it;
//   - a section header cut by a line end ("[Service" newline "X=1]") is
//     one header to the library; systemd refuses the file;
//   - a continued value keeps each trailing '\' and line break in the library;
//     systemd turns each trailing '\' into a space and joins the lines.
package unitfile

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"

	"github.com/coreos/go-systemd/v22/unit"
)

// MaxLine is systemd's LONG_LINE_MAX, the longest line (and the longest
// value with its continuation lines joined) config_parse() reads.
const MaxLine = 1 << 20

// whitespace is systemd's WHITESPACE, what strstrip() removes.
const whitespace = " \t\n\r"

// Line is one logical line of a unit file that systemd does not skip: a
// section header or an assignment, with its continuation lines joined.
type Line struct {
	// Number is the line number systemd reports for it: that of its last
	// physical line.
	Number int
	// Text is the line as systemd parses it: continuations joined (each
	// trailing '\' turned into a space) and surrounding white space
	// removed.
	Text string
	// Header says the line is a section header.
	Header bool
	// Section is the section the line is in, or for a header the section
	// it starts. Empty before the first header.
	Section string
}

// Assignment splits an assignment at its first '=' as systemd does. ok is
// false where systemd ignores the line ("Missing '='" or "Missing key
// name before '='").
func (l Line) Assignment() (name, value string, ok bool) {
	if l.Header {
		return "", "", false
	}
	name, value, ok = strings.Cut(l.Text, "=")
	if !ok || name == "" {
		return "", "", false
	}
	return strings.Trim(name, whitespace), strings.Trim(value, whitespace), true
}

// Read splits text into logical lines as systemd's config_parse() does
// and returns the errors that make systemd refuse the whole file: a
// malformed section header, invalid UTF-8, or a line over MaxLine.
// Assignments outside any section and lines without '=', which systemd
// ignores with a warning, are returned as lines for the caller to judge.
func Read(text []byte) ([]Line, error) {
	var (
		lines        []Line
		section      string
		continuation []byte
		inCont       bool
		bomSeen      bool
	)
	parse := func(number int, l []byte) error {
		s := strings.Trim(string(l), whitespace)
		if s == "" {
			return nil
		}
		if !utf8.ValidString(s) {
			return fmt.Errorf("line %d: not valid UTF-8", number)
		}
		if s[0] == '[' {
			if s[len(s)-1] != ']' || len(s) < 2 {
				return fmt.Errorf("line %d: malformed section header %q", number, s)
			}
			name := s[1 : len(s)-1]
			if !stringIsSafe(name) {
				return fmt.Errorf("line %d: section header %q has quotes, backslashes or control characters", number, s)
			}
			section = name
			lines = append(lines, Line{Number: number, Text: s, Header: true, Section: section})
			return nil
		}
		lines = append(lines, Line{Number: number, Text: s, Section: section})
		return nil
	}

	number := 0
	for rest := text; len(rest) > 0; {
		var buf []byte
		buf, rest = readLine(rest)
		number++
		if len(buf) > MaxLine {
			return nil, fmt.Errorf("line %d: longer than %d bytes", number, MaxLine)
		}
		// Comment lines are dropped first, so they neither continue nor
		// end a continued value.
		if l := bytes.TrimLeft(buf, whitespace); len(l) > 0 && (l[0] == '#' || l[0] == ';') {
			continue
		}
		l := buf
		if !bomSeen {
			if q, ok := bytes.CutPrefix(buf, []byte("\uFEFF")); ok {
				l, bomSeen = q, true
			}
		}
		var p []byte
		if inCont {
			if len(continuation)+len(l) > MaxLine {
				return nil, fmt.Errorf("line %d: continued line longer than %d bytes", number, MaxLine)
			}
			continuation = append(continuation, l...)
			p = continuation
		} else {
			p = append([]byte(nil), l...)
		}
		escaped := false
		for _, c := range p {
			if escaped {
				escaped = false
			} else if c == '\\' {
				escaped = true
			}
		}
		if escaped {
			p[len(p)-1] = ' '
			continuation, inCont = p, true
			continue
		}
		if err := parse(number, p); err != nil {
			return nil, err
		}
		continuation, inCont = nil, false
	}
	if inCont {
		// A file ending in a continued line: systemd parses what it has.
		if err := parse(number+1, continuation); err != nil {
			return nil, err
		}
	}
	return lines, nil
}

// readLine cuts the first line off text as systemd's read_line() does:
// a line ends at '\n', '\r' or NUL, and a run of these with no kind twice
// and nothing after a NUL ("\r\n", "\n\r", "\n\0", "\r\n\0", ...) is one
// line end.
func readLine(text []byte) (line, rest []byte) {
	i := bytes.IndexAny(text, "\n\r\x00")
	if i < 0 {
		return text, nil
	}
	line = text[:i]
	seen := map[byte]bool{}
	for ; i < len(text); i++ {
		c := text[i]
		if c != '\n' && c != '\r' && c != 0 || seen[c] {
			break
		}
		seen[c] = true
		if c == 0 {
			i++
			break
		}
	}
	return line, text[i:]
}

// stringIsSafe is systemd's string_is_safe(): no control characters, no
// quotes, no backslash.
func stringIsSafe(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < ' ' || c == 0x7f || c == '"' || c == '\'' || c == '\\' {
			return false
		}
	}
	return true
}

// Options returns the assignments among lines that systemd would apply
// (those in a section, with a key name), in go-systemd's form.
func Options(lines []Line) []*unit.UnitOption {
	var opts []*unit.UnitOption
	for _, l := range lines {
		name, value, ok := l.Assignment()
		if !ok || l.Section == "" {
			continue
		}
		opts = append(opts, unit.NewUnitOption(l.Section, name, value))
	}
	return opts
}

// Serialize lays opts out as a unit file with unit.Serialize: a header
// per section in the order sections first appear, "Name=Value" lines, no
// escaping. A value must therefore be one line without leading or
// trailing white space, and what a setting unquotes (Environment=,
// ExecStart=) must be quoted by the caller; the tests of each writer
// read its output back with Read.
func Serialize(opts []*unit.UnitOption) string {
	// unit.Serialize returns a *bytes.Buffer, which ReadAll cannot fail on.
	b, _ := io.ReadAll(unit.Serialize(opts))
	return string(b)
}
