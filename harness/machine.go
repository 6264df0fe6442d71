package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmharness/vmharness/harness/vsock"
)

// BootImage is the cached image a VM boots: kernel and initrd for direct
// boot and the root file system the overlay is backed by. The harness only
// ever opens Rootfs read-only (as a qcow2 backing file).
type BootImage struct {
	Kernel       string
	Initrd       string
	Rootfs       string
	RootfsFormat string // "raw" or "qcow2"
}

// Config describes one test VM. The caller owns WorkDir and Transport;
// the Machine owns the QEMU process and everything it creates in WorkDir.
type Config struct {
	Name  string
	QEMU  string // QEMU system emulator binary; default qemu-system-x86_64
	Image BootImage
	Unit  TestUnit
	// SkipTestUnit boots the guest to multi-user.target with the test unit
	// installed but not started (for interactive debugging).
	SkipTestUnit bool
	Credentials  []Credential // user and harness credentials, not the unit's
	KernelArgs   []string     // appended to the harness's kernel command line
	QEMUArgs     []string     // appended to the harness's QEMU arguments
	MemoryMiB    int
	CPUs         int
	// CPUModel is QEMU's -cpu value. Empty means "host" under KVM and,
	// under TCG, "max" without the flags TCG runs slowly (see cpu.go).
	CPUModel string
	Accel    Accel
	// WorkDir is a private directory for the overlay and credential files.
	WorkDir    string
	ConsoleLog string
	Transport  vsock.Transport
	// NotifyListener receives the guest's sd_notify connections; its port
	// is NotifyPort.
	NotifyListener net.Listener
	NotifyPort     uint32
	// Timeout bounds the whole run (0: none). BootTimeout bounds the time
	// until the guest's service manager first talks to the host, not
	// counting time in which QEMU waited for a host CPU.
	Timeout     time.Duration
	BootTimeout time.Duration
	// KeepOnFailure is called when the test unit failed while the VM is
	// still up (the keep-on-failure drop-in is installed when it is set).
	// It returns how long to keep the VM running for inspection; Run then
	// returns only when QEMU exits, the time is up or ctx ends, with the
	// test's failure as the outcome. Returning 0 stops the VM at once.
	KeepOnFailure func(o Outcome) time.Duration
	// OnReady is called once when the guest reports READY=1 (boot done).
	OnReady func()
	Logf    func(format string, args ...any)
}

// Result is what one VM run produced.
type Result struct {
	Outcome Outcome
	// ExitStatus is the guest's EXIT_STATUS, if it sent one.
	ExitStatus    int
	HasExitStatus bool
	// ConsoleTail holds the last lines of the serial console.
	ConsoleTail []string
	// QEMUStderr is what QEMU itself printed (its errors).
	QEMUStderr string
	Elapsed    time.Duration
}

// Machine is one QEMU process running a test. Create it with NewMachine,
// then call Run once.
type Machine struct {
	cfg     Config
	cpu     string // QEMU's -cpu value
	overlay string
	args    []string
	notify  *NotifyState

	mu   sync.Mutex
	proc *os.Process
}

// NewMachine validates cfg and prepares the work directory: the qcow2
// overlay over the cached image and the 0600 credential files.
func NewMachine(ctx context.Context, cfg Config) (*Machine, error) {
	if cfg.QEMU == "" {
		cfg.QEMU = "qemu-system-x86_64"
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 1024
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = 2
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	if cfg.Transport == nil || cfg.NotifyListener == nil {
		return nil, errors.New("harness: Config needs a vsock Transport and a NotifyListener")
	}
	for _, p := range []string{cfg.Image.Kernel, cfg.Image.Initrd, cfg.Image.Rootfs} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("image file missing (rebuild with vmharness image build): %w", err)
		}
	}
	qemu, err := exec.LookPath(cfg.QEMU)
	if err != nil {
		return nil, fmt.Errorf("QEMU not found (%s); install qemu-system-x86 or set VMHARNESS_QEMU: %w", cfg.QEMU, err)
	}
	cfg.QEMU = qemu

	notifyAddr := fmt.Sprintf("vsock-stream:%d:%d", vsock.HostCID, cfg.NotifyPort)
	creds := append(testUnitCredentials(cfg.Unit, cfg.KeepOnFailure != nil, notifyAddr), cfg.Credentials...)
	if err := CheckCredentialSizes(creds); err != nil {
		return nil, err
	}
	m := &Machine{cfg: cfg, notify: newNotifyState(), cpu: cfg.CPUModel}
	switch {
	case m.cpu != "":
	case cfg.Accel.KVM():
		m.cpu = "host"
	default:
		if m.cpu, err = probeTCGCPUModel(ctx, cfg.QEMU); err != nil {
			return nil, err
		}
	}
	m.overlay = filepath.Join(cfg.WorkDir, "overlay.qcow2")
	if err := createOverlay(ctx, m.overlay, cfg.Image); err != nil {
		return nil, err
	}
	smbiosArgs, err := writeSMBIOSFiles(cfg.WorkDir, creds)
	if err != nil {
		return nil, err
	}
	m.args = m.qemuArgs(smbiosArgs)
	return m, nil
}

// createOverlay makes the per-run copy-on-write disk. The backing file is
// referenced by absolute path and opened read-only by QEMU, so the cached
// image is shared by every run and never written.
func createOverlay(ctx context.Context, overlay string, img BootImage) error {
	backing, err := filepath.Abs(img.Rootfs)
	if err != nil {
		return err
	}
	format := img.RootfsFormat
	if format == "" {
		format = "raw"
	}
	cmd := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", format, overlay)
	out, err := cmd.CombinedOutput()
	if err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("qemu-img not found; install qemu-utils: %w", err)
		}
		return fmt.Errorf("creating overlay over %s: %v: %s", backing, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// KernelCommandLine returns the guest kernel command line for cfg.
func (m *Machine) KernelCommandLine() string {
	cfg := m.cfg
	args := []string{
		"console=ttyS0", "console=hvc0",
		"root=/dev/vda", "rw",
		// Should a panic happen before the pvpanic driver is loaded, reboot
		// at once rather than hang; the boot timeout then ends the loop.
		"panic=-1", "oops=panic",
		"systemd.crash_shell=0",
		"systemd.crash_action=poweroff",
		"systemd.show_status=error",
		"systemd.mask=serial-getty@.service",
		"systemd.mask=systemd-networkd-wait-online.service",
		"systemd.journald.forward_to_console=0",
		"systemd.firstboot=off",
	}
	if cfg.SkipTestUnit {
		args = append(args, "systemd.unit=multi-user.target")
	} else {
		args = append(args, "systemd.unit="+cfg.Unit.Name)
	}
	return strings.Join(append(args, cfg.KernelArgs...), " ")
}

func (m *Machine) qemuArgs(smbiosArgs []string) []string {
	cfg := m.cfg
	mem := strconv.Itoa(cfg.MemoryMiB) + "M"
	accel := "tcg,thread=multi"
	if cfg.Accel.KVM() {
		accel = "kvm"
	}
	args := []string{
		"-name", cfg.Name,
		"-accel", accel,
		"-cpu", m.cpu,
		"-smp", strconv.Itoa(cfg.CPUs),
		"-m", mem,
		// Guest RAM is a shared memfd so the userspace vsock device can map
		// it; the 64-bit SMBIOS entry point lifts the 64 KiB table limit
		// that large credentials would hit.
		"-object", "memory-backend-memfd,id=mem,size=" + mem + ",share=on",
		"-machine", "q35,memory-backend=mem,smbios-entry-point-type=64",
		"-nodefaults", "-display", "none", "-vga", "none",
		"-nic", "none",
		// Guest reboots are allowed (a test may reboot); a panic ends the
		// VM through the pvpanic device instead of rebooting.
		"-device", "pvpanic",
		"-action", "panic=exit-failure",
		// Kernel messages go to the serial port (synchronous, so panics
		// are seen); /dev/console is a virtio console, because journald's
		// journal+console output through an emulated UART is so slow under
		// TCG that a chatty test loses lines at shutdown. Both share one log.
		"-chardev", "file,id=console,mux=on,path=" + cfg.ConsoleLog,
		"-serial", "chardev:console",
		"-device", "virtio-serial-pci,id=virtio-serial",
		"-device", "virtconsole,chardev=console",
		"-kernel", cfg.Image.Kernel,
		"-initrd", cfg.Image.Initrd,
		"-append", m.KernelCommandLine(),
		"-drive", "if=none,id=root,file=" + m.overlay + ",format=qcow2,discard=unmap,cache=unsafe",
		"-device", "virtio-blk-pci,drive=root",
		"-device", "virtio-rng-pci",
	}
	args = append(args, cfg.Transport.QEMUArgs()...)
	args = append(args, smbiosArgs...)
	return append(args, cfg.QEMUArgs...)
}

// bootTimeLeft is how much of the boot timeout limit is left after elapsed
// wall time of which QEMU spent starved waiting for a host CPU.
func bootTimeLeft(limit, elapsed, starved time.Duration) time.Duration {
	return limit - max(elapsed-starved, 0)
}

// CPU returns the guest CPU model (QEMU's -cpu value), for logs.
func (m *Machine) CPU() string { return m.cpu }

// Args returns the QEMU arguments, for logs and tests.
func (m *Machine) Args() []string { return append([]string(nil), m.args...) }

// PID returns QEMU's pid once it runs, else 0.
func (m *Machine) PID() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.proc == nil {
		return 0
	}
	return m.proc.Pid
}

// errStartQEMU marks failures to start QEMU at all (a harness error).
var errStartQEMU = errors.New("starting QEMU")

// Run boots the VM and waits until it stops, the timeout expires or ctx
// ends, then returns the outcome. QEMU never outlives Run unless the
// caller asked for Detach and calls Keep before ctx ends. A non-nil error
// means the harness itself failed (exit 99).
func (m *Machine) Run(ctx context.Context, started func(pid int)) (*Result, error) {
	cfg := m.cfg
	start := time.Now()
	stderr := &tailBuffer{max: 16 << 10}
	cmd := exec.Command(cfg.QEMU, m.args...)
	cmd.Stdout = stderr
	cmd.Stderr = stderr
	cmd.ExtraFiles = cfg.Transport.ExtraFiles()
	// If the runner is killed outright, the kernel kills QEMU too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}

	notifyCtx, stopNotify := context.WithCancel(context.Background())
	notifyDone := make(chan struct{})
	go func() {
		defer close(notifyDone)
		serveNotify(notifyCtx, cfg.NotifyListener, m.notify, cfg.Logf)
	}()
	defer func() { stopNotify(); <-notifyDone }()

	exited := make(chan error, 1)
	startErr := make(chan error, 1)
	go func() {
		// Pdeathsig fires when the thread that forked the child exits, so
		// that thread stays locked until QEMU is reaped.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			startErr <- err
			return
		}
		m.mu.Lock()
		m.proc = cmd.Process
		m.mu.Unlock()
		startErr <- nil
		exited <- cmd.Wait()
	}()
	if err := <-startErr; err != nil {
		return nil, fmt.Errorf("%w %s: %v", errStartQEMU, cfg.QEMU, err)
	}
	if started != nil {
		started(cmd.Process.Pid)
	}

	var timeout, bootTimeout <-chan time.Time
	if cfg.Timeout > 0 {
		t := time.NewTimer(cfg.Timeout)
		defer t.Stop()
		timeout = t.C
	}
	qemuStarted := time.Now()
	var bootTimer *time.Timer
	slowBootLogged := false
	if cfg.BootTimeout > 0 {
		bootTimer = time.NewTimer(cfg.BootTimeout)
		defer bootTimer.Stop()
		bootTimeout = bootTimer.C
	}
	// Once EXIT_STATUS is in, PID 1 is powering off; give it a bounded time.
	var shutdownTimeout <-chan time.Time

	var killReason string
	var waitErr error
	var kept *Outcome // the failure decided while the VM was kept running
	var keepTimeout <-chan time.Time
	readyReported := false
wait:
	for {
		select {
		case waitErr = <-exited:
			break wait
		case <-m.notify.changed:
			if _, ok := m.notify.ExitStatus(); ok && shutdownTimeout == nil {
				t := time.NewTimer(30 * time.Second * cfg.Accel.TimeoutScale())
				defer t.Stop()
				shutdownTimeout = t.C
			} else if !ok {
				// The guest announced a reboot after all: not ending yet.
				shutdownTimeout = nil
			}
			if !readyReported && m.notify.Ready() && cfg.OnReady != nil {
				readyReported = true
				cfg.OnReady()
			}
			if status, ok := m.notify.TestFailedStatus(); ok && kept == nil && cfg.KeepOnFailure != nil {
				o := OutcomeFromExitStatus(status, true)
				kept = &o
				keepFor := time.Duration(0)
				if !o.Passed() && !o.Skipped() {
					keepFor = cfg.KeepOnFailure(o)
				}
				if keepFor <= 0 {
					waitErr = m.kill(exited)
					break wait
				}
				// The test's timeouts no longer apply; the keep time does.
				timeout, bootTimeout = nil, nil
				t := time.NewTimer(keepFor)
				defer t.Stop()
				keepTimeout = t.C
			}
		case <-keepTimeout:
			cfg.Logf("%s: keep time is up, stopping the VM", cfg.Name)
			waitErr = m.kill(exited)
			break wait
		case <-bootTimeout:
			if m.notify.heard() {
				break
			}
			// Time in which the host gave QEMU no CPU does not count: on
			// an overloaded machine (CI running many VMs) a slow boot is
			// not a hung one.
			elapsed, starved := time.Since(qemuStarted), cpuStarvation(cmd.Process.Pid)
			if left := bootTimeLeft(cfg.BootTimeout, elapsed, starved); left > 0 {
				if !slowBootLogged {
					slowBootLogged = true
					cfg.Logf("%s: slow boot: in %s QEMU has waited %s for a host CPU; the boot timeout does not count that time",
						cfg.Name, elapsed.Round(time.Second), starved.Round(time.Second))
				}
				bootTimer.Reset(max(left, time.Second))
				break
			}
			killReason = fmt.Sprintf("guest did not boot within %s (no message from its service manager over vsock)", cfg.BootTimeout)
			if starved >= time.Second {
				killReason = fmt.Sprintf("guest did not boot within %s (%s in all, of which QEMU waited %s for a host CPU; no message from its service manager over vsock)",
					cfg.BootTimeout, elapsed.Round(time.Second), starved.Round(time.Second))
			}
			waitErr = m.kill(exited)
			break wait
		case <-shutdownTimeout:
			killReason = "guest reported its exit status but did not power off"
			waitErr = m.kill(exited)
			break wait
		case <-timeout:
			killReason = fmt.Sprintf("test timed out after %s", cfg.Timeout)
			waitErr = m.kill(exited)
			break wait
		case <-ctx.Done():
			if kept == nil {
				killReason = "interrupted: " + context.Cause(ctx).Error()
			}
			waitErr = m.kill(exited)
			break wait
		}
	}

	// The last notify connection (EXIT_STATUS) may still be in flight when
	// QEMU exits; give it a moment before the listener goes away.
	if _, ok := m.notify.ExitStatus(); !ok && killReason == "" {
		select {
		case <-m.notify.changed:
		case <-time.After(500 * time.Millisecond):
		}
	}
	stopNotify()
	<-notifyDone

	res := &Result{Elapsed: time.Since(start), QEMUStderr: strings.TrimSpace(stderr.String())}
	res.ConsoleTail = consoleTail(cfg.ConsoleLog, 40)
	res.ExitStatus, res.HasExitStatus = m.notify.ExitStatus()
	res.Outcome = m.outcome(killReason, waitErr, res)
	if kept != nil {
		res.Outcome = *kept
	}
	return res, nil
}

func (m *Machine) outcome(killReason string, waitErr error, res *Result) Outcome {
	return decideOutcome(killReason, waitErr, m.notify.heard(), res)
}

// decideOutcome maps how the run ended to the test's outcome: the reason
// the harness killed QEMU, QEMU's exit error, whether the guest's service
// manager was ever heard, and what the result has collected (EXIT_STATUS,
// console tail, QEMU's stderr).
func decideOutcome(killReason string, waitErr error, heard bool, res *Result) Outcome {
	if killReason != "" {
		return Outcome{ExitCode: ExitFail, Reason: killReason}
	}
	if res.HasExitStatus {
		return OutcomeFromExitStatus(res.ExitStatus, true)
	}
	if line := findPanic(res.ConsoleTail); line != "" {
		return Outcome{ExitCode: ExitFail, Reason: "guest kernel panicked: " + line}
	}
	if sig, ok := killedBy(waitErr); ok {
		// Nothing in the harness sends QEMU a signal it dies of once the
		// run was not asked to stop: QEMU crashed or something on the host
		// (the OOM killer, a user) killed it. Not the test's doing.
		reason := "QEMU was killed by signal " + sig
		if msg := lastErrorLine(res.QEMUStderr); msg != "" {
			reason += ": " + msg
		}
		return Outcome{ExitCode: ExitHarnessError, Reason: reason}
	}
	if waitErr != nil && heard {
		// QEMU says why when it stops on an error of its own (a device
		// failing, say); on the pvpanic event it exits with a failure
		// status and says nothing, and the console may not have flushed
		// the panic message.
		if msg := lastErrorLine(res.QEMUStderr); msg != "" {
			return Outcome{ExitCode: ExitFail, Reason: "QEMU stopped with an error (" + waitErr.Error() + "): " + msg}
		}
		return Outcome{ExitCode: ExitFail, Reason: "guest kernel panicked (QEMU exited on the pvpanic event: " + waitErr.Error() + ")"}
	}
	if waitErr != nil {
		// QEMU failed before the guest got anywhere: a harness problem
		// (bad arguments, device setup), not a test failure.
		msg := lastErrorLine(res.QEMUStderr)
		if msg == "" {
			msg = waitErr.Error()
		}
		return Outcome{ExitCode: ExitHarnessError, Reason: "QEMU failed: " + msg}
	}
	return OutcomeFromExitStatus(0, false)
}

// kill stops QEMU: SIGTERM lets it exit cleanly, SIGKILL follows if not.
func (m *Machine) kill(exited <-chan error) error {
	m.mu.Lock()
	p := m.proc
	m.mu.Unlock()
	p.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		return err
	case <-time.After(5 * time.Second):
	}
	p.Kill()
	return <-exited
}

func findPanic(lines []string) string {
	for _, l := range lines {
		if strings.Contains(l, "Kernel panic") || strings.Contains(l, "kernel BUG at") {
			return strings.TrimSpace(l)
		}
	}
	return ""
}

// lastErrorLine returns QEMU's last output line that is not a warning
// (QEMU warns at start-up about CPU features TCG lacks, for example).
func lastErrorLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if l := strings.TrimSpace(lines[i]); l != "" && !strings.Contains(l, "warning:") {
			return l
		}
	}
	return ""
}

// killedBy reports the signal QEMU died of, if its exit error says it
// died of one.
func killedBy(waitErr error) (string, bool) {
	var exitErr *exec.ExitError
	if !errors.As(waitErr, &exitErr) {
		return "", false
	}
	ws, ok := exitErr.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() {
		return "", false
	}
	return ws.Signal().String(), true
}

// consoleTail returns the last n lines of the console log, with carriage
// returns and terminal escape sequences stripped.
func consoleTail(path string, n int) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	const window = 64 << 10
	if st, err := f.Stat(); err == nil && st.Size() > window {
		f.Seek(st.Size()-window, io.SeekStart)
	}
	data, _ := io.ReadAll(f)
	data = stripEscapes(data)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	for i, l := range lines {
		lines[i] = strings.TrimRight(l, "\r ")
	}
	return lines
}

// stripEscapes removes ANSI CSI sequences and stray control characters so a
// console excerpt prints cleanly in a test log.
func stripEscapes(b []byte) []byte {
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); i++ {
		c := b[i]
		if c == 0x1b && i+1 < len(b) && b[i+1] == '[' {
			j := i + 2
			for j < len(b) && (b[j] < 0x40 || b[j] > 0x7e) {
				j++
			}
			i = j
			continue
		}
		if c < 0x20 && c != '\n' && c != '\t' {
			continue
		}
		out = append(out, c)
	}
	return out
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf bytes.Buffer
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf.Write(p)
	if over := t.buf.Len() - t.max; over > 0 {
		t.buf.Next(over)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.buf.String()
}
