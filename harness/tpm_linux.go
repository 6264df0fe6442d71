package harness

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// maxUnixSocketPath is the longest path a Unix socket address holds
// (sun_path is 108 bytes with the terminating NUL).
const maxUnixSocketPath = 107

// swtpm is one VM's software TPM 2.0: a swtpm process that QEMU's
// tpm-emulator backend talks to over a control socket in the work
// directory, with the TPM's state next to it. Machine.Run starts it right
// before QEMU and stops it once QEMU is gone, however Run ends.
type swtpm struct {
	binary   string
	stateDir string
	socket   string
	logPath  string

	listener *net.UnixListener
	proc     *os.Process
	exited   chan error
	// pid is the last swtpm started, for tests to check it is gone.
	pid int
}

// newSWTPM checks that a TPM can be set up in workDir; it starts nothing.
func newSWTPM(binary, workDir string) (*swtpm, error) {
	if binary == "" {
		binary = "swtpm"
	}
	path, err := exec.LookPath(binary)
	if err != nil {
		return nil, fmt.Errorf("--tpm: swtpm not found (%s); install the swtpm package: %w", binary, err)
	}
	t := &swtpm{
		binary:   path,
		stateDir: filepath.Join(workDir, "tpm"),
		socket:   filepath.Join(workDir, "tpm.sock"),
		logPath:  filepath.Join(workDir, "swtpm.log"),
	}
	if len(t.socket) > maxUnixSocketPath {
		return nil, fmt.Errorf("--tpm: the TPM socket path %s is longer than a Unix socket address holds (%d bytes); use a shorter runtime directory (VMHARNESS_RUNTIME_DIR)", t.socket, maxUnixSocketPath)
	}
	return t, nil
}

// qemuArgs connects QEMU's TPM device to this swtpm. tpm-crb is the
// command-response buffer interface x86 firmware and Linux expect of a
// TPM 2.0 (QEMU's docs/specs/tpm.rst); its kernel driver is built in.
func (t *swtpm) qemuArgs() []string {
	return []string{
		"-chardev", "socket,id=chrtpm,path=" + QEMUOptionValue(t.socket),
		"-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
		"-device", "tpm-crb,tpmdev=tpm0",
	}
}

// swtpmArgs is swtpm's command line. The control socket (fd 3, listening
// already, so QEMU can connect the moment it starts) and the log (fd 4)
// are handed over as descriptors and the state directory through
// $TPM_PATH: no path goes through swtpm's comma-separated options, which
// cannot escape a comma. --terminate ends swtpm when QEMU disconnects.
func swtpmArgs() []string {
	return []string{"socket", "--tpm2", "--ctrl", "type=unixio,fd=3", "--log", "fd=4", "--terminate"}
}

// start creates the state directory and the control socket and starts
// swtpm. On error nothing is left running.
func (t *swtpm) start() (err error) {
	if err := os.Mkdir(t.stateDir, 0o700); err != nil {
		return fmt.Errorf("TPM state directory: %w", err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: t.socket, Net: "unix"})
	if err != nil {
		return fmt.Errorf("TPM control socket: %w", err)
	}
	t.listener = l
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	sockFile, err := l.File()
	if err != nil {
		return fmt.Errorf("TPM control socket: %w", err)
	}
	defer sockFile.Close()
	logFile, err := os.OpenFile(t.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("swtpm log: %w", err)
	}
	defer logFile.Close()

	cmd := exec.Command(t.binary, swtpmArgs()...)
	cmd.Env = append(os.Environ(), "TPM_PATH="+t.stateDir)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.ExtraFiles = []*os.File{sockFile, logFile}
	// If the runner is killed outright, the kernel kills swtpm too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	started := make(chan error, 1)
	t.exited = make(chan error, 1)
	go func() {
		// Pdeathsig fires when the thread that forked the child exits, so
		// that thread stays locked until swtpm is reaped.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		t.exited <- cmd.Wait()
	}()
	if err := <-started; err != nil {
		return fmt.Errorf("starting %s: %w", t.binary, err)
	}
	t.proc, t.pid = cmd.Process, cmd.Process.Pid
	// swtpm fails at once on bad state or options; catch that here rather
	// than as QEMU's "failed to connect" later.
	select {
	case err := <-t.exited:
		t.exited <- err
		t.proc = nil
		return fmt.Errorf("swtpm exited at start (%v): %s", err, t.logTail())
	case <-time.After(100 * time.Millisecond):
	}
	return nil
}

// stop ends swtpm (it normally exits by itself once QEMU is gone),
// removes its socket and state, and returns whatever went wrong.
func (t *swtpm) stop() error {
	var errs []error
	if t.proc != nil {
		select {
		case <-t.exited:
		case <-time.After(2 * time.Second):
			t.proc.Signal(syscall.SIGTERM)
			select {
			case <-t.exited:
			case <-time.After(3 * time.Second):
				t.proc.Kill()
				<-t.exited
			}
		}
		t.proc = nil
	}
	if t.listener != nil {
		// Closing the listener removes the socket file.
		if err := t.listener.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
		t.listener = nil
	}
	if err := os.RemoveAll(t.stateDir); err != nil {
		errs = append(errs, fmt.Errorf("removing the TPM state: %w", err))
	}
	return errors.Join(errs...)
}

// logTail is the end of swtpm's log, for error messages.
func (t *swtpm) logTail() string {
	data, err := os.ReadFile(t.logPath)
	if err != nil || len(data) == 0 {
		return "(swtpm logged nothing)"
	}
	s := strings.TrimSpace(string(data))
	if len(s) > 2000 {
		s = "..." + s[len(s)-2000:]
	}
	return s
}
