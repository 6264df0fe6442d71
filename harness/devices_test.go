package harness

import (
	"context"
	"encoding/base64"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeImage writes a boot image of placeholder files.
func fakeImage(t *testing.T) BootImage {
	t.Helper()
	dir := t.TempDir()
	img := BootImage{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img"), Rootfs: filepath.Join(dir, "rootfs.img"), RootfsFormat: "raw"}
	for _, f := range []string{img.Kernel, img.Initrd} {
		require.NoError(t, os.WriteFile(f, []byte("x"), 0o644))
	}
	require.NoError(t, os.WriteFile(img.Rootfs, make([]byte, 1<<20), 0o444))
	return img
}

// smbiosCredential finds a credential among the SMBIOS files in dir.
func smbiosCredential(t *testing.T, dir, name string) string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "credential-*.smbios"))
	require.NoError(t, err)
	for _, f := range files {
		data, err := os.ReadFile(f)
		require.NoError(t, err)
		v, ok := strings.CutPrefix(string(data), "io.systemd.credential.binary:"+name+"=")
		if ok {
			dec, err := base64.StdEncoding.DecodeString(v)
			require.NoError(t, err)
			return string(dec)
		}
	}
	t.Fatalf("no credential %s in %s", name, dir)
	return ""
}

func TestNewMachineDevices(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed")
	}
	fwDir := t.TempDir()
	code, vars := writeDescriptor(t, fwDir, "60-plain", nil, "pc-q35-*")
	work := t.TempDir()
	m, err := NewMachine(context.Background(), Config{
		Name: "t", QEMU: "/bin/true", CPUModel: "max", Image: fakeImage(t),
		Unit:      TestUnit{Name: "t.service", Text: []byte("[Service]\nExecStart=/bin/true\n")},
		Accel:     Accel{Name: "tcg"},
		WorkDir:   work,
		Transport: fakeTransport{},
		Env:       []EnvVar{{"TEST_MATCH_SUBTEST", "a b"}, {"X", "1"}, {"X", "2"}},
		Disks: []Disk{
			{Size: 64 << 20, Serial: "alpha", Format: "raw", Bus: DiskVirtioBlk},
			{Size: 1 << 30, Serial: "beta", Format: "qcow2", Bus: DiskVirtioSCSI},
		},
		Firmware:               FirmwareUEFI,
		FirmwareDescriptorDirs: []string{fwDir},
		TPM:                    true,
		SWTPM:                  "/bin/true", // only looked up: Run is not called
	})
	require.NoError(t, err)
	defer m.Close()
	args := strings.Join(m.Args(), " ")
	assert.Contains(t, args, "-drive if=pflash,unit=0,format=raw,readonly=on,file="+code)
	assert.Contains(t, args, "-drive if=pflash,unit=1,format=raw,file="+filepath.Join(work, "efivars.raw"))
	assert.NotContains(t, args, "smm=on")
	assert.Contains(t, args, "-device virtio-blk-pci,drive=disk1,serial=alpha")
	assert.Contains(t, args, "-device scsi-hd,bus=vmharness-scsi.0,drive=disk2,serial=beta")
	assert.Contains(t, args, "-device tpm-crb,tpmdev=tpm0")
	assert.Contains(t, args, "path="+filepath.Join(work, "tpm.sock"))
	assert.Less(t, strings.Index(args, "-drive if=pflash"), strings.Index(args, "-device fake-vsock"), "devices come before the transport and user arguments")

	tmpl, err := os.ReadFile(vars)
	require.NoError(t, err)
	copied, err := os.ReadFile(filepath.Join(work, "efivars.raw"))
	require.NoError(t, err)
	assert.Equal(t, tmpl, copied, "the VM gets its own copy of the variable store")
	st, err := os.Stat(filepath.Join(work, "disk1.raw"))
	require.NoError(t, err)
	assert.Equal(t, int64(64<<20), st.Size())
	_, err = os.Stat(filepath.Join(work, "disk2.qcow2"))
	require.NoError(t, err)

	dropin := smbiosCredential(t, work, "systemd.unit-dropin.t.service")
	assert.Contains(t, dropin, "SuccessAction=exit", "the result protocol's drop-in is kept")
	assert.Contains(t, dropin, "\n[Service]\nEnvironment=\"TEST_MATCH_SUBTEST=a b\"\nEnvironment=\"X=2\"\n")
	assert.NotContains(t, dropin, "X=1")
	assert.Contains(t, dropin, `Wants=dev-disk-by\x2did-virtio\x2dalpha.device dev-disk-by\x2did-scsi\x2d0QEMU_QEMU_HARDDISK_beta.device`)
	assert.Equal(t, "[Unit]\nJobRunningTimeoutSec=10min\n", smbiosCredential(t, work, `systemd.unit-dropin.dev-disk-by\x2did-virtio\x2dalpha.device`))
	assert.Equal(t, "[Unit]\nJobRunningTimeoutSec=10min\n", smbiosCredential(t, work, `systemd.unit-dropin.dev-disk-by\x2did-scsi\x2d0QEMU_QEMU_HARDDISK_beta.device`))
}

func TestNewMachineDeviceErrors(t *testing.T) {
	base := Config{
		Name: "t", QEMU: "/bin/true", CPUModel: "max", Image: fakeImage(t),
		Unit:      TestUnit{Name: "t.service", Text: []byte("[Service]\nExecStart=/bin/true\n")},
		Transport: fakeTransport{},
	}
	tests := []struct {
		name    string
		cfg     func(*Config)
		wantErr string
	}{
		{"unknown firmware", func(c *Config) { c.Firmware = "bios" }, `--firmware "bios"`},
		{"no OVMF", func(c *Config) {
			c.Firmware = FirmwareUEFI
			c.FirmwareDescriptorDirs = []string{"/nonexistent"}
		}, "install the ovmf package"},
		{"no swtpm", func(c *Config) { c.TPM, c.SWTPM = true, "/nonexistent/swtpm" }, "install the swtpm package"},
		{"duplicate serials", func(c *Config) {
			d := Disk{Size: 1 << 20, Serial: "a", Format: "raw", Bus: DiskVirtioBlk}
			c.Disks = []Disk{d, d}
		}, "two disks have the serial"},
		{"bad env name", func(c *Config) { c.Env = []EnvVar{{"1A", "x"}} }, "must not start with a digit"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := base
			cfg.WorkDir = t.TempDir()
			tt.cfg(&cfg)
			_, err := NewMachine(context.Background(), cfg)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
			entries, err := os.ReadDir(cfg.WorkDir)
			require.NoError(t, err)
			assert.Empty(t, entries, "bad input is refused before anything is created")
		})
	}
}

// TestMachineRunStopsTPM runs the fake QEMU with a real swtpm: however
// Run ends, swtpm, its socket and its state are gone afterwards.
func TestMachineRunStopsTPM(t *testing.T) {
	requireSWTPM(t)
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed")
	}
	self, err := os.Executable()
	require.NoError(t, err)
	tests := []struct {
		name        string
		script      string
		cancelAfter time.Duration
		wantCode    int
	}{
		{"QEMU crashes", "send X_SYSTEMD_UNIT_ACTIVE=basic.target;crash", 0, ExitHarnessError},
		{"SIGTERM to the runner", "send X_SYSTEMD_UNIT_ACTIVE=basic.target;hang", time.Second, ExitFail},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			notify := filepath.Join(dir, "notify.sock")
			t.Setenv(fakeQEMUScriptEnv, tt.script)
			t.Setenv(fakeQEMUNotifyEnv, notify)
			m, err := NewMachine(context.Background(), Config{
				Name: "t", QEMU: self, CPUModel: "max", Image: fakeImage(t),
				Unit:       TestUnit{Name: "t.service", Text: []byte("[Service]\nExecStart=/bin/true\n")},
				Accel:      Accel{Name: "tcg"},
				WorkDir:    dir,
				ConsoleLog: filepath.Join(dir, "console.log"),
				Transport:  unixTransport{path: notify},
				TPM:        true,
				Logf:       t.Logf,
			})
			require.NoError(t, err)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tt.cancelAfter > 0 {
				time.AfterFunc(tt.cancelAfter, cancel)
			}
			res, err := m.Run(ctx, nil)
			require.NoError(t, err)
			assert.Equal(t, tt.wantCode, res.Outcome.ExitCode, res.Outcome.Reason)
			pid := m.devices.tpm.pid
			require.NotZero(t, pid, "swtpm was started")
			assert.ErrorIs(t, syscall.Kill(pid, 0), syscall.ESRCH, "swtpm does not outlive Run")
			for _, p := range []string{"tpm.sock", "tpm"} {
				_, err := os.Stat(filepath.Join(dir, p))
				assert.ErrorIs(t, err, os.ErrNotExist, p)
			}
		})
	}
}
