// Command l1test runs in a vmharness test VM (the L1) and proves the
// harness's kernel vhost-vsock transport end to end: it loads vhost_vsock,
// boots two tiny nested guests (L2: the L1's own kernel and an initramfs
// holding only examples/nested-vsock/l2init and the vsock modules) in QEMU
// with the transport harness/vsock chose, and checks every path through it:
//
//   - VMHARNESS_VSOCK=auto picks the kernel backend, and the CID it
//     reserved with VHOST_VSOCK_SET_GUEST_CID on the fd handed to QEMU is
//     the CID the guest itself reads; nobody else can take that CID while
//     the guest runs, and it is free again after;
//   - the two guests run at once with distinct CIDs;
//   - guest to host: each guest's READY=1 and EXIT_STATUS=N (sd_notify)
//     arrive on its own transport's listener;
//   - host to guest: Dial and the hybrid socket reach the guest's echo;
//   - `vmharness ssh-proxy vsock/CID 22` hands ssh an AF_VSOCK socket
//     connected to that guest;
//   - auto falls back to the userspace transport, with one line saying
//     why, when /dev/vhost-vsock is there but not usable: no permission,
//     and every candidate CID taken.
//
// Each check prints PASS or FAIL; the exit status is 0 only if all passed.
// Run as root (it loads a module and changes /dev/vhost-vsock's mode for
// the permission check, then restores it).
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"

	"github.com/vmharness/vmharness/harness/registry"
	hvsock "github.com/vmharness/vmharness/harness/vsock"
)

// Guest ports served by l2init.
const (
	echoPort   = 1234
	exitPort   = 1235
	bannerPort = 22
)

// vhostVsockSetGuestCID is VHOST_VSOCK_SET_GUEST_CID from <linux/vhost.h>;
// the test uses it itself to see which CIDs the kernel holds.
const vhostVsockSetGuestCID = 0x4008AF60

// probeArg makes the binary run the fallback probe (as an unprivileged
// user, see checkPermissionFallback).
const probeArg = "probe-auto-transport"

func main() {
	if len(os.Args) == 3 && os.Args[1] == probeArg {
		os.Exit(probe(os.Args[2]))
	}
	l2init := flag.String("l2init", "/usr/lib/nested-vsock/l2init", "the L2 guest's static init binary")
	vmharness := flag.String("vmharness", "vmharness", "the vmharness binary whose ssh-proxy is tested")
	timeout := flag.Duration("timeout", 30*time.Minute, "give up after this long")
	memory := flag.Int("l2-memory", 256, "MiB of RAM per L2 guest")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	t := &tester{start: time.Now()}
	t.run(ctx, *l2init, *vmharness, *memory)
	t.logf("%d checks passed, %d failed, %v in all", t.passed, t.failed, time.Since(t.start).Round(time.Second))
	if t.failed > 0 || t.passed == 0 {
		os.Exit(1)
	}
}

// tester records check results.
type tester struct {
	start          time.Time
	mu             sync.Mutex
	passed, failed int
}

func (t *tester) logf(format string, args ...any) {
	fmt.Printf("[%6.1fs] %s\n", time.Since(t.start).Seconds(), fmt.Sprintf(format, args...))
}

// check records one result: err nil is a pass.
func (t *tester) check(what string, err error) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err != nil {
		t.failed++
		t.logf("FAIL: %s: %v", what, err)
		return false
	}
	t.passed++
	t.logf("PASS: %s", what)
	return true
}

func (t *tester) run(ctx context.Context, l2init, vmharness string, memMiB int) {
	release, err := exec.Command("uname", "-r").Output()
	if !t.check("uname -r", err) {
		return
	}
	kver := strings.TrimSpace(string(release))
	// The L1's own CID towards its host is taken in its kernel too: the
	// registry may offer it, and the kernel must refuse it.
	own, err := vsock.ContextID()
	if !t.check("read this L1 guest's own CID", err) {
		return
	}
	t.logf("this L1 guest's own CID (towards its host): %d", own)
	if !t.check("modprobe vhost_vsock and /dev/vhost-vsock", loadVhostVsock(t)) {
		return
	}
	work, err := os.MkdirTemp("", "nested-vsock-")
	if !t.check("work directory", err) {
		return
	}
	defer os.RemoveAll(work)
	initrd := filepath.Join(work, "l2.cpio")
	if !t.check("L2 initramfs (l2init and the vsock modules of "+kver+")", buildInitramfs(work, initrd, l2init, kver)) {
		return
	}
	kernel := "/boot/vmlinuz-" + kver

	t.check("auto falls back when /dev/vhost-vsock is not permitted", checkPermissionFallback(t, work))
	t.check("auto falls back when every candidate CID is taken", checkCIDsTakenFallback(ctx, t, work))

	reg, err := registry.Open(registry.RuntimeDir(os.Getenv))
	if !t.check("open the VM registry", err) {
		return
	}
	guests := make([]*guest, 2)
	for i := range guests {
		g, err := startGuest(ctx, t, reg, fmt.Sprintf("l2-%c", 'a'+i), kernel, initrd, memMiB)
		if !t.check(fmt.Sprintf("L2 guest %d: kernel transport chosen by auto, QEMU started", i), err) {
			for _, g := range guests[:i] {
				g.stop()
			}
			return
		}
		guests[i] = g
	}
	defer func() {
		for _, g := range guests {
			g.stop()
		}
	}()
	t.check("the two L2 guests have distinct CIDs, neither the L1's own", func() error {
		if guests[0].tr.CID() == guests[1].tr.CID() {
			return fmt.Errorf("both have CID %d", guests[0].tr.CID())
		}
		for _, g := range guests {
			if g.tr.CID() == own {
				return fmt.Errorf("%s has the L1's own CID %d", g.name, own)
			}
		}
		t.logf("CIDs: %s=%d, %s=%d", guests[0].name, guests[0].tr.CID(), guests[1].name, guests[1].tr.CID())
		return nil
	}())

	// Both guests boot at once; each check below runs per guest.
	var wg sync.WaitGroup
	for i, g := range guests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g.exercise(ctx, t, vmharness, 40+i)
		}()
	}
	wg.Wait()
	for _, g := range guests {
		cid := g.tr.CID()
		g.stop()
		t.check(fmt.Sprintf("%s: CID %d is free again once QEMU and the transport are gone", g.name, cid), func() error {
			f, err := os.OpenFile(hvsock.DefaultKernelDevice, os.O_RDWR, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			return setCID(f, cid)
		}())
	}
}

// loadVhostVsock loads the module and checks the device node works.
func loadVhostVsock(t *tester) error {
	if fi, err := os.Stat(hvsock.DefaultKernelDevice); err == nil {
		t.logf("before modprobe: %s exists (mode %v; a static node, opening it would load the module)", hvsock.DefaultKernelDevice, fi.Mode())
	} else {
		t.logf("before modprobe: %v", err)
	}
	if out, err := exec.Command("modprobe", "vhost_vsock").CombinedOutput(); err != nil {
		return fmt.Errorf("modprobe vhost_vsock: %v: %s", err, out)
	}
	if _, err := os.Stat("/sys/module/vhost_vsock"); err != nil {
		return fmt.Errorf("vhost_vsock is not loaded after modprobe: %w", err)
	}
	fi, err := os.Stat(hvsock.DefaultKernelDevice)
	if err != nil {
		return err
	}
	t.logf("after modprobe: %s mode %v", hvsock.DefaultKernelDevice, fi.Mode())
	f, err := os.OpenFile(hvsock.DefaultKernelDevice, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	return f.Close()
}

// buildInitramfs writes a newc cpio with /init (l2init) and the guest's
// vsock modules, compressed as the L1's kernel ships them (the L2 kernel
// decompresses them itself).
func buildInitramfs(work, out, l2init, kver string) error {
	root := filepath.Join(work, "l2root")
	if err := os.MkdirAll(filepath.Join(root, "modules"), 0o755); err != nil {
		return err
	}
	if err := copyFile(l2init, filepath.Join(root, "init"), 0o755); err != nil {
		return err
	}
	moddir := filepath.Join("/usr/lib/modules", kver, "kernel/net/vmw_vsock")
	for _, m := range []string{"vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"} {
		if err := copyFile(filepath.Join(moddir, m+".ko.xz"), filepath.Join(root, "modules", m+".ko.xz"), 0o644); err != nil {
			return err
		}
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	cmd := exec.Command("cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0")
	cmd.Dir = root
	cmd.Stdin = strings.NewReader("init\nmodules\nmodules/vsock.ko.xz\nmodules/vmw_vsock_virtio_transport_common.ko.xz\nmodules/vmw_vsock_virtio_transport.ko.xz\n")
	cmd.Stdout = f
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("cpio: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return f.Close()
}

func copyFile(src, dst string, mode os.FileMode) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, mode)
}

// setCID assigns cid to an open vhost-vsock fd.
func setCID(f *os.File, cid uint32) error {
	c := uint64(cid)
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), vhostVsockSetGuestCID, uintptr(unsafe.Pointer(&c)))
	if errno != 0 {
		return os.NewSyscallError("ioctl VHOST_VSOCK_SET_GUEST_CID", errno)
	}
	return nil
}

// probe is the unprivileged half of checkPermissionFallback: it creates an
// auto transport in dir and prints its log lines and kind.
func probe(dir string) int {
	var lines []string
	tr, err := hvsock.New(context.Background(), hvsock.Config{
		Mode: hvsock.ModeAuto, RuntimeDir: dir,
		Logf: func(format string, args ...any) { lines = append(lines, fmt.Sprintf(format, args...)) },
	})
	if err != nil {
		fmt.Printf("error: %v\n", err)
		return 1
	}
	defer tr.Close()
	fmt.Printf("kind: %s\n", tr.Kind())
	for _, l := range lines {
		fmt.Printf("log: %s\n", l)
	}
	return 0
}

// fallbackLine is the one line auto logs when it passes over the kernel.
var fallbackLine = regexp.MustCompile(`^vsock: using userspace vhost-user transport, guest CID [0-9]+ \((.+)\)$`)

// checkPermissionFallback makes /dev/vhost-vsock root-only (trixie's udev
// makes it 0660 root:kvm, other systems 0666) and runs the probe as nobody: auto must take the userspace backend
// and say, in one line, that the device was not permitted.
func checkPermissionFallback(t *tester, work string) error {
	fi, err := os.Stat(hvsock.DefaultKernelDevice)
	if err != nil {
		return err
	}
	if err := os.Chmod(hvsock.DefaultKernelDevice, 0o600); err != nil {
		return err
	}
	defer os.Chmod(hvsock.DefaultKernelDevice, fi.Mode().Perm())
	dir := filepath.Join(work, "probe")
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	const nobody = 65534
	if err := os.Chown(dir, nobody, nobody); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if err := os.Chmod(work, 0o755); err != nil {
		return err
	}
	cmd := exec.Command(self, probeArg, dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	out, err := cmd.CombinedOutput()
	t.logf("probe as nobody with %s mode 0600:\n%s", hvsock.DefaultKernelDevice, strings.TrimSpace(string(out)))
	if err != nil {
		return fmt.Errorf("probe: %v", err)
	}
	return expectFallback(string(out), "open "+hvsock.DefaultKernelDevice+": permission denied")
}

// expectFallback checks a probe's output: the userspace kind and exactly
// one log line, the fallback line with the given reason.
func expectFallback(out, reason string) error {
	var kind string
	var logs []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if k, ok := strings.CutPrefix(l, "kind: "); ok {
			kind = k
		} else if m, ok := strings.CutPrefix(l, "log: "); ok {
			logs = append(logs, m)
		}
	}
	if kind != string(hvsock.KindUser) {
		return fmt.Errorf("auto chose %q, want %q", kind, hvsock.KindUser)
	}
	if len(logs) != 1 {
		return fmt.Errorf("auto logged %d lines, want one: %q", len(logs), logs)
	}
	m := fallbackLine.FindStringSubmatch(logs[0])
	if m == nil {
		return fmt.Errorf("log line %q is not the fallback line", logs[0])
	}
	if !strings.Contains(m[1], reason) {
		return fmt.Errorf("fallback reason %q does not say %q", m[1], reason)
	}
	return nil
}

// fewCIDs is a CID allocator offering a handful of CIDs, so that "every
// CID taken" can be set up for real: the harness's registry offers 65536
// candidates, which the kernel would each have to hold on an open device.
// Like the registry, it does not offer a CID again until it is released.
type fewCIDs struct {
	mu      sync.Mutex
	held    map[uint32]bool
	first   uint32
	n       uint32
	offered []uint32
}

func (a *fewCIDs) ReserveCID() (uint32, func(), error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for c := a.first; c < a.first+a.n; c++ {
		if a.held[c] {
			continue
		}
		a.held[c] = true
		a.offered = append(a.offered, c)
		return c, func() {
			a.mu.Lock()
			defer a.mu.Unlock()
			delete(a.held, c)
		}, nil
	}
	return 0, nil, fmt.Errorf("all %d candidate CIDs are in use", a.n)
}

// checkCIDsTakenFallback holds CIDs 100-103 on devices of its own, then
// asks for an auto transport whose candidates are exactly those: the
// kernel refuses each (EADDRINUSE), and auto must fall back and say so.
func checkCIDsTakenFallback(ctx context.Context, t *tester, work string) error {
	const first, n = 100, 4
	for c := uint32(first); c < first+n; c++ {
		f, err := os.OpenFile(hvsock.DefaultKernelDevice, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := setCID(f, c); err != nil {
			return fmt.Errorf("taking CID %d: %w", c, err)
		}
	}
	dir := filepath.Join(work, "taken")
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	alloc := &fewCIDs{held: map[uint32]bool{}, first: first, n: n}
	var out strings.Builder
	tr, err := hvsock.New(ctx, hvsock.Config{
		Mode: hvsock.ModeAuto, RuntimeDir: dir, CIDAllocator: alloc,
		Logf: func(format string, args ...any) { fmt.Fprintf(&out, "log: "+format+"\n", args...) },
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(&out, "kind: %s\n", tr.Kind())
	tr.Close()
	t.logf("auto with CIDs %d-%d held elsewhere (candidates offered: %v):\n%s", first, first+n-1, alloc.offered, strings.TrimSpace(out.String()))
	// The kernel backend tried all four; the userspace one then took one
	// (its CIDs only name VMs, they do not route).
	if len(alloc.offered) != n+1 {
		return fmt.Errorf("the candidates offered were %v, want each of the %d once for the kernel backend and one more for the userspace backend", alloc.offered, n)
	}
	return expectFallback(out.String(), "all 4 candidate CIDs are in use")
}

// guest is one running L2 VM.
type guest struct {
	name    string
	tr      hvsock.Transport
	reg     *registry.Registration
	notifyL net.Listener
	notes   chan string
	qemu    *exec.Cmd
	exited  chan error
	console string
	started time.Time
	once    sync.Once
}

// startGuest creates the transport as the runner does (auto mode, the
// registry as CID allocator), registers the VM and starts QEMU.
func startGuest(ctx context.Context, t *tester, reg *registry.Registry, name, kernel, initrd string, memMiB int) (*guest, error) {
	workDir, err := reg.NewWorkDir()
	if err != nil {
		return nil, err
	}
	var logs []string
	tr, err := hvsock.New(ctx, hvsock.Config{
		Mode: hvsock.ModeAuto, RuntimeDir: workDir, CIDAllocator: reg,
		Logf: func(format string, args ...any) { logs = append(logs, fmt.Sprintf(format, args...)) },
	})
	if err != nil {
		return nil, err
	}
	t.logf("%s: transport said: %q", name, logs)
	g := &guest{name: name, tr: tr, notes: make(chan string, 8), exited: make(chan error, 1), console: filepath.Join(workDir, "console.log")}
	if tr.Kind() != hvsock.KindKernel {
		g.stop()
		return nil, fmt.Errorf("auto chose the %s transport, want kernel", tr.Kind())
	}
	if want := fmt.Sprintf("vsock: using kernel vhost-vsock, guest CID %d", tr.CID()); len(logs) != 1 || logs[0] != want {
		g.stop()
		return nil, fmt.Errorf("transport logged %q, want one line %q", logs, want)
	}
	// Nobody else can have the CID now: the kernel holds it for our fd.
	if f, err := os.OpenFile(hvsock.DefaultKernelDevice, os.O_RDWR, 0); err == nil {
		err := setCID(f, tr.CID())
		f.Close()
		if !errors.Is(err, unix.EADDRINUSE) {
			g.stop()
			return nil, fmt.Errorf("a second device could take CID %d (err %v); the reservation does not hold", tr.CID(), err)
		}
	}
	var port uint32
	g.notifyL, port, err = hvsock.ListenFree(tr)
	if err != nil {
		g.stop()
		return nil, err
	}
	go g.serveNotify()
	g.reg, err = reg.Register(registry.Entry{
		Name: name, CID: tr.CID(), Transport: registry.TransportKernel,
		HybridSocket: tr.HybridSocket(), WorkDir: workDir, ConsoleLog: g.console,
	})
	if err != nil {
		g.stop()
		return nil, err
	}
	args := []string{
		"-machine", "q35", "-accel", "tcg", "-smp", "1", "-m", strconv.Itoa(memMiB),
		"-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-no-reboot",
		"-serial", "file:" + g.console,
		"-kernel", kernel, "-initrd", initrd,
		// no_timer_check: under TCG inside TCG the kernel's check that
		// the IO-APIC delivers timer interrupts can lose the race with its
		// own slowness and panic ("IO-APIC + timer doesn't work!", seen
		// 2026-11-30 21:19); the check is only for broken real boards.
		"-append", fmt.Sprintf("console=ttyS0 panic=-1 no_timer_check nested.notify_port=%d", port),
	}
	args = append(args, tr.QEMUArgs()...)
	g.qemu = exec.Command("qemu-system-x86_64", args...)
	g.qemu.ExtraFiles = tr.ExtraFiles()
	g.qemu.Stdout, g.qemu.Stderr = os.Stdout, os.Stdout
	t.logf("%s: qemu-system-x86_64 %s", name, strings.Join(args, " "))
	if err := g.qemu.Start(); err != nil {
		g.stop()
		return nil, err
	}
	g.started = time.Now()
	g.reg.Update(func(e *registry.Entry) { e.QEMUPID = g.qemu.Process.Pid })
	go func() { g.exited <- g.qemu.Wait() }()
	return g, nil
}

// serveNotify reads each notify connection (one message each, as PID 1
// sends them) into g.notes.
func (g *guest) serveNotify() {
	for {
		c, err := g.notifyL.Accept()
		if err != nil {
			close(g.notes)
			return
		}
		c.SetDeadline(time.Now().Add(time.Minute))
		b, _ := io.ReadAll(io.LimitReader(c, 4096))
		c.Close()
		g.notes <- string(b)
	}
}

// waitNote waits for a notify message with key and returns the message's
// NAME=VALUE pairs.
func (g *guest) waitNote(ctx context.Context, key string) (map[string]string, error) {
	for {
		select {
		case msg, ok := <-g.notes:
			if !ok {
				return nil, errors.New("the notify listener closed")
			}
			m := map[string]string{}
			for _, l := range strings.Split(msg, "\n") {
				if k, v, ok := strings.Cut(l, "="); ok {
					m[k] = v
				}
			}
			if _, ok := m[key]; ok {
				return m, nil
			}
		case err := <-g.exited:
			g.exited <- err
			return nil, fmt.Errorf("QEMU exited (%v) before %s= arrived; console:\n%s", err, key, g.consoleTail())
		case <-ctx.Done():
			return nil, fmt.Errorf("no %s= before the deadline; console:\n%s", key, g.consoleTail())
		}
	}
}

func (g *guest) consoleTail() string {
	b, _ := os.ReadFile(g.console)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-25):], "\n")
}

// exercise runs the per-guest checks, ending with the guest reporting
// EXIT_STATUS=status and powering off.
func (g *guest) exercise(ctx context.Context, t *tester, vmharness string, status int) {
	cid := g.tr.CID()
	ready, err := g.waitNote(ctx, "READY")
	boot := time.Since(g.started).Round(100 * time.Millisecond)
	if !t.check(fmt.Sprintf("%s: guest to host: READY=1 over the kernel transport (L2 boot took %v)", g.name, boot), err) {
		return
	}
	t.check(fmt.Sprintf("%s: the guest's own CID is the reserved CID %d", g.name, cid), func() error {
		if got := ready["X_NESTED_CID"]; got != strconv.FormatUint(uint64(cid), 10) {
			return fmt.Errorf("the guest reads its CID as %q", got)
		}
		return nil
	}())
	t.check(fmt.Sprintf("%s: host to guest: Dial(%d) echoes 64 KiB", g.name, echoPort), func() error {
		c, err := g.tr.Dial(ctx, echoPort)
		if err != nil {
			return err
		}
		return echo(c, strings.Repeat(fmt.Sprintf("%s says hello ", g.name), 4096)[:64<<10])
	}())
	t.check(fmt.Sprintf("%s: the hybrid socket reaches the guest's echo", g.name), func() error {
		c, err := net.Dial("unix", g.tr.HybridSocket())
		if err != nil {
			return err
		}
		c.SetDeadline(time.Now().Add(2 * time.Minute))
		if _, err := fmt.Fprintf(c, "CONNECT %d\n", echoPort); err != nil {
			return err
		}
		r := bufio.NewReader(c)
		ok, err := r.ReadString('\n')
		if err != nil || !strings.HasPrefix(ok, "OK ") {
			return fmt.Errorf("answer %q, %v", ok, err)
		}
		return echo(&bufConn{Conn: c, r: r}, "through the hybrid socket\n")
	}())
	t.check(fmt.Sprintf("%s: vmharness ssh-proxy vsock/%d %d hands over an AF_VSOCK socket to that guest", g.name, cid, bannerPort), sshProxy(ctx, t, vmharness, cid))

	// EXIT_STATUS: ask the guest to report it and power off.
	err = func() error {
		c, err := g.tr.Dial(ctx, exitPort)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Minute))
		if _, err := fmt.Fprintf(c, "%d\n", status); err != nil {
			return err
		}
		ok, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || ok != "OK\n" {
			return fmt.Errorf("exit request answered %q, %v", ok, err)
		}
		got, err := g.waitNote(ctx, "EXIT_STATUS")
		if err != nil {
			return err
		}
		if got["EXIT_STATUS"] != strconv.Itoa(status) {
			return fmt.Errorf("EXIT_STATUS=%s, want %d", got["EXIT_STATUS"], status)
		}
		select {
		case err := <-g.exited:
			g.exited <- err
			if err != nil {
				return fmt.Errorf("QEMU: %v", err)
			}
		case <-time.After(5 * time.Minute):
			return errors.New("QEMU did not exit after the guest powered off")
		}
		return nil
	}()
	t.check(fmt.Sprintf("%s: guest to host: EXIT_STATUS=%d arrived, then the guest powered off and QEMU exited 0", g.name, status), err)
	// Where the L2's boot spent its time, by its kernel's own timestamps,
	// and what its init said.
	b, _ := os.ReadFile(g.console)
	t.logf("%s: L2 kernel messages after a pause of 10 s or more, and l2init's:\n%s", g.name, strings.Join(slowSteps(string(b), 10), "\n"))
}

// kernelStamp matches a kernel message's timestamp, "[   12.345678] ".
var kernelStamp = regexp.MustCompile(`^\[\s*([0-9]+\.[0-9]+)\] `)

// slowSteps returns the console lines that came minPause seconds or more
// (kernel time) after the previous kernel message, each with the pause,
// the last kernel message, and the lines without a timestamp (l2init's).
func slowSteps(console string, minPause float64) []string {
	var out []string
	prev, last := 0.0, ""
	for _, l := range strings.Split(strings.TrimSpace(console), "\n") {
		m := kernelStamp.FindStringSubmatch(l)
		if m == nil {
			out = append(out, l)
			continue
		}
		ts, _ := strconv.ParseFloat(m[1], 64)
		if ts-prev >= minPause {
			out = append(out, fmt.Sprintf("(+%.1fs) %s", ts-prev, l))
		}
		prev, last = ts, l
	}
	if last != "" {
		out = append(out, "last kernel message: "+last)
	}
	return out
}

// sshProxy runs `vmharness ssh-proxy vsock/CID 22` as ssh does with
// ProxyUseFdpass (stdout a Unix socket) and checks the socket it passes:
// AF_VSOCK, connected to cid, and the guest's banner arrives on it.
func sshProxy(ctx context.Context, t *tester, vmharness string, cid uint32) error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "ssh side"), os.NewFile(uintptr(fds[1]), "proxy stdout")
	defer ours.Close()
	cmd := exec.CommandContext(ctx, vmharness, "ssh-proxy", fmt.Sprintf("vsock/%d", cid), strconv.Itoa(bannerPort))
	cmd.Stdout = theirs
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err = cmd.Run()
	theirs.Close()
	if err != nil {
		return fmt.Errorf("ssh-proxy: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	buf, oob := make([]byte, 1), make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := unix.Recvmsg(int(ours.Fd()), buf, oob, 0)
	if err != nil {
		return fmt.Errorf("receiving the socket: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return fmt.Errorf("ssh-proxy passed no socket (%d control messages, %v)", len(msgs), err)
	}
	rights, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(rights) != 1 {
		return fmt.Errorf("ssh-proxy passed no socket: %v", err)
	}
	conn := os.NewFile(uintptr(rights[0]), "passed socket")
	defer conn.Close()
	domain, err := unix.GetsockoptInt(rights[0], unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return err
	}
	if domain != unix.AF_VSOCK {
		return fmt.Errorf("the passed socket has domain %d, not AF_VSOCK (%d)", domain, unix.AF_VSOCK)
	}
	peer, err := unix.Getpeername(rights[0])
	if err != nil {
		return err
	}
	sa, ok := peer.(*unix.SockaddrVM)
	if !ok || sa.CID != cid || sa.Port != bannerPort {
		return fmt.Errorf("the passed socket is connected to %#v, want CID %d port %d", peer, cid, bannerPort)
	}
	conn.SetDeadline(time.Now().Add(2 * time.Minute))
	banner, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return fmt.Errorf("reading the banner: %w", err)
	}
	t.logf("ssh-proxy vsock/%d: AF_VSOCK socket to CID %d port %d, banner %q", cid, sa.CID, sa.Port, banner)
	if want := fmt.Sprintf("cid=%d\r\n", cid); !strings.HasSuffix(banner, want) {
		return fmt.Errorf("banner %q is not from the guest with CID %d", banner, cid)
	}
	return nil
}

// echo sends s, half-closes and compares what comes back.
func echo(c net.Conn, s string) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Minute))
	errc := make(chan error, 1)
	go func() {
		_, err := io.WriteString(c, s)
		if err == nil {
			err = c.(interface{ CloseWrite() error }).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if err := <-errc; err != nil {
		return err
	}
	if string(got) != s {
		return fmt.Errorf("echo returned %d bytes that differ from the %d sent", len(got), len(s))
	}
	return nil
}

type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufConn) Read(p []byte) (int, error) { return c.r.Read(p) }
func (c *bufConn) CloseWrite() error          { return c.Conn.(*net.UnixConn).CloseWrite() }

// stop ends QEMU if it still runs, then closes the transport and removes
// the registration and work directory.
func (g *guest) stop() {
	g.once.Do(func() {
		if g.qemu != nil && g.qemu.Process != nil {
			select {
			case err := <-g.exited:
				g.exited <- err
			default:
				g.qemu.Process.Signal(syscall.SIGTERM)
				err := <-g.exited
				g.exited <- err
			}
		}
		if g.notifyL != nil {
			g.notifyL.Close()
		}
		if g.tr != nil {
			g.tr.Close()
		}
		if g.reg != nil {
			g.reg.Remove()
		}
		if g.console != "" {
			os.RemoveAll(filepath.Dir(g.console))
		}
	})
}
