package journalremote

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"sync"
	"time"
)

// ErrJournalRemoteMissing means no systemd-journal-remote binary was found;
// the Collector then keeps the raw export stream instead of a journal file.
var ErrJournalRemoteMissing = errors.New("systemd-journal-remote not found")

// journalRemoteCandidates are where Debian/Ubuntu (/lib) and Fedora/Arch/
// merged-/usr systems (/usr/lib) install the binary; it is never on PATH.
var journalRemoteCandidates = []string{
	"/usr/lib/systemd/systemd-journal-remote",
	"/lib/systemd/systemd-journal-remote",
}

// FindJournalRemote returns the systemd-journal-remote to use: override when
// set, else the first executable of the usual locations or PATH. The error
// wraps ErrJournalRemoteMissing. A runner whose user explicitly asked for
// journals can call it before booting anything and fail early.
func FindJournalRemote(override string) (string, error) {
	if override != "" {
		if err := checkExecutable(override); err != nil {
			return "", fmt.Errorf("%w at %s: %v", ErrJournalRemoteMissing, override, err)
		}
		return override, nil
	}
	for _, p := range journalRemoteCandidates {
		if checkExecutable(p) == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath("systemd-journal-remote"); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%w in /usr/lib/systemd, /lib/systemd or PATH (install the systemd-journal-remote package)", ErrJournalRemoteMissing)
}

func checkExecutable(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file", path)
	}
	return nil
}

// sink receives whole export-format entries. Calls are serialised by the
// Collector.
type sink interface {
	write(entries []byte, n int) error
	close() error
}

// journalRemoteSink feeds one long-lived systemd-journal-remote through its
// stdin. One process for the whole test keeps a single writer on the output
// file, across all of the guest's connections (reboots).
type journalRemoteSink struct {
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	stderr  *tailBuffer
	exited  chan struct{} // closed when cmd.Wait returned
	waitErr error
	sent    int64 // entries written to stdin
}

// Flags, all explicit so a host's /etc/systemd/journal-remote.conf cannot
// change them:
//   - --split-mode=none: exactly the one output file we name.
//   - --seal=no: no forward-secure sealing keys to manage for a test log.
//   - --compress=yes: journald's default; large fields are compressed with
//     whatever the binary was built with, and journalctl reads it back.
//   - "-": read Journal Export Format from stdin.
//
// systemd-journal-remote 252 has no size options (MaxUse= and friends came
// in 253). An existing output file is appended to. When the file's hash
// tables fill up (about 175,000 distinct field values) or it reaches the
// default 128 MiB it is renamed to NAME@....journal and a new NAME.journal
// is started; nothing is deleted, so Collector.Files lists those too.
func journalRemoteArgs(output string) []string {
	return []string{"--output=" + output, "--split-mode=none", "--seal=no", "--compress=yes", "-"}
}

func startJournalRemote(binary, output string) (*journalRemoteSink, error) {
	cmd := exec.Command(binary, journalRemoteArgs(output)...)
	// Its log goes to our pipe, never to the host's journal, in a form we
	// can parse ("Finishing after writing N entries").
	cmd.Env = append(os.Environ(),
		"SYSTEMD_LOG_TARGET=console", "SYSTEMD_LOG_LEVEL=info", "SYSTEMD_LOG_COLOR=0",
		"SYSTEMD_LOG_LOCATION=0", "SYSTEMD_LOG_TIME=0")
	// Its own process group: a ^C or Meson's kill of our group must not
	// stop it before we have closed its stdin; it exits by itself at EOF,
	// also when we die.
	cmd.SysProcAttr = ownProcessGroup()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("starting %s: %w", binary, err)
	}
	s := &journalRemoteSink{cmd: cmd, stdin: stdin, stderr: newTailBuffer(16 << 10), exited: make(chan struct{})}
	cmd.Stderr = s.stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", binary, err)
	}
	go func() {
		s.waitErr = cmd.Wait()
		close(s.exited)
	}()
	return s, nil
}

func (s *journalRemoteSink) write(entries []byte, n int) error {
	if _, err := s.stdin.Write(entries); err != nil {
		return fmt.Errorf("writing to systemd-journal-remote: %w%s", err, s.stderrNote())
	}
	s.sent += int64(n)
	return nil
}

// journalRemoteExitTimeout bounds how long systemd-journal-remote may take to
// write out what it has read after its stdin closed.
const journalRemoteExitTimeout = 60 * time.Second

var finishedRE = regexp.MustCompile(`Finishing after writing (\d+) entries`)

// close ends the input and waits until systemd-journal-remote has written
// and closed the journal file. It also checks the entry count the tool
// reports against what it was sent, so a silently dropped entry is an error.
func (s *journalRemoteSink) close() error {
	closeErr := s.stdin.Close()
	timer := time.NewTimer(journalRemoteExitTimeout)
	defer timer.Stop()
	select {
	case <-s.exited:
	case <-timer.C:
		_ = s.cmd.Process.Kill()
		<-s.exited
		return fmt.Errorf("systemd-journal-remote did not finish within %v after its input ended; killed it, the journal file may be incomplete%s", journalRemoteExitTimeout, s.stderrNote())
	}
	if s.waitErr != nil {
		return fmt.Errorf("systemd-journal-remote failed: %w%s", s.waitErr, s.stderrNote())
	}
	if closeErr != nil && !errors.Is(closeErr, os.ErrClosed) {
		return fmt.Errorf("closing systemd-journal-remote's input: %w", closeErr)
	}
	m := finishedRE.FindSubmatch(s.stderr.Bytes())
	if m == nil {
		return fmt.Errorf("systemd-journal-remote exited without reporting how many entries it wrote (sent %d)%s", s.sent, s.stderrNote())
	}
	if written, _ := strconv.ParseInt(string(m[1]), 10, 64); written != s.sent {
		return fmt.Errorf("systemd-journal-remote wrote %d of the %d entries it was sent%s", written, s.sent, s.stderrNote())
	}
	return nil
}

// abort kills the process so that blocked and later writes fail; it may be
// called concurrently with write.
func (s *journalRemoteSink) abort() { _ = s.cmd.Process.Kill() }

func (s *journalRemoteSink) stderrNote() string {
	b := bytes.TrimSpace(s.stderr.Bytes())
	if len(b) == 0 {
		return ""
	}
	return "; its output:\n" + string(b)
}

// exportFileSink keeps the raw, sanitised export stream: whole entries only,
// so systemd-journal-remote can convert the file later.
type exportFileSink struct {
	f *os.File
	w *bufio.Writer
}

func createExportFile(path string) (*exportFileSink, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("creating raw journal export file: %w", err)
	}
	return &exportFileSink{f: f, w: bufio.NewWriterSize(f, 256<<10)}, nil
}

func (s *exportFileSink) write(entries []byte, _ int) error {
	if _, err := s.w.Write(entries); err != nil {
		return fmt.Errorf("writing %s: %w", s.f.Name(), err)
	}
	return nil
}

func (s *exportFileSink) close() error {
	err := s.w.Flush()
	if cerr := s.f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing %s: %w", s.f.Name(), err)
	}
	return nil
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func newTailBuffer(max int) *tailBuffer { return &tailBuffer{max: max} }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) Bytes() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	return bytes.Clone(t.buf)
}
