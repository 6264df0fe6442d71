package harness

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/vsock"
)

// fakeTransport stands in for a vsock transport where no VM runs.
type fakeTransport struct{}

func (fakeTransport) Kind() vsock.Kind                               { return vsock.KindUser }
func (fakeTransport) CID() uint32                                    { return 42 }
func (fakeTransport) QEMUArgs() []string                             { return []string{"-device", "fake-vsock"} }
func (fakeTransport) ExtraFiles() []*os.File                         { return nil }
func (fakeTransport) Listen(uint32) (net.Listener, error)            { return nil, nil }
func (fakeTransport) Dial(context.Context, uint32) (net.Conn, error) { return nil, nil }
func (fakeTransport) HybridSocket() string                           { return "" }
func (fakeTransport) Close() error                                   { return nil }

func TestNewMachineArgs(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed")
	}
	dir := t.TempDir()
	img := BootImage{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img"), Rootfs: filepath.Join(dir, "rootfs.img"), RootfsFormat: "raw"}
	for _, f := range []string{img.Kernel, img.Initrd} {
		require.NoError(t, os.WriteFile(f, []byte("x"), 0o644))
	}
	require.NoError(t, os.WriteFile(img.Rootfs, make([]byte, 1<<20), 0o444))
	l, err := net.Listen("unix", filepath.Join(dir, "n.sock"))
	require.NoError(t, err)
	defer l.Close()
	work := t.TempDir()
	// A stand-in QEMU that only answers -cpu help; the VM is not started.
	qemu := filepath.Join(dir, "qemu-system-x86_64")
	require.NoError(t, os.WriteFile(qemu, []byte("#!/bin/sh\nprintf 'Recognized CPUID flags:\\n  erms fsrm sse2\\n'\n"), 0o755))

	tests := []struct {
		name     string
		skipUnit bool
		cpuModel string
		wantUnit string
		wantCPU  string
	}{
		{"test unit is the boot target", false, "", "systemd.unit=t.service", "-cpu max,erms=off,fsrm=off "},
		{"shell mode boots to multi-user", true, "", "systemd.unit=multi-user.target", "-cpu max,erms=off,fsrm=off "},
		{"an explicit CPU model wins", false, "qemu64", "systemd.unit=t.service", "-cpu qemu64 "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := NewMachine(context.Background(), Config{
				Name: "t", QEMU: qemu,
				Image:          img,
				Unit:           TestUnit{Name: "t.service", Text: []byte("[Service]\nExecStart=/bin/true\n")},
				Credentials:    []Credential{{Name: "secret", Value: []byte("hunter2")}},
				KernelArgs:     []string{"extra.arg=1"},
				Accel:          Accel{Name: "tcg"},
				WorkDir:        work,
				ConsoleLog:     filepath.Join(work, "console.log"),
				Transport:      fakeTransport{},
				NotifyListener: l,
				NotifyPort:     9,
				SkipTestUnit:   tt.skipUnit,
				CPUModel:       tt.cpuModel,
			})
			require.NoError(t, err)
			cmdline := m.KernelCommandLine()
			assert.Contains(t, cmdline, tt.wantUnit)
			assert.Contains(t, cmdline, "extra.arg=1")
			args := strings.Join(m.Args(), " ")
			assert.Contains(t, args, "-device fake-vsock")
			assert.Contains(t, args, "share=on")
			assert.Contains(t, args, "-accel tcg,thread=multi")
			assert.Contains(t, args, tt.wantCPU)
			assert.Contains(t, args, "-nic none")
			assert.NotContains(t, args, "hunter2", "credential values must not be on QEMU's command line")
			assert.Contains(t, args, filepath.Join(work, "overlay.qcow2"))

			// The overlay is backed by the image, which stays untouched.
			out, err := exec.Command("qemu-img", "info", "-U", filepath.Join(work, "overlay.qcow2")).CombinedOutput()
			require.NoError(t, err, "%s", out)
			assert.Contains(t, string(out), "backing file: "+img.Rootfs)
		})
	}
}

func TestNewMachineErrors(t *testing.T) {
	dir := t.TempDir()
	l, err := net.Listen("unix", filepath.Join(dir, "n.sock"))
	require.NoError(t, err)
	defer l.Close()
	img := BootImage{Kernel: filepath.Join(dir, "none"), Initrd: filepath.Join(dir, "none"), Rootfs: filepath.Join(dir, "none")}
	_, err = NewMachine(context.Background(), Config{Image: img, Transport: fakeTransport{}, NotifyListener: l, WorkDir: dir})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "image file missing")
}

// exitError returns the error of a real process that ended as the shell
// command says.
func exitError(t *testing.T, shell string) error {
	err := exec.Command("/bin/sh", "-c", shell).Run()
	require.Error(t, err)
	return err
}

func TestDecideOutcome(t *testing.T) {
	exit1 := exitError(t, "exit 1")
	killed := exitError(t, "kill -KILL $$")
	tests := []struct {
		name       string
		killReason string
		waitErr    error
		heard      bool
		res        Result
		wantCode   int
		wantReason string
	}{
		{name: "harness killed it", killReason: "test timed out after 1m0s", heard: true,
			res: Result{HasExitStatus: true, ExitStatus: GuestStatusPass}, wantCode: ExitFail, wantReason: "test timed out"},
		{name: "EXIT_STATUS decides", heard: true, res: Result{HasExitStatus: true, ExitStatus: GuestStatusSkip},
			wantCode: ExitSkip, wantReason: "skipped"},
		{name: "panic on the console", waitErr: exit1, heard: true,
			res:      Result{ConsoleTail: []string{"[ 3.1] Kernel panic - not syncing: sysrq triggered crash"}, QEMUStderr: "qemu: some error"},
			wantCode: ExitFail, wantReason: "guest kernel panicked: [ 3.1] Kernel panic"},
		{name: "pvpanic exit without a console line", waitErr: exit1, heard: true,
			wantCode: ExitFail, wantReason: "guest kernel panicked (QEMU exited on the pvpanic event: exit status 1)"},
		{name: "a start-up warning is not QEMU's error", waitErr: exit1, heard: true,
			res:      Result{QEMUStderr: "qemu-system-x86_64: warning: TCG doesn't support requested feature: CPUID.01H:ECX.vmx [bit 5]\n"},
			wantCode: ExitFail, wantReason: "guest kernel panicked (QEMU exited on the pvpanic event"},
		{name: "QEMU's own error after the guest spoke", waitErr: exit1, heard: true,
			res:      Result{QEMUStderr: "qemu-system-x86_64: warning: something\nqemu-system-x86_64: Failed to read msg header. Read 0 instead of 12.\n"},
			wantCode: ExitFail, wantReason: "QEMU stopped with an error (exit status 1): qemu-system-x86_64: Failed to read msg header"},
		{name: "QEMU failed before the guest spoke", waitErr: exit1,
			res:      Result{QEMUStderr: "qemu-system-x86_64: -device foo: 'foo' is not a valid device model name\n"},
			wantCode: ExitHarnessError, wantReason: "QEMU failed: qemu-system-x86_64: -device foo"},
		{name: "QEMU killed by a signal mid-run", waitErr: killed, heard: true,
			wantCode: ExitHarnessError, wantReason: "QEMU was killed by signal killed"},
		{name: "QEMU crashed with a message", waitErr: exitError(t, "kill -ABRT $$"), heard: true,
			res:      Result{QEMUStderr: "qemu-system-x86_64: ../hw/virtio/virtio.c:123: assertion failed\n"},
			wantCode: ExitHarnessError, wantReason: "QEMU was killed by signal aborted: qemu-system-x86_64: ../hw/virtio/virtio.c:123: assertion failed"},
		{name: "QEMU failed before the guest spoke, warning first", waitErr: exit1,
			res:      Result{QEMUStderr: "qemu-system-x86_64: -machine q35: bad option\nqemu-system-x86_64: warning: late warning\n"},
			wantCode: ExitHarnessError, wantReason: "QEMU failed: qemu-system-x86_64: -machine q35: bad option"},
		{name: "clean exit without EXIT_STATUS", heard: true,
			wantCode: ExitFail, wantReason: "VM stopped without the test's success action"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := tt.res
			got := decideOutcome(tt.killReason, tt.waitErr, tt.heard, &res)
			assert.Equal(t, tt.wantCode, got.ExitCode)
			assert.Contains(t, got.Reason, tt.wantReason)
		})
	}
}

func TestBootTimeLeft(t *testing.T) {
	const limit = 3 * time.Minute
	tests := []struct {
		name             string
		elapsed, starved time.Duration
		want             time.Duration
	}{
		{"idle machine, early", time.Minute, 0, 2 * time.Minute},
		{"idle machine, limit reached", limit, 0, 0},
		{"hung guest on an idle machine", 4 * time.Minute, time.Second, -59 * time.Second},
		{"overloaded machine: starved time does not count", 7 * time.Minute, 5 * time.Minute, time.Minute},
		{"overloaded machine, limit reached", 9 * time.Minute, 6 * time.Minute, 0},
		{"starvation above elapsed (clock skew) counts as none used", time.Second, 2 * time.Second, limit},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, bootTimeLeft(limit, tt.elapsed, tt.starved))
		})
	}
}

func TestCPUStarvationOfThisProcess(t *testing.T) {
	delays := ThreadRunDelays(os.Getpid())
	require.NotEmpty(t, delays, "this process has threads with schedstat")
	for _, d := range delays {
		assert.GreaterOrEqual(t, d, time.Duration(0))
	}
	assert.Empty(t, ThreadRunDelays(-1), "no such process")
	assert.Equal(t, time.Duration(0), cpuStarvation(-1))
}
