package runner

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Keeping a failed test's VM: the VM's QEMU and its userspace vsock device
// live in the runner process, so a VM can only outlive the `vmharness run`
// that Meson waits for if that run happens in a detached child (the keeper).
// The foreground process relays the keeper's output, forwards signals and
// exits with the test's result as soon as the keeper reports it; the keeper
// then keeps serving the VM until it is stopped or its time is up.

// supervisorFDEnv names the keeper's end of the result pipe (always fd 3).
const supervisorFDEnv = "VMHARNESS_SUPERVISOR_FD"

// runDetached starts the keeper and waits for its result.
func runDetached(ctx context.Context, env *cliEnv, args []string) int {
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(env.stderr, "vmharness run: cannot find own executable to keep the VM: %v\n", err)
		return exitHarnessError
	}
	resultR, resultW, err := os.Pipe()
	if err != nil {
		fmt.Fprintf(env.stderr, "vmharness run: %v\n", err)
		return exitHarnessError
	}
	defer resultR.Close()
	cmd := exec.Command(self, append([]string{"run"}, args...)...)
	cmd.Env = append(os.Environ(), supervisorFDEnv+"=3")
	cmd.ExtraFiles = []*os.File{resultW}
	// A pipe, not our own stderr: Meson reads the test's output until EOF,
	// so the keeper must not hold Meson's pipe once we have exited.
	stderr, err := cmd.StderrPipe()
	if err != nil {
		fmt.Fprintf(env.stderr, "vmharness run: %v\n", err)
		return exitHarnessError
	}
	// Its own session: Meson's process-group kill must not reach a kept VM.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(env.stderr, "vmharness run: starting the VM keeper: %v\n", err)
		return exitHarnessError
	}
	resultW.Close()
	relayed := make(chan struct{})
	go func() {
		io.Copy(env.stderr, stderr)
		close(relayed)
	}()
	stopForwarding := context.AfterFunc(ctx, func() { cmd.Process.Signal(syscall.SIGTERM) })
	defer stopForwarding()

	line, _ := bufio.NewReader(resultR).ReadString('\n')
	if code, ok := strings.CutPrefix(strings.TrimSpace(line), "EXIT "); ok {
		// The keeper keeps the VM; it closed its end of the output pipe
		// before reporting, so the relay is done.
		<-relayed
		n, err := strconv.Atoi(code)
		if err != nil {
			return exitHarnessError
		}
		return n
	}
	// No result line: the keeper finished the run itself (pass, skip, or
	// failure without keeping); its exit code is the result.
	<-relayed
	err = cmd.Wait()
	if cmd.ProcessState == nil {
		fmt.Fprintf(env.stderr, "vmharness run: VM keeper: %v\n", err)
		return exitHarnessError
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		fmt.Fprintf(env.stderr, "vmharness run: VM keeper killed by %s\n", ws.Signal())
		return exitHarnessError
	}
	return cmd.ProcessState.ExitCode()
}

// keeperHandoff is the keeper's side: once the test has failed and the VM is
// kept, report the result to the foreground process and stop writing to its
// pipe, so it can exit while the VM runs on.
type keeperHandoff struct {
	result *os.File
}

// newKeeperHandoff wraps the result pipe of a keeper, or returns nil in any
// other process. main has prepared the pipe (prepareKeeperProcess).
func newKeeperHandoff(getenv func(string) string) *keeperHandoff {
	if getenv(supervisorFDEnv) != "3" {
		return nil
	}
	return &keeperHandoff{result: os.NewFile(3, "vmharness-result")}
}

// prepareKeeperProcess readies a keeper process for the run before it does
// anything else; main calls it once, since both changes are process-wide.
// In any other process it does nothing.
//
//   - The result pipe (fd 3, inherited without close-on-exec) becomes
//     close-on-exec. Otherwise QEMU, qemu-img, systemd-journal-remote or an
//     image build would hold its write end, and the foreground process,
//     which reads it to EOF when the keeper ends without keeping the VM,
//     would wait for them.
//   - A write to the foreground's stderr pipe after the foreground has gone
//     (killed by Meson after its grace period) fails with EPIPE instead of
//     killing the keeper, and with it the VM it serves. Go does that for
//     fds 1 and 2 only if SIGPIPE is ignored or notified; notified, because
//     an ignored SIGPIPE would be inherited by the keeper's children.
func prepareKeeperProcess(getenv func(string) string) error {
	if getenv(supervisorFDEnv) != "3" {
		return nil
	}
	if _, err := unix.FcntlInt(3, unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
		return fmt.Errorf("%s=3 but fd 3 is not usable (%w): the variable is for the VM keeper that `vmharness run --keep-failed-vm` starts; unset it", supervisorFDEnv, err)
	}
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	return nil
}

// detach reports exitCode and points stdout and stderr at logPath.
func (k *keeperHandoff) detach(exitCode int, logPath string) error {
	log, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	for _, fd := range []int{1, 2} {
		if err := syscall.Dup3(int(log.Fd()), fd, 0); err != nil {
			return fmt.Errorf("redirecting fd %d to %s: %w", fd, logPath, err)
		}
	}
	_, err = fmt.Fprintf(k.result, "EXIT %d\n", exitCode)
	k.result.Close()
	return err
}
