package harness

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/unitfile"
)

func TestParseDiskSize(t *testing.T) {
	tests := []struct {
		in      string
		want    int64
		wantErr string
	}{
		{in: "512M", want: 512 << 20},
		{in: "1G", want: 1 << 30},
		{in: "2g", want: 2 << 30},
		{in: "64GiB", want: 64 << 30},
		{in: "100MB", want: 100 << 20},
		{in: "4096", want: 4096},
		{in: "8K", want: 8 << 10},
		{in: "0", wantErr: "more than 0 bytes"},
		{in: "0G", wantErr: "more than 0 bytes"},
		{in: "-1G", wantErr: "want a whole number"},
		{in: "lots", wantErr: "want a whole number"},
		{in: "1.5G", wantErr: "want a whole number"},
		{in: "", wantErr: "want a whole number"},
		{in: "1X", wantErr: "want a whole number"},
		{in: " 1G", wantErr: "want a whole number"},
		{in: "1T", wantErr: "over the limit of 64G"},
		{in: "65G", wantErr: "over the limit of 64G"},
		{in: "99999999999999999999", wantErr: "over the limit"},
		{in: "9223372036854775807T", wantErr: "over the limit"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseDiskSize(tt.in)
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestParseDiskArg(t *testing.T) {
	tests := []struct {
		arg     string
		index   int
		want    Disk
		wantErr string
	}{
		{arg: "1G", index: 0, want: Disk{Size: 1 << 30, Serial: "disk1", Format: "raw", Bus: DiskVirtioBlk}},
		{arg: "64M,serial=data", index: 2, want: Disk{Size: 64 << 20, Serial: "data", Format: "raw", Bus: DiskVirtioBlk}},
		{arg: "2G,serial=a.b_c-1,format=qcow2,bus=virtio-scsi", want: Disk{Size: 2 << 30, Serial: "a.b_c-1", Format: "qcow2", Bus: DiskVirtioSCSI}},
		{arg: "1G,bus=virtio-blk", index: 4, want: Disk{Size: 1 << 30, Serial: "disk5", Format: "raw", Bus: DiskVirtioBlk}},
		{arg: "1000", wantErr: "not a multiple of the 512-byte sector"},
		{arg: "1G,serial=", wantErr: "want 1 to 20 characters"},
		{arg: "1G,serial=abcdefghijklmnopqrstu", wantErr: "want 1 to 20 characters"},
		{arg: "1G,serial=a/b", wantErr: "only letters, digits"},
		{arg: "1G,serial=a b", wantErr: "only letters, digits"},
		{arg: "1G,serial=VMHarness-layer", wantErr: "the harness's own"},
		{arg: "1G,format=vmdk", wantErr: `format "vmdk"`},
		{arg: "1G,bus=ide", wantErr: `bus "ide"`},
		{arg: "1G,size=2G", wantErr: `unknown option "size=2G"`},
		{arg: "serial=x", wantErr: "want a whole number"},
	}
	for _, tt := range tests {
		t.Run(tt.arg, func(t *testing.T) {
			got, err := ParseDiskArg(tt.arg, tt.index)
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				assert.Contains(t, err.Error(), "--disk")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestValidateDisks(t *testing.T) {
	disk := func(serial string) Disk {
		return Disk{Size: 1 << 20, Serial: serial, Format: "raw", Bus: DiskVirtioBlk}
	}
	require.NoError(t, ValidateDisks(nil))
	require.NoError(t, ValidateDisks([]Disk{disk("a"), disk("b")}))
	err := ValidateDisks([]Disk{disk("a"), disk("a")})
	require.Error(t, err)
	assert.Contains(t, err.Error(), `two disks have the serial "a"`)
	many := make([]Disk, MaxDisks+1)
	for i := range many {
		many[i] = disk("d" + string(rune('a'+i)))
	}
	err = ValidateDisks(many)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "at most 16")
}

func TestDiskQEMUArgs(t *testing.T) {
	files := []diskFile{
		{Disk{Size: 1 << 20, Serial: "a", Format: "raw", Bus: DiskVirtioBlk}, "/w,x/disk1.raw"},
		{Disk{Size: 1 << 20, Serial: "b", Format: "qcow2", Bus: DiskVirtioSCSI}, "/w/disk2.qcow2"},
		{Disk{Size: 1 << 20, Serial: "c", Format: "raw", Bus: DiskVirtioSCSI}, "/w/disk3.raw"},
	}
	assert.Equal(t, []string{
		"-drive", "if=none,id=disk1,file=/w,,x/disk1.raw,format=raw,cache=unsafe,discard=unmap",
		"-device", "virtio-blk-pci,drive=disk1,serial=a",
		"-drive", "if=none,id=disk2,file=/w/disk2.qcow2,format=qcow2,cache=unsafe,discard=unmap",
		"-device", "virtio-scsi-pci,id=vmharness-scsi",
		"-device", "scsi-hd,bus=vmharness-scsi.0,drive=disk2,serial=b",
		"-drive", "if=none,id=disk3,file=/w/disk3.raw,format=raw,cache=unsafe,discard=unmap",
		"-device", "scsi-hd,bus=vmharness-scsi.0,drive=disk3,serial=c",
	}, diskQEMUArgs(files), "one virtio-scsi controller for all SCSI disks; paths comma-escaped")
	assert.Nil(t, diskQEMUArgs(nil))
}

func TestDisksDropIn(t *testing.T) {
	assert.Empty(t, disksDropIn(nil))
	got := unitfile.Serialize(disksDropIn([]Disk{{Serial: "data-1", Bus: DiskVirtioBlk}, {Serial: "s.2", Bus: DiskVirtioSCSI}}))
	units := `dev-disk-by\x2did-virtio\x2ddata\x2d1.device dev-disk-by\x2did-scsi\x2d0QEMU_QEMU_HARDDISK_s.2.device`
	assert.Equal(t, "[Unit]\nWants="+units+"\nAfter="+units+"\n", got)
}

func TestDiskDeviceCredentials(t *testing.T) {
	creds := diskDeviceCredentials([]Disk{{Serial: "a", Bus: DiskVirtioBlk}})
	require.Len(t, creds, 1)
	assert.Equal(t, `systemd.unit-dropin.dev-disk-by\x2did-virtio\x2da.device`, creds[0].Name)
	assert.Equal(t, "[Unit]\nJobRunningTimeoutSec=10min\n", string(creds[0].Value))
}

func TestPathDeviceUnit(t *testing.T) {
	// As `systemd-escape --path --suffix=device` prints them.
	tests := map[string]string{
		"/dev/disk/by-id/virtio-abc":  `dev-disk-by\x2did-virtio\x2dabc.device`,
		"/dev/vdb":                    "dev-vdb.device",
		"/dev/disk/by-label/a b:c_d.": `dev-disk-by\x2dlabel-a\x20b:c_d..device`,
		"/.hidden":                    `\x2ehidden.device`,
	}
	for in, want := range tests {
		assert.Equal(t, want, pathDeviceUnit(in), in)
	}
	// Where go-systemd's escaping is wrong: systemd-escape --path writes
	// "a\x09b". No serial has a control character (Disk.validate).
	assert.Equal(t, `a\x9b.device`, pathDeviceUnit("/a\tb"), "go-systemd escapes bytes below 0x10 with one hex digit")
	assert.ErrorContains(t, Disk{Size: 1 << 20, Serial: "a\tb", Format: "raw", Bus: DiskVirtioBlk}.validate(), "only letters")
}

func TestCreateDisks(t *testing.T) {
	dir := t.TempDir()
	disks := []Disk{
		{Size: 64 << 20, Serial: "a", Format: "raw", Bus: DiskVirtioBlk},
	}
	qcow2 := false
	if _, err := exec.LookPath("qemu-img"); err == nil {
		disks = append(disks, Disk{Size: 1 << 30, Serial: "b", Format: "qcow2", Bus: DiskVirtioSCSI})
		qcow2 = true
	}
	files, err := createDisks(context.Background(), dir, disks)
	require.NoError(t, err)
	require.Len(t, files, len(disks))

	raw := files[0].Path
	assert.Equal(t, filepath.Join(dir, "disk1.raw"), raw)
	st, err := os.Stat(raw)
	require.NoError(t, err)
	assert.Equal(t, int64(64<<20), st.Size())
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	assert.Zero(t, st.Sys().(*syscall.Stat_t).Blocks, "a raw disk is a sparse file")

	if qcow2 {
		out, err := exec.Command("qemu-img", "info", files[1].Path).CombinedOutput()
		require.NoError(t, err, "%s", out)
		assert.Contains(t, string(out), "file format: qcow2")
		assert.Contains(t, string(out), "virtual size: 1 GiB")
	}

	_, err = createDisks(context.Background(), dir, disks[:1])
	require.Error(t, err, "an existing file is never reused")
	assert.True(t, strings.Contains(err.Error(), "creating disk a"), err.Error())
}
