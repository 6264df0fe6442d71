package harness

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

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

	tests := []struct {
		name     string
		skipUnit bool
		wantUnit string
	}{
		{"test unit is the boot target", false, "systemd.unit=t.service"},
		{"shell mode boots to multi-user", true, "systemd.unit=multi-user.target"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := NewMachine(context.Background(), Config{
				Name: "t", QEMU: "qemu-img", // any binary on PATH; the VM is not started
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
			})
			require.NoError(t, err)
			cmdline := m.KernelCommandLine()
			assert.Contains(t, cmdline, tt.wantUnit)
			assert.Contains(t, cmdline, "extra.arg=1")
			args := strings.Join(m.Args(), " ")
			assert.Contains(t, args, "-device fake-vsock")
			assert.Contains(t, args, "share=on")
			assert.Contains(t, args, "-accel tcg,thread=multi")
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
