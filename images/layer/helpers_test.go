package layer

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// writeFile writes a file with the raw mode bits mode (0o4755 is setuid:
// os.Chmod would take it as a FileMode and drop the bit).
func writeFile(t *testing.T, path, content string, mode uint32) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
	chmod(t, path, mode)
}

// chmod sets raw mode bits, past the umask.
func chmod(t *testing.T, path string, mode uint32) {
	t.Helper()
	require.NoError(t, syscall.Chmod(path, mode))
}

// header is a parsed newc header, for checking what the writer wrote.
type header struct {
	name                          string
	ino, mode, uid, gid, nlink    uint32
	mtime, size, devmaj, devmin   uint32
	rdevmaj, rdevmin, namesz, chk uint32
	data                          string
}

// readArchive parses a newc archive up to and including its trailer and
// returns the entries and the length of the archive including padding.
func readArchive(t *testing.T, data []byte) []header {
	t.Helper()
	r := bufio.NewReader(bytes.NewReader(data))
	var out []header
	off := 0
	read := func(n int) []byte {
		b := make([]byte, n)
		_, err := io.ReadFull(r, b)
		require.NoError(t, err, "archive truncated at %d", off)
		off += n
		return b
	}
	pad := func() {
		if off%4 != 0 {
			read(4 - off%4)
		}
	}
	for {
		raw := read(110)
		require.Equal(t, "070701", string(raw[:6]), "magic at %d", off-110)
		var f [13]uint32
		for i := range f {
			v, err := strconv.ParseUint(string(raw[6+8*i:14+8*i]), 16, 32)
			require.NoError(t, err)
			f[i] = uint32(v)
		}
		h := header{ino: f[0], mode: f[1], uid: f[2], gid: f[3], nlink: f[4], mtime: f[5], size: f[6],
			devmaj: f[7], devmin: f[8], rdevmaj: f[9], rdevmin: f[10], namesz: f[11], chk: f[12]}
		name := read(int(h.namesz))
		require.Equal(t, byte(0), name[len(name)-1])
		h.name = string(name[:len(name)-1])
		pad()
		h.data = string(read(int(h.size)))
		pad()
		out = append(out, h)
		if h.name == trailerName {
			return out
		}
	}
}

// mesonProject writes files (name -> content; names ending in .sh get
// mode 0755) into a new source directory, runs meson setup and returns the
// build directory.
func mesonProject(t *testing.T, files map[string]string) string {
	t.Helper()
	if _, err := exec.LookPath("meson"); err != nil {
		t.Fatalf("meson is needed (scripts/install-deps installs it): %v", err)
	}
	src := t.TempDir()
	for name, content := range files {
		mode := uint32(0o644)
		if strings.HasSuffix(name, ".sh") {
			mode = 0o755
		}
		writeFile(t, filepath.Join(src, name), content, mode)
	}
	build := filepath.Join(src, "build")
	out, err := exec.Command("meson", "setup", "--prefix=/usr", build, src).CombinedOutput()
	require.NoError(t, err, "meson setup: %s", out)
	return build
}

// logLines collects Logf output.
type logLines struct{ lines []string }

func (l *logLines) logf(format string, args ...any) {
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
}

func (l *logLines) count(substr string) int {
	n := 0
	for _, s := range l.lines {
		if strings.Contains(s, substr) {
			n++
		}
	}
	return n
}
