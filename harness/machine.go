package harness

import (
	"bytes"
	"cmp"
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

	"github.com/vmharness/vmharness/harness/verdict"
	"github.com/vmharness/vmharness/harness/vsock"
)

// BootImage is the cached image a VM boots: kernel and initrd for direct
// boot and the root file system the overlay is backed by. The harness only
// ever opens Rootfs read-only (as a qcow2 backing file).
type BootImage struct {
	Kernel string
	// KernelELF is Kernel uncompressed, with a PVH entry point (package
	// images/vmlinux), or "". A direct boot (FirmwareLinux) starts it
	// instead of Kernel: the guest skips the decompressor, which under
	// TCG takes most of a second. UEFI firmware needs Kernel's EFI stub.
	KernelELF string
	// Initrd is booted through when set; without one the kernel mounts
	// the root itself (its driver must be built in).
	Initrd       string
	Rootfs       string
	RootfsFormat string // "raw" or "qcow2"
	// RootDevice is where the guest finds the root file system,
	// /dev/vda (virtio-blk, the default) or /dev/nvme0n1 (NVMe); the
	// root disk is attached on that bus.
	RootDevice string
	// RootCmdline is the kernel command line fragment that mounts the
	// root, by default "root=/dev/vda rw".
	RootCmdline string
}

// rootDiskDevice is QEMU's -device value for the root disk, so that the
// guest sees it as rootDevice.
func rootDiskDevice(rootDevice string) (string, error) {
	switch rootDevice {
	case "", "/dev/vda":
		return "virtio-blk-pci,drive=root", nil
	case "/dev/nvme0n1":
		return "nvme,drive=root,serial=vmharness-root", nil
	}
	return "", fmt.Errorf("root device %q: vmharness attaches the root disk as /dev/vda (virtio-blk) or /dev/nvme0n1 (NVMe)", rootDevice)
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
	// Transport carries the guest's notify messages (the Machine listens
	// on it for them) and whatever else the caller serves over vsock.
	Transport vsock.Transport
	// Timeout bounds the whole run (0: none). BootTimeout bounds the time
	// until the guest's service manager first talks to the host, not
	// counting time in which QEMU waited for a host CPU.
	Timeout     time.Duration
	BootTimeout time.Duration
	// PowerOffTimeout bounds the guest's shutdown once it sent its final
	// exit status or reported emergency mode; 0 means 30 s, times
	// Accel.TimeoutScale() (tests shorten it).
	PowerOffTimeout time.Duration
	// KeepOnFailure is called when the test unit failed while the VM is
	// still up (the test's failure action is off when it is set). It
	// returns how long to keep the VM running for inspection; Run then
	// returns only when QEMU exits, the time is up or ctx ends, with the
	// test's failure as the outcome. Returning 0 stops the VM at once.
	KeepOnFailure func(o Outcome) time.Duration
	// JournalHas reports whether the test's journal has the marker entry
	// the test unit logs before its report (verdict.JournalMarkerIdentifier);
	// a decided run waits for it before stopping the VM. Nil: no journal.
	JournalHas func(marker string) bool
	// FullShutdown lets the guest shut down by itself after the test
	// instead of stopping the VM as soon as the outcome is decided.
	FullShutdown bool
	// Layer, if set, is a build-tree layer (images/layer): a qcow2 image
	// over Image.Rootfs that holds the base with the project's installed
	// files written in. The run's overlay is made over it instead of over
	// the base, so the files are there before the kernel mounts the root.
	Layer string
	// Env is set in the test unit's environment; Disks are extra empty
	// disks made in WorkDir; Firmware is linux (the default), uefi or
	// uefi-secure-boot; TPM gives the VM a swtpm TPM 2.0 (devices.go).
	Env      []EnvVar
	Disks    []Disk
	Firmware Firmware
	TPM      bool
	// SWTPM is the swtpm binary (default "swtpm"); FirmwareDescriptorDirs
	// override where QEMU's firmware descriptors are looked for.
	SWTPM                  string
	FirmwareDescriptorDirs []string
	// Exclude are the core dumps and sanitizer reports that do not fail
	// the test (verdict.JournalFindings).
	Exclude verdict.Exclusions
	// Snapshot, if set, is a snapshot template directory (BuildTemplate)
	// to start from instead of booting (experimental, snapshot.go).
	Snapshot string
	// OnReady is called once when the guest reports READY=1 (boot done).
	OnReady func()
	Logf    func(format string, args ...any)
}

// Result is what one VM run produced.
type Result struct {
	// Outcome is the verdict from what the run itself saw; Judge refines
	// it with the test's journal.
	Outcome Outcome
	// ConsoleTail holds the last lines of the serial console.
	ConsoleTail []string
	// QEMUStderr is what QEMU itself printed (its errors).
	QEMUStderr string
	Elapsed    time.Duration
	// Timeline is when the run's phases ended, as the host saw them.
	Timeline Timeline

	verdict *verdict.Verdict
}

// Timeline holds host-side times of one run's phases; a zero time means
// the phase never happened.
type Timeline struct {
	// QEMUStart is when QEMU was started; FirstMessage when the guest's
	// service manager first spoke (the end of kernel and initrd); Ready
	// when it reported READY=1; TestEnd when the test unit reported its
	// result; ExitStatus when PID 1 sent its final EXIT_STATUS (the end
	// of the guest's shutdown); QEMUExit when QEMU was gone.
	QEMUStart, FirstMessage, Ready, TestEnd, ExitStatus, QEMUExit time.Time
}

// String shows each phase as an offset from QEMU's start, for logs.
func (t Timeline) String() string {
	var parts []string
	for _, p := range []struct {
		name string
		at   time.Time
	}{{"first message", t.FirstMessage}, {"test end", t.TestEnd}, {"exit status", t.ExitStatus}, {"QEMU gone", t.QEMUExit}} {
		if !p.at.IsZero() && !t.QEMUStart.IsZero() {
			parts = append(parts, fmt.Sprintf("%s %.1fs", p.name, p.at.Sub(t.QEMUStart).Seconds()))
		}
	}
	return strings.Join(parts, ", ")
}

// Judge completes the verdict with what the complete journal holds (the
// test unit's result as recorded there, its core dumps and sanitizer
// reports), and returns the outcome.
func (r *Result) Judge(journal ...verdict.Event) Outcome {
	for _, e := range journal {
		r.verdict.Handle(e)
	}
	r.Outcome = r.verdict.Outcome()
	return r.Outcome
}

// Machine is one QEMU process running a test. Create it with NewMachine,
// then call Run once.
type Machine struct {
	cfg     Config
	cpu     string // QEMU's -cpu value
	overlay string
	// rootDisk is QEMU's -device value for the root disk.
	rootDisk string
	args     []string
	// notifyL receives the guest's sd_notify connections; Run serves and
	// closes it (Close does, if Run never runs).
	notifyL net.Listener
	verdict *verdict.Verdict
	devices *devices
	// snap is the snapshot start, if Config.Snapshot asks for one;
	// snapLoaded is when its state was loaded.
	snap       *snapshotRun
	snapLoaded time.Time

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
	if cfg.Transport == nil {
		return nil, errors.New("harness: Config needs a vsock Transport")
	}
	files := []string{cfg.Image.Kernel, cfg.Image.Rootfs}
	if cfg.Image.KernelELF != "" {
		files = append(files, cfg.Image.KernelELF)
	}
	if cfg.Image.Initrd != "" {
		files = append(files, cfg.Image.Initrd)
	}
	for _, p := range files {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("image file missing (rebuild with vmharness image build): %w", err)
		}
	}
	qemu, err := exec.LookPath(cfg.QEMU)
	if err != nil {
		return nil, fmt.Errorf("QEMU not found (%s); install qemu-system-x86 or set VMHARNESS_QEMU: %w", cfg.QEMU, err)
	}
	cfg.QEMU = qemu

	if cfg.Layer != "" {
		if _, err := os.Stat(cfg.Layer); err != nil {
			return nil, fmt.Errorf("build-tree layer: %w", err)
		}
	}

	rootDisk, err := rootDiskDevice(cfg.Image.RootDevice)
	if err != nil {
		return nil, err
	}
	devs, err := newDevices(cfg)
	if err != nil {
		return nil, err
	}

	var notifyL net.Listener
	var notifyPort uint32
	if cfg.Snapshot != "" {
		// The template's PID 1 has this address for good.
		notifyPort = SnapshotNotifyPort
		notifyL, err = cfg.Transport.Listen(notifyPort)
	} else {
		notifyL, notifyPort, err = vsock.ListenFree(cfg.Transport)
	}
	if err != nil {
		return nil, fmt.Errorf("listening for the guest's notifications: %w", err)
	}
	m := &Machine{cfg: cfg, cpu: cfg.CPUModel, notifyL: notifyL, devices: devs, rootDisk: rootDisk}
	ok := false
	defer func() {
		if !ok {
			notifyL.Close()
		}
	}()
	notifyAddr := fmt.Sprintf("vsock-stream:%d:%d", vsock.HostCID, notifyPort)
	guest := verdict.GuestSetup{Unit: cfg.Unit.Name, NotifyAddress: notifyAddr, KeepOnFailure: cfg.KeepOnFailure != nil}
	m.verdict = verdict.New(verdict.Config{KeepOnFailure: guest.KeepOnFailure, TestNotStarted: cfg.SkipTestUnit, FullShutdown: cfg.FullShutdown, Exclude: cfg.Exclude})
	creds := testUnitCredentials(cfg.Unit, guest)
	creds = devs.guestCredentials(creds, cfg.Unit.Name)
	if cfg.Snapshot != "" {
		if err := m.newSnapshotRun(ctx, append(snapshotCredentials(creds, cfg.Unit.Name), cfg.Credentials...)); err != nil {
			return nil, err
		}
		ok = true
		return m, nil
	}
	creds = append(creds, Credential{Name: "vmm.notify_socket", Value: []byte(notifyAddr)})
	creds = append(creds, cfg.Credentials...)
	if err := CheckCredentialSizes(creds); err != nil {
		return nil, err
	}
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
	if err := createOverlay(ctx, m.overlay, cfg.Image, cfg.Layer); err != nil {
		return nil, err
	}
	if err := devs.create(ctx, cfg.WorkDir); err != nil {
		return nil, err
	}
	if d := devs.describe(); d != "" {
		cfg.Logf("%s: %s", cfg.Name, d)
	}
	smbiosArgs, err := writeSMBIOSFiles(cfg.WorkDir, creds)
	if err != nil {
		return nil, err
	}
	m.args = m.qemuArgs(smbiosArgs)
	ok = true
	return m, nil
}

// Close releases what NewMachine acquired, for a Machine whose Run is
// never called; Run releases it itself.
func (m *Machine) Close() error { return m.notifyL.Close() }

// createOverlay makes the per-run copy-on-write disk, over the build-tree
// layer if there is one (itself over the image), else over the image. The
// backing file is referenced by absolute path and opened read-only by
// QEMU, so the cached image and layers are shared by every run and never
// written.
func createOverlay(ctx context.Context, overlay string, img BootImage, layer string) error {
	backing, format := img.Rootfs, cmp.Or(img.RootfsFormat, "raw")
	if layer != "" {
		backing, format = layer, "qcow2"
	}
	backing, err := filepath.Abs(backing)
	if err != nil {
		return err
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
		cmp.Or(cfg.Image.RootCmdline, "root=/dev/vda rw"),
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
		// The kernel's self-tests of its crypto algorithms take about 0.2 s
		// of a TCG boot and test the kernel, not the software under test.
		// A user's --kernel-arg cryptomgr.notests=0 comes later and wins.
		"cryptomgr.notests",
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
	args := m.hardwareArgs()
	if cfg.Image.Initrd != "" {
		args = append(args, "-initrd", cfg.Image.Initrd)
	}
	args = append(args, m.devices.qemuArgs()...)
	args = append(args, cfg.Transport.QEMUArgs()...)
	args = append(args, smbiosArgs...)
	return append(args, cfg.QEMUArgs...)
}

// hardwareArgs are the QEMU arguments of the VM's fixed hardware, which a
// snapshot template shares with the test path.
func (m *Machine) hardwareArgs() []string {
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
		"-chardev", "file,id=console,mux=on,path=" + QEMUOptionValue(cfg.ConsoleLog),
		"-serial", "chardev:console",
		"-device", "virtio-serial-pci,id=virtio-serial",
		"-device", "virtconsole,chardev=console",
		"-kernel", bootKernel(cfg.Image, cfg.Firmware),
		"-append", m.KernelCommandLine(),
		"-drive", "if=none,id=root,file=" + QEMUOptionValue(m.overlay) + ",format=qcow2,discard=unmap,cache=unsafe",
		"-device", m.rootDisk,
		"-device", "virtio-rng-pci",
	}
	return args
}

// bootKernel is the kernel file QEMU loads: the uncompressed PVH kernel
// when the image has one and SeaBIOS boots it, else the bzImage.
func bootKernel(img BootImage, fw Firmware) string {
	if img.KernelELF != "" && (fw == "" || fw == FirmwareLinux) {
		return img.KernelELF
	}
	return img.Kernel
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
// ends, then returns the outcome. QEMU never outlives Run unless
// KeepOnFailure keeps it, and then only until the keep time is up or ctx
// ends. A non-nil error means the harness itself failed (exit 99).
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

	msgs := make(chan verdict.Notify, 16)
	notifyCtx, stopNotify := context.WithCancel(context.Background())
	notifyDone := make(chan struct{})
	go func() {
		defer close(notifyDone)
		serveNotify(notifyCtx, m.notifyL, msgs, cfg.Logf)
	}()
	defer func() { stopNotify(); <-notifyDone }()

	// The TPM must be listening when QEMU starts, and goes when QEMU has.
	stopTPM, err := m.devices.startTPM()
	if err != nil {
		return nil, err
	}
	defer func() {
		if err := stopTPM(); err != nil {
			cfg.Logf("%s: stopping the TPM: %v", cfg.Name, err)
		}
	}()

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
	qemuStarted := time.Now()
	if m.snap != nil {
		// A good restore hands the test over in seconds (2 s idle under
		// TCG); a minute means a template whose agent stays silent
		// (ErrSnapshotAgentSilent), not a slow one.
		restoreCtx, cancel := context.WithTimeout(ctx, min(cmp.Or(cfg.BootTimeout, 3*time.Minute), time.Minute))
		err := m.restore(restoreCtx)
		cancel()
		// Interrupted (SIGTERM) during the restore: the run loop below
		// stops the VM and says so, as at any other time.
		if err != nil && ctx.Err() == nil {
			m.kill(exited)
			msg := lastLine(stderr.String())
			if msg != "" {
				return nil, fmt.Errorf("snapshot start: %w (QEMU said: %s)", err, msg)
			}
			return nil, fmt.Errorf("snapshot start: %w", err)
		}
		m.snapshotLog(start)
	}

	l := &runLoop{m: m, exited: exited, qemuStarted: qemuStarted}
	l.timeline.QEMUStart = l.qemuStarted
	if cfg.Timeout > 0 {
		l.timeout = time.NewTimer(cfg.Timeout)
		defer l.timeout.Stop()
	}
	if cfg.BootTimeout > 0 {
		l.bootTimer = time.NewTimer(cfg.BootTimeout)
		defer l.bootTimer.Stop()
	}
	waitErr := l.run(ctx, msgs)
	qemuGone := time.Now()

	// The last notify connection (EXIT_STATUS) may still be in flight when
	// QEMU exits; give it a moment before the listener goes away, unless
	// the verdict has all it needs (every early-stopped test: half a
	// second of each run).
	if !m.verdict.Settled() {
		grace := time.After(notifyGrace)
	drain:
		for {
			select {
			case msg := <-msgs:
				l.note(m.verdict.Handle(msg))
				if m.verdict.Settled() {
					break drain
				}
			case <-grace:
				break drain
			}
		}
	}
	stopNotify()
	<-notifyDone
	for len(msgs) > 0 {
		l.note(m.verdict.Handle(<-msgs))
	}

	l.timeline.QEMUExit = qemuGone
	res := &Result{Elapsed: time.Since(start), QEMUStderr: strings.TrimSpace(stderr.String()), Timeline: l.timeline, verdict: m.verdict}
	res.ConsoleTail = consoleTail(cfg.ConsoleLog, 40)
	end := verdict.QEMUExited{Stderr: res.QEMUStderr, ConsoleTail: res.ConsoleTail}
	if sig, ok := killedBy(waitErr); ok {
		end.Signal = sig
	} else if cmd.ProcessState != nil {
		end.Status = cmd.ProcessState.ExitCode()
	}
	m.verdict.Handle(end)
	res.Outcome = m.verdict.Outcome()
	return res, nil
}

// notifyGrace is how long the notify listener stays open after QEMU
// exits while the verdict is not settled.
const notifyGrace = 500 * time.Millisecond

// runLoop is Run's wait for QEMU: it feeds the verdict every notify
// message and timer, and carries out what the verdict asks for.
type runLoop struct {
	m           *Machine
	exited      <-chan error
	qemuStarted time.Time

	timeout, bootTimer *time.Timer
	// Once the final EXIT_STATUS is in, PID 1 is powering off; it gets a
	// bounded time.
	powerOff       *time.Timer
	keep           *time.Timer
	slowBootLogged bool
	timeline       Timeline
	// Once the outcome is decided, the VM stops when the journal has
	// marker, checked on journalWait's ticks until journalDeadline.
	marker          string
	journalWait     *time.Ticker
	journalDeadline time.Time
}

// note records in the timeline when a phase ended.
func (l *runLoop) note(step verdict.Step) {
	now := time.Now()
	if l.timeline.FirstMessage.IsZero() {
		l.timeline.FirstMessage = now
	}
	if step.TestEnded {
		l.timeline.TestEnd = now
	}
	if step.AwaitPowerOff {
		l.timeline.ExitStatus = now
	}
	if step.Ready {
		l.timeline.Ready = now
	}
}

func tickerC(t *time.Ticker) <-chan time.Time {
	if t == nil {
		return nil
	}
	return t.C
}

func timerC(t *time.Timer) <-chan time.Time {
	if t == nil {
		return nil
	}
	return t.C
}

// run returns QEMU's exit error once QEMU is gone.
func (l *runLoop) run(ctx context.Context, msgs <-chan verdict.Notify) error {
	m, cfg := l.m, l.m.cfg
	defer func() {
		for _, t := range []*time.Timer{l.powerOff, l.keep} {
			if t != nil {
				t.Stop()
			}
		}
		if l.journalWait != nil {
			l.journalWait.Stop()
		}
	}()
	stop := func(why verdict.StopReason, detail string) error {
		m.verdict.Handle(verdict.Stopped{Why: why, Detail: detail})
		return m.kill(l.exited)
	}
	for {
		select {
		case err := <-l.exited:
			return err
		case msg := <-msgs:
			step := m.verdict.Handle(msg)
			l.note(step)
			if step.Ready && cfg.OnReady != nil {
				cfg.OnReady()
			}
			if (step.AwaitPowerOff || step.EmergencyReported) && l.powerOff == nil {
				// In emergency mode the outcome is decided and the
				// emergency-exit unit's failure action powers the guest
				// off; should that shutdown hang (seen under load: the
				// guest's journal went quiet and it never powered off),
				// waiting for it would only run into --timeout.
				timeout := cfg.PowerOffTimeout
				if timeout <= 0 {
					timeout = 30 * time.Second * cfg.Accel.TimeoutScale()
				}
				l.powerOff = time.NewTimer(timeout)
			}
			if step.Rebooting && l.powerOff != nil {
				l.powerOff.Stop()
				l.powerOff = nil
			}
			if step.StopNow {
				return stop(verdict.StopTestOver, "")
			}
			if step.Final && l.journalWait == nil {
				// The outcome is decided: the guest's own shutdown
				// (seconds under TCG) adds nothing once the test's journal
				// is on the host.
				if cfg.JournalHas == nil || step.JournalMarker == "" {
					return stop(verdict.StopVerdictReached, "")
				}
				l.marker = step.JournalMarker
				l.journalWait = time.NewTicker(20 * time.Millisecond)
				l.journalDeadline = time.Now().Add(10 * time.Second * cfg.Accel.TimeoutScale())
			}
			if step.Hold != nil && cfg.KeepOnFailure != nil {
				keepFor := cfg.KeepOnFailure(*step.Hold)
				if keepFor <= 0 {
					return stop(verdict.StopTestOver, "")
				}
				// The test's timeouts no longer apply; the keep time does.
				for _, t := range []*time.Timer{l.timeout, l.bootTimer} {
					if t != nil {
						t.Stop()
					}
				}
				l.timeout, l.bootTimer = nil, nil
				l.keep = time.NewTimer(keepFor)
			}
		case <-tickerC(l.journalWait):
			if cfg.JournalHas(l.marker) {
				return stop(verdict.StopVerdictReached, "")
			}
			if time.Now().After(l.journalDeadline) {
				cfg.Logf("%s: the test's journal marker did not arrive; stopping the VM without it", cfg.Name)
				return stop(verdict.StopVerdictReached, "")
			}
		case <-timerC(l.keep):
			cfg.Logf("%s: keep time is up, stopping the VM", cfg.Name)
			return stop(verdict.StopKeepTimeUp, "")
		case <-timerC(l.bootTimer):
			if m.verdict.Heard() {
				break
			}
			// Time in which the host gave QEMU no CPU does not count: on
			// an overloaded machine (CI running many VMs) a slow boot is
			// not a hung one.
			elapsed, starved := time.Since(l.qemuStarted), cpuStarvation(m.PID())
			if left := bootTimeLeft(cfg.BootTimeout, elapsed, starved); left > 0 {
				if !l.slowBootLogged {
					l.slowBootLogged = true
					cfg.Logf("%s: slow boot: in %s QEMU has waited %s for a host CPU; the boot timeout does not count that time",
						cfg.Name, elapsed.Round(time.Second), starved.Round(time.Second))
				}
				l.bootTimer.Reset(max(left, time.Second))
				break
			}
			detail := fmt.Sprintf("guest did not boot within %s (no message from its service manager over vsock)", cfg.BootTimeout)
			if starved >= time.Second {
				detail = fmt.Sprintf("guest did not boot within %s (%s in all, of which QEMU waited %s for a host CPU; no message from its service manager over vsock)",
					cfg.BootTimeout, elapsed.Round(time.Second), starved.Round(time.Second))
			}
			return stop(verdict.StopBootTimeout, detail)
		case <-timerC(l.powerOff):
			return stop(verdict.StopShutdownTimeout, "")
		case <-timerC(l.timeout):
			return stop(verdict.StopTimeout, "after "+cfg.Timeout.String())
		case <-ctx.Done():
			why := verdict.StopInterrupted
			if errors.Is(context.Cause(ctx), ErrShellExited) {
				why = verdict.StopShellExited
			}
			return stop(why, context.Cause(ctx).Error())
		}
	}
}

// ErrShellExited is the cause to cancel a shell-mode run's context with
// once the user's shell session has ended.
var ErrShellExited = errors.New("the shell session ended")

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

// QEMUOptionValue escapes a value (a path) for a QEMU option list, where
// a comma separates options and ",," stands for a literal comma.
func QEMUOptionValue(s string) string { return strings.ReplaceAll(s, ",", ",,") }
