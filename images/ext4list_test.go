package images

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// ext4Entry is what a comparison of two images looks at for one path:
// everything about a file that ownership, modes and packages decide, but
// not its times, inode number or contents.
type ext4Entry struct {
	Mode     uint32 // i_mode: type and permission bits
	UID, GID int
	Links    int
	Target   string // a symlink's target
	Device   string // a device node's major:minor
	Xattrs   string // debugfs's lines for the extended attributes, with values
	nodeInfo bool
}

func (e ext4Entry) String() string {
	s := fmt.Sprintf("mode %07o uid %d gid %d links %d", e.Mode, e.UID, e.GID, e.Links)
	if e.Target != "" {
		s += " -> " + e.Target
	}
	if e.Device != "" {
		s += " device " + e.Device
	}
	if e.Xattrs != "" {
		s += " xattrs [" + e.Xattrs + "]"
	}
	return s
}

// listExt4 reads every path of an ext4 image with debugfs, without
// mounting it: a breadth-first walk with `ls -p`, one debugfs per depth,
// then one `stat` per inode for link counts, symlink targets, device
// numbers and extended attributes.
func listExt4(t *testing.T, debugfs, img string) map[string]ext4Entry {
	t.Helper()
	entries := map[string]ext4Entry{}
	inodes := map[int][]string{}
	type dir struct {
		path string
		ino  int
	}
	level := []dir{{"/", 2}}
	entries["/"] = ext4Entry{}
	inodes[2] = []string{"/"}
	for len(level) > 0 {
		var script strings.Builder
		byIno := map[int]string{}
		for _, d := range level {
			fmt.Fprintf(&script, "ls -p <%d>\n", d.ino)
			byIno[d.ino] = d.path
		}
		level = nil
		for ino, out := range debugfsBatch(t, debugfs, img, script.String(), "ls -p") {
			parent := byIno[ino]
			for _, line := range strings.Split(out, "\n") {
				if line == "" {
					continue
				}
				// /ino/mode/uid/gid/name/size/ (a directory's size is empty)
				f := strings.Split(line, "/")
				require.GreaterOrEqual(t, len(f), 7, "debugfs ls -p line %q", line)
				name := strings.Join(f[5:len(f)-2], "/")
				if name == "." || name == ".." {
					continue
				}
				childIno, err1 := strconv.Atoi(f[1])
				mode, err2 := strconv.ParseUint(f[2], 8, 32)
				uid, err3 := strconv.Atoi(f[3])
				gid, err4 := strconv.Atoi(f[4])
				require.NoError(t, errorsJoin(err1, err2, err3, err4), "debugfs ls -p line %q", line)
				if childIno == 0 {
					continue // an unused slot (lost+found has them)
				}
				p := strings.TrimSuffix(parent, "/") + "/" + name
				entries[p] = ext4Entry{Mode: uint32(mode), UID: uid, GID: gid}
				inodes[childIno] = append(inodes[childIno], p)
				if mode&0o170000 == 0o040000 {
					level = append(level, dir{p, childIno})
				}
			}
		}
	}

	var script strings.Builder
	for ino := range inodes {
		fmt.Fprintf(&script, "stat <%d>\n", ino)
	}
	for ino, out := range debugfsBatch(t, debugfs, img, script.String(), "stat") {
		info := parseStat(t, out)
		if info.Target == "" && inodeIsSymlink(entries[inodes[ino][0]].Mode) {
			// A slow symlink: its target is in a data block.
			target, err := exec.Command(debugfs, "-R", fmt.Sprintf("cat <%d>", ino), img).Output()
			require.NoError(t, err)
			info.Target = string(target)
		}
		for _, p := range inodes[ino] {
			e := entries[p]
			e.Links, e.Target, e.Device, e.Xattrs, e.nodeInfo = info.Links, info.Target, info.Device, info.Xattrs, true
			entries[p] = e
		}
	}
	for p, e := range entries {
		require.True(t, e.nodeInfo, "no stat output for %s", p)
	}
	return entries
}

func inodeIsSymlink(mode uint32) bool { return mode&0o170000 == 0o120000 }

func errorsJoin(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

var debugfsEcho = regexp.MustCompile(`^debugfs: (\S+(?: -p)?) <(\d+)>$`)

// debugfsBatch runs a script of "CMD <ino>" lines and returns each
// command's output by inode. debugfs echoes every command of a script
// as "debugfs: CMD <ino>"; what follows until the next echo is its output.
func debugfsBatch(t *testing.T, debugfs, img, script, cmd string) map[int]string {
	t.Helper()
	c := exec.Command(debugfs, "-f", "-", img)
	// Without a pager, so that each command's output follows its echo.
	c.Env = append(os.Environ(), "DEBUGFS_PAGER=__none__", "PAGER=__none__")
	c.Stdin = strings.NewReader(script)
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	require.NoError(t, c.Run(), "debugfs: %s", stderr.String())
	for _, line := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
		require.True(t, line == "" || strings.HasPrefix(line, "debugfs "), "debugfs said: %s", stderr.String())
	}
	out := map[int]string{}
	cur := -1
	var buf strings.Builder
	flush := func() {
		if cur >= 0 {
			out[cur] = buf.String()
		}
		buf.Reset()
	}
	for _, line := range strings.Split(stdout.String(), "\n") {
		if m := debugfsEcho.FindStringSubmatch(line); m != nil && m[1] == cmd {
			flush()
			cur, _ = strconv.Atoi(m[2])
			continue
		}
		buf.WriteString(line + "\n")
	}
	flush()
	require.Equal(t, strings.Count(script, "\n"), len(out), "one output per command")
	return out
}

var (
	statLinks  = regexp.MustCompile(`(?m)^Links: (\d+)`)
	statFast   = regexp.MustCompile(`(?m)^Fast link dest: "(.*)"$`)
	statDevice = regexp.MustCompile(`(?m)^Device major/minor number: (\S+)`)
)

// parseStat reads what ext4Entry needs out of debugfs's stat output.
func parseStat(t *testing.T, out string) ext4Entry {
	t.Helper()
	var e ext4Entry
	m := statLinks.FindStringSubmatch(out)
	require.NotNil(t, m, "no link count in %q", out)
	e.Links, _ = strconv.Atoi(m[1])
	if m := statFast.FindStringSubmatch(out); m != nil {
		e.Target = m[1]
	}
	if m := statDevice.FindStringSubmatch(out); m != nil {
		e.Device = m[1]
	}
	var xattrs []string
	in := false
	for _, line := range strings.Split(out, "\n") {
		switch {
		case line == "Extended attributes:":
			in = true
		case in && strings.HasPrefix(line, "  "):
			xattrs = append(xattrs, strings.TrimSpace(line))
		default:
			in = false
		}
	}
	sort.Strings(xattrs)
	e.Xattrs = strings.Join(xattrs, "; ")
	return e
}

// diffExt4 lists the paths whose entries differ, or that only one image has.
func diffExt4(a, b map[string]ext4Entry) []string {
	var diffs []string
	for p, ea := range a {
		eb, ok := b[p]
		switch {
		case !ok:
			diffs = append(diffs, fmt.Sprintf("%s: only in the first (%s)", p, ea))
		case ea != eb:
			diffs = append(diffs, fmt.Sprintf("%s: %s vs %s", p, ea, eb))
		}
	}
	for p, eb := range b {
		if _, ok := a[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s: only in the second (%s)", p, eb))
		}
	}
	sort.Strings(diffs)
	return diffs
}
