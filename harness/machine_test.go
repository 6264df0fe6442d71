package harness

import (
	"context"
	"encoding/base64"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	mdvsock "github.com/mdlayher/vsock"

	"github.com/vmharness/vmharness/harness/vsock"
)

// fakeTransport stands in for a vsock transport where no VM runs.
type fakeTransport struct{}

func (fakeTransport) Kind() vsock.Kind                               { return vsock.KindUser }
func (fakeTransport) CID() uint32                                    { return 42 }
func (fakeTransport) QEMUArgs() []string                             { return []string{"-device", "fake-vsock"} }
func (fakeTransport) ExtraFiles() []*os.File                         { return nil }
func (fakeTransport) Listen(uint32) (net.Listener, error)            { return fakeListener{}, nil }
func (fakeTransport) Dial(context.Context, uint32) (net.Conn, error) { return nil, nil }
func (fakeTransport) HybridSocket() string                           { return "" }
func (fakeTransport) Close() error                                   { return nil }

// fakeListener is a vsock listener nobody connects to.
type fakeListener struct{}

func (fakeListener) Accept() (net.Conn, error) { return nil, net.ErrClosed }
func (fakeListener) Close() error              { return nil }
func (fakeListener) Addr() net.Addr            { return &mdvsock.Addr{ContextID: 2, Port: 9} }

// machineFixture makes stand-in image files (an initrd included), a layer
// named layerName (a qcow2 image over the root file system, as
// images/layer makes) and a stand-in QEMU that only answers -cpu help, in
// one directory; no VM is started from them.
func machineFixture(t *testing.T, layerName string) (img BootImage, layer, qemu string) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed")
	}
	dir := t.TempDir()
	img = BootImage{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img"), Rootfs: filepath.Join(dir, "rootfs.img"), RootfsFormat: "raw"}
	for _, f := range []string{img.Kernel, img.Initrd} {
		require.NoError(t, os.WriteFile(f, []byte("x"), 0o644))
	}
	require.NoError(t, os.WriteFile(img.Rootfs, make([]byte, 1<<20), 0o444))
	layer = filepath.Join(dir, layerName)
	out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-b", img.Rootfs, "-F", "raw", layer).CombinedOutput()
	require.NoError(t, err, "%s", out)
	qemu = filepath.Join(dir, "qemu-system-x86_64")
	require.NoError(t, os.WriteFile(qemu, []byte("#!/bin/sh\nprintf 'Recognized CPUID flags:\\n  erms fsrm sse2\\n'\n"), 0o755))
	return img, layer, qemu
}

func TestNewMachineArgs(t *testing.T) {
	img, layer, qemu := machineFixture(t, "layer,1.qcow2")
	work := t.TempDir()

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
				Image:        img,
				Unit:         TestUnit{Name: "t.service", Text: []byte("[Service]\nExecStart=/bin/true\n")},
				Credentials:  []Credential{{Name: "secret", Value: []byte("hunter2")}},
				KernelArgs:   []string{"extra.arg=1"},
				Accel:        Accel{Name: "tcg"},
				WorkDir:      work,
				ConsoleLog:   filepath.Join(work, "console,log"),
				Layer:        layer,
				Transport:    fakeTransport{},
				SkipTestUnit: tt.skipUnit,
				CPUModel:     tt.cpuModel,
			})
			require.NoError(t, err)
			cmdline := m.KernelCommandLine()
			assert.Contains(t, cmdline, tt.wantUnit)
			assert.Contains(t, cmdline, "extra.arg=1")
			notests := strings.Index(cmdline, " cryptomgr.notests ")
			require.GreaterOrEqual(t, notests, 0, "the kernel's crypto self-tests are off: %s", cmdline)
			assert.Less(t, notests, strings.Index(cmdline, "extra.arg=1"), "the user's arguments come last, so they can undo the harness's")
			args := strings.Join(m.Args(), " ")
			assert.Contains(t, args, "-device fake-vsock")
			assert.Contains(t, args, "share=on")
			assert.Contains(t, args, "-accel tcg,thread=multi")
			assert.Contains(t, args, tt.wantCPU)
			assert.Contains(t, args, "-nic none")
			assert.NotContains(t, args, "hunter2", "credential values must not be on QEMU's command line")
			assert.Contains(t, args, filepath.Join(work, "overlay.qcow2"))
			assert.Contains(t, args, "path="+strings.ReplaceAll(filepath.Join(work, "console,log"), ",", ",,")+" ", "paths in QEMU option lists are comma-escaped")
			assert.NotContains(t, args, "layer", "the layer is in the root disk's backing chain, not a device")
			smbios, err := os.ReadFile(filepath.Join(work, "credential-006.smbios"))
			require.NoError(t, err)
			assert.Equal(t, "io.systemd.credential.binary:vmm.notify_socket="+base64.StdEncoding.EncodeToString([]byte("vsock-stream:2:9")), string(smbios), "the Machine owns the notify socket and tells the guest")

			// The overlay is backed by the layer, the layer by the image;
			// both stay untouched.
			out, err := exec.Command("qemu-img", "info", "-U", "--backing-chain", filepath.Join(work, "overlay.qcow2")).CombinedOutput()
			require.NoError(t, err, "%s", out)
			assert.Contains(t, string(out), "backing file: "+layer+"\nbacking file format: qcow2")
			assert.Contains(t, string(out), "backing file: "+img.Rootfs+"\nbacking file format: raw")
		})
	}
}

func TestNewMachineErrors(t *testing.T) {
	dir := t.TempDir()
	img := BootImage{Kernel: filepath.Join(dir, "none"), Initrd: filepath.Join(dir, "none"), Rootfs: filepath.Join(dir, "none")}
	_, err := NewMachine(context.Background(), Config{Image: img, Transport: fakeTransport{}, WorkDir: dir})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "image file missing")
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

func TestBootKernel(t *testing.T) {
	withELF := BootImage{Kernel: "/img/vmlinuz", KernelELF: "/img/vmlinux"}
	tests := []struct {
		name string
		img  BootImage
		fw   Firmware
		want string
	}{
		{"PVH kernel, default firmware", withELF, "", "/img/vmlinux"},
		{"PVH kernel, SeaBIOS", withELF, FirmwareLinux, "/img/vmlinux"},
		{"UEFI needs the bzImage's EFI stub", withELF, FirmwareUEFI, "/img/vmlinuz"},
		{"UEFI Secure Boot too", withELF, FirmwareUEFISecureBoot, "/img/vmlinuz"},
		{"an image without a PVH kernel", BootImage{Kernel: "/img/vmlinuz"}, FirmwareLinux, "/img/vmlinuz"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, bootKernel(tt.img, tt.fw))
		})
	}
}

func TestNewMachineBootModes(t *testing.T) {
	files, layer, qemu := machineFixture(t, "layer.qcow2")
	kernel, initrd, rootfs := files.Kernel, files.Initrd, files.Rootfs
	kernelELF := filepath.Join(filepath.Dir(kernel), "vmlinux")
	require.NoError(t, os.WriteFile(kernelELF, []byte("x"), 0o644))

	tests := []struct {
		name        string
		img         BootImage
		layer       string
		wantArgs    []string
		notArgs     []string
		wantCmdline []string
		notCmdline  []string
		wantErr     string
	}{
		{name: "an image without a manifest: virtio-blk root through the initrd",
			img:         BootImage{Initrd: initrd},
			layer:       layer,
			wantArgs:    []string{"-device virtio-blk-pci,drive=root ", "-initrd " + initrd},
			wantCmdline: []string{"root=/dev/vda rw"},
			notCmdline:  []string{"init="}},
		{name: "direct boot: NVMe root, no initrd",
			img:         BootImage{RootDevice: "/dev/nvme0n1", RootCmdline: "root=/dev/nvme0n1 rootwait rw"},
			wantArgs:    []string{"-device nvme,drive=root,serial=vmharness-root "},
			notArgs:     []string{"-initrd"},
			wantCmdline: []string{"root=/dev/nvme0n1 rootwait rw"},
			notCmdline:  []string{"init=", "root=/dev/vda"}},
		{name: "direct boot with a layer: the same boot, the layer is in the root disk",
			img:         BootImage{RootDevice: "/dev/nvme0n1", RootCmdline: "root=/dev/nvme0n1 rw"},
			layer:       layer,
			wantArgs:    []string{"-device nvme,drive=root,serial=vmharness-root "},
			notArgs:     []string{"-initrd", "vmharness-layer"},
			wantCmdline: []string{"root=/dev/nvme0n1 rw"},
			notCmdline:  []string{"init="}},
		{name: "NVMe root through the initrd, with a layer",
			img:        BootImage{Initrd: initrd, RootDevice: "/dev/nvme0n1", RootCmdline: "root=/dev/nvme0n1 rw"},
			layer:      layer,
			wantArgs:   []string{"-initrd " + initrd},
			notArgs:    []string{"vmharness-layer"},
			notCmdline: []string{"init="}},
		{name: "a PVH kernel is what QEMU loads",
			img:      BootImage{KernelELF: kernelELF, RootDevice: "/dev/nvme0n1", RootCmdline: "root=/dev/nvme0n1 rw"},
			wantArgs: []string{"-kernel " + kernelELF + " "},
			notArgs:  []string{"-kernel " + kernel}},
		{name: "a PVH kernel that is gone",
			img:     BootImage{KernelELF: kernelELF + ".gone"},
			wantErr: "image file missing (rebuild with vmharness image build)"},
		{name: "a root device on no bus the harness has",
			img:     BootImage{RootDevice: "/dev/sda"},
			wantErr: `root device "/dev/sda": vmharness attaches the root disk as /dev/vda (virtio-blk) or /dev/nvme0n1 (NVMe)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img := tt.img
			img.Kernel, img.Rootfs, img.RootfsFormat = kernel, rootfs, "raw"
			m, err := NewMachine(context.Background(), Config{
				Name: "t", QEMU: qemu, Image: img,
				Unit:      TestUnit{Name: "t.service", Text: []byte("[Service]\nExecStart=/bin/true\n")},
				Accel:     Accel{Name: "tcg"},
				WorkDir:   t.TempDir(),
				Layer:     tt.layer,
				Transport: fakeTransport{},
			})
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			args := strings.Join(m.Args(), " ") + " "
			cmdline := m.KernelCommandLine()
			for _, s := range tt.wantArgs {
				assert.Contains(t, args, s)
			}
			for _, s := range tt.notArgs {
				assert.NotContains(t, args, s)
			}
			for _, s := range tt.wantCmdline {
				assert.Contains(t, cmdline, s)
			}
			for _, s := range tt.notCmdline {
				assert.NotContains(t, cmdline, s)
			}
		})
	}
}
