package harness

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	mdvsock "github.com/mdlayher/vsock"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/verdict"
)

// The fake QEMU is this test binary, re-executed: it plays a guest by
// following a script of steps from $FAKE_QEMU_SCRIPT, sending notify
// messages to the Unix socket at $FAKE_QEMU_NOTIFY. It is the seam that
// lets Machine.Run's lifecycle (signals, crashes, reboots, keeping a
// failed VM) be tested without a VM.
const (
	fakeQEMUScriptEnv = "FAKE_QEMU_SCRIPT"
	fakeQEMUNotifyEnv = "FAKE_QEMU_NOTIFY"
)

func TestMain(m *testing.M) {
	if script := os.Getenv(fakeQEMUScriptEnv); script != "" {
		os.Exit(runFakeQEMU(script, os.Getenv(fakeQEMUNotifyEnv)))
	}
	os.Exit(m.Run())
}

// runFakeQEMU runs steps separated by ';': "send MSG" (MSG's '|' are
// newlines), "sleep DURATION", "exit N", "crash" (SIGKILL: the Go runtime would catch SIGSEGV) and "hang".
func runFakeQEMU(script, notify string) int {
	for _, step := range strings.Split(script, ";") {
		verb, arg, _ := strings.Cut(strings.TrimSpace(step), " ")
		switch verb {
		case "send":
			c, err := net.Dial("unix", notify)
			if err != nil {
				fmt.Fprintln(os.Stderr, "fake qemu:", err)
				return 3
			}
			c.Write([]byte(strings.ReplaceAll(arg, "|", "\n")))
			c.Close()
		case "sleep":
			d, _ := time.ParseDuration(arg)
			time.Sleep(d)
		case "exit":
			var n int
			fmt.Sscan(arg, &n)
			return n
		case "crash":
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			time.Sleep(time.Minute)
		case "hang":
			time.Sleep(time.Hour)
		}
	}
	return 0
}

// unixTransport is a vsock transport whose listeners are Unix sockets,
// which the fake QEMU connects to.
type unixTransport struct {
	fakeTransport
	path string
}

func (t unixTransport) Listen(uint32) (net.Listener, error) {
	l, err := net.Listen("unix", t.path)
	return vsockAddrListener{l}, err
}

type vsockAddrListener struct{ net.Listener }

func (vsockAddrListener) Addr() net.Addr { return &mdvsock.Addr{ContextID: 2, Port: 7} }

func TestMachineRunLifecycle(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed")
	}
	self, err := os.Executable()
	require.NoError(t, err)
	const (
		booted  = "send X_SYSTEMD_UNIT_ACTIVE=basic.target"
		passed  = "send X_VMHARNESS_TEST_RESULT=success|X_VMHARNESS_TEST_EXIT_CODE=exited|X_VMHARNESS_TEST_EXIT_STATUS=0"
		failed3 = "send X_VMHARNESS_TEST_RESULT=exit-code|X_VMHARNESS_TEST_EXIT_CODE=exited|X_VMHARNESS_TEST_EXIT_STATUS=3"
		exit123 = "send EXIT_STATUS=123|X_SYSTEMD_SHUTDOWN=poweroff"
		reboot  = "send EXIT_STATUS=0|X_SYSTEMD_SHUTDOWN=reboot"
	)
	tests := []struct {
		name   string
		script string
		cfg    func(*Config)
		// cancelAfter cancels Run's context (SIGTERM to the runner) this
		// long after QEMU started.
		cancelAfter time.Duration
		wantCode    int
		wantReason  string
		wantKept    int
		// maxElapsed, if set, bounds how long Run may take.
		maxElapsed time.Duration
	}{
		{name: "pass", script: booted + ";" + passed + ";" + exit123 + ";exit 0", wantCode: ExitPass},
		{name: "a unit that exits 123", script: booted + ";send X_VMHARNESS_TEST_RESULT=exit-code|X_VMHARNESS_TEST_EXIT_CODE=exited|X_VMHARNESS_TEST_EXIT_STATUS=123;" + exit123 + ";exit 0",
			wantCode: ExitFail, wantReason: "test exited with status 123"},
		{name: "a reboot, then a pass", script: booted + ";" + failed3 + ";" + reboot + ";" + booted + ";" + passed + ";" + exit123 + ";exit 0",
			wantCode: ExitPass},
		{name: "QEMU crashes mid-test", script: booted + ";crash", wantCode: ExitHarnessError, wantReason: "QEMU was killed by signal killed"},
		{name: "QEMU fails before the guest spoke", script: "exit 1", wantCode: ExitHarnessError, wantReason: "QEMU failed: exit status 1"},
		{name: "pvpanic", script: booted + ";exit 1", wantCode: ExitFail, wantReason: "guest kernel panicked"},
		{name: "SIGTERM to the runner", script: booted + ";hang", cancelAfter: time.Second, wantCode: ExitFail, wantReason: "interrupted"},
		{name: "the run's timeout", script: booted + ";hang", cfg: func(c *Config) { c.Timeout = time.Second }, wantCode: ExitFail, wantReason: "test timed out after 1s"},
		{name: "boot timeout", script: "hang", cfg: func(c *Config) { c.BootTimeout = time.Second }, wantCode: ExitFail, wantReason: "boot timeout: guest did not boot within 1s"},
		{name: "keep a failed VM until its time is up", script: booted + ";" + failed3 + ";hang",
			cfg: func(c *Config) {
				c.Timeout = 200 * time.Millisecond // replaced by the keep time once the test failed
				c.KeepOnFailure = func(Outcome) time.Duration { return 2 * time.Second }
			},
			wantCode: ExitFail, wantReason: "test exited with status 3", wantKept: 1},
		{name: "decided by the report: stopped once the journal marker is in, without the guest's shutdown",
			script: booted + ";send X_VMHARNESS_TEST_RESULT=success|X_VMHARNESS_TEST_EXIT_CODE=exited|X_VMHARNESS_TEST_EXIT_STATUS=0|X_VMHARNESS_SYSTEM_STATE=starting|X_VMHARNESS_INVOCATION=inv1;hang",
			cfg: func(c *Config) {
				asked := time.Now()
				c.JournalHas = func(marker string) bool { return marker == "inv1" && time.Since(asked) > 300*time.Millisecond }
			},
			wantCode: ExitPass},
		{name: "--full-shutdown waits for the guest",
			script:   booted + ";send X_VMHARNESS_TEST_RESULT=success|X_VMHARNESS_TEST_EXIT_CODE=exited|X_VMHARNESS_TEST_EXIT_STATUS=0|X_VMHARNESS_SYSTEM_STATE=starting|X_VMHARNESS_INVOCATION=inv1;sleep 500ms;" + exit123 + ";exit 0",
			cfg:      func(c *Config) { c.FullShutdown = true; c.JournalHas = func(string) bool { return true } },
			wantCode: ExitPass},
		{name: "emergency mode: a guest whose shutdown hangs is stopped after the power-off time",
			script: booted + ";send X_SYSTEMD_UNIT_ACTIVE=emergency.target;send X_VMHARNESS_EMERGENCY=emergency.target;hang",
			cfg: func(c *Config) {
				c.Timeout = 20 * time.Second // fails the elapsed-time check below if it is what ends the run
				c.PowerOffTimeout = time.Second
			},
			wantCode: ExitFail, wantReason: "guest fell into emergency mode (emergency.target reached)", maxElapsed: 10 * time.Second},
		{name: "keep mode: a skip stops the VM", script: booted + ";send X_VMHARNESS_TEST_RESULT=exit-code|X_VMHARNESS_TEST_EXIT_CODE=exited|X_VMHARNESS_TEST_EXIT_STATUS=77;hang",
			cfg:      func(c *Config) { c.KeepOnFailure = func(Outcome) time.Duration { return time.Hour } },
			wantCode: ExitSkip, wantReason: "exit status 77"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			img := BootImage{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img"), Rootfs: filepath.Join(dir, "rootfs.img"), RootfsFormat: "raw"}
			for _, f := range []string{img.Kernel, img.Initrd} {
				require.NoError(t, os.WriteFile(f, []byte("x"), 0o644))
			}
			require.NoError(t, os.WriteFile(img.Rootfs, make([]byte, 1<<20), 0o444))
			notify := filepath.Join(dir, "notify.sock")
			t.Setenv(fakeQEMUScriptEnv, tt.script)
			t.Setenv(fakeQEMUNotifyEnv, notify)
			kept := 0
			cfg := Config{
				Name: "t", QEMU: self, CPUModel: "max", Image: img,
				Unit:      TestUnit{Name: "t.service", Text: []byte("[Service]\nExecStart=/bin/true\n")},
				Accel:     Accel{Name: "tcg"},
				WorkDir:   dir,
				Transport: unixTransport{path: notify},
				Logf:      t.Logf,
			}
			if tt.cfg != nil {
				tt.cfg(&cfg)
			}
			if keep := cfg.KeepOnFailure; keep != nil {
				cfg.KeepOnFailure = func(o Outcome) time.Duration { kept++; return keep(o) }
			}
			cfg.ConsoleLog = filepath.Join(dir, "console.log")
			m, err := NewMachine(context.Background(), cfg)
			require.NoError(t, err)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tt.cancelAfter > 0 {
				time.AfterFunc(tt.cancelAfter, cancel)
			}
			res, err := m.Run(ctx, nil)
			require.NoError(t, err)
			assert.Equal(t, tt.wantCode, res.Outcome.ExitCode, "reason: %s", res.Outcome.Reason)
			assert.Contains(t, res.Outcome.Reason, tt.wantReason)
			assert.Equal(t, tt.wantKept, kept, "KeepOnFailure calls")
			if tt.maxElapsed > 0 {
				assert.Less(t, res.Elapsed, tt.maxElapsed, "Run's duration")
			}
			assert.ErrorIs(t, syscall.Kill(m.PID(), 0), syscall.ESRCH, "QEMU does not outlive Run")
			_, err = net.Dial("unix", notify)
			assert.Error(t, err, "Run closes the notify listener")

			if tt.wantCode == ExitPass {
				tl := res.Timeline
				for _, at := range []time.Time{tl.QEMUStart, tl.FirstMessage, tl.TestEnd, tl.QEMUExit} {
					require.False(t, at.IsZero(), "timeline %+v", tl)
				}
				// (A message can be read after QEMU exited: the fake sends
				// its last ones right before it exits.)
				assert.True(t, !tl.FirstMessage.Before(tl.QEMUStart) && !tl.TestEnd.Before(tl.FirstMessage) &&
					!tl.QEMUExit.Before(tl.QEMUStart), "phases in order: %+v", tl)
				assert.Contains(t, tl.String(), "first message ")
			}

			// The journal's account completes the verdict afterwards.
			got := res.Judge(verdict.JournalUnitResult{})
			assert.Equal(t, res.Outcome, got)
		})
	}
}
