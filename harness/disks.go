package harness

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/coreos/go-systemd/v22/unit"

	"github.com/vmharness/vmharness/harness/unitfile"
)

// DiskBus is how an extra disk is attached to the VM.
type DiskBus string

const (
	// DiskVirtioBlk is a virtio-blk PCI disk: /dev/vdX in the guest,
	// /dev/disk/by-id/virtio-SERIAL.
	DiskVirtioBlk DiskBus = "virtio-blk"
	// DiskVirtioSCSI is a SCSI disk on one shared virtio-scsi controller:
	// /dev/sdX, /dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_SERIAL.
	DiskVirtioSCSI DiskBus = "virtio-scsi"
)

// Disk is an extra empty disk for the VM (--disk).
type Disk struct {
	Size   int64 // bytes, a multiple of 512
	Serial string
	// Format is "raw" (a sparse file) or "qcow2".
	Format string
	Bus    DiskBus
}

const (
	// MaxDiskSize bounds one extra disk. The files are sparse, but a test
	// that fills its disk fills the host's runtime directory as much.
	MaxDiskSize = 64 << 30
	// MaxDisks bounds how many extra disks one VM gets; virtio-blk disks
	// take a PCI slot each.
	MaxDisks = 16
	// maxDiskSerial is what virtio-blk passes to the guest (its ID field
	// has 20 bytes); longer serials would be cut there.
	maxDiskSerial = 20
	// reservedSerialPrefix marks the harness's own disks (the root disk's
	// "vmharness-root").
	reservedSerialPrefix = "vmharness"
)

// ParseDiskArg parses a --disk argument, SIZE[,serial=S][,format=raw|qcow2]
// [,bus=virtio-blk|virtio-scsi]. index is the disk's place among the
// --disk flags (0-based); the default serial is "disk<index+1>".
func ParseDiskArg(arg string, index int) (Disk, error) {
	fields := strings.Split(arg, ",")
	size, err := ParseDiskSize(fields[0])
	if err != nil {
		return Disk{}, fmt.Errorf("--disk %q: %w", arg, err)
	}
	d := Disk{Size: size, Serial: "disk" + strconv.Itoa(index+1), Format: "raw", Bus: DiskVirtioBlk}
	for _, f := range fields[1:] {
		key, value, _ := strings.Cut(f, "=")
		switch key {
		case "serial":
			d.Serial = value
		case "format":
			d.Format = value
		case "bus":
			d.Bus = DiskBus(value)
		default:
			return Disk{}, fmt.Errorf("--disk %q: unknown option %q (want serial=, format= or bus=)", arg, f)
		}
	}
	if err := d.validate(); err != nil {
		return Disk{}, fmt.Errorf("--disk %q: %w", arg, err)
	}
	return d, nil
}

// diskSizePattern is a disk size: digits, then optionally K, M, G or T,
// optionally followed by "B" or "iB".
var diskSizePattern = regexp.MustCompile(`^([0-9]+)(?:([KMGTkmgt])(?:i?B)?)?$`)

// ParseDiskSize parses a size like 512M or 2G: a whole number of bytes
// with an optional K, M, G or T suffix (powers of 1024; "KiB" etc. too).
func ParseDiskSize(s string) (int64, error) {
	m := diskSizePattern.FindStringSubmatch(s)
	if m == nil {
		return 0, fmt.Errorf("size %q: want a whole number with an optional K, M, G or T suffix (powers of 1024), e.g. 512M", s)
	}
	bits := map[string]uint{"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[strings.ToUpper(m[2])]
	n, err := strconv.ParseInt(m[1], 10, 64)
	if err != nil || n > MaxDiskSize>>bits {
		return 0, fmt.Errorf("size %q is over the limit of %dG for one disk", s, MaxDiskSize>>30)
	}
	if n == 0 {
		return 0, fmt.Errorf("size %q: a disk needs more than 0 bytes", s)
	}
	return n << bits, nil
}

func (d Disk) validate() error {
	if d.Size <= 0 || d.Size > MaxDiskSize {
		return fmt.Errorf("size %d bytes is not between 1 and %d", d.Size, int64(MaxDiskSize))
	}
	if d.Size%512 != 0 {
		return fmt.Errorf("size %d bytes is not a multiple of the 512-byte sector", d.Size)
	}
	if d.Serial == "" || len(d.Serial) > maxDiskSerial {
		return fmt.Errorf("serial %q: want 1 to %d characters", d.Serial, maxDiskSerial)
	}
	for _, r := range d.Serial {
		// Characters udev puts into /dev/disk/by-id names unchanged, and
		// none that QEMU's option syntax would need escaped.
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.'
		if !ok {
			return fmt.Errorf("serial %q: only letters, digits, '-', '_' and '.' are allowed", d.Serial)
		}
	}
	if strings.HasPrefix(strings.ToLower(d.Serial), reservedSerialPrefix) {
		return fmt.Errorf("serial %q: serials starting with %q are the harness's own", d.Serial, reservedSerialPrefix)
	}
	if d.Format != "raw" && d.Format != "qcow2" {
		return fmt.Errorf("format %q: want raw or qcow2", d.Format)
	}
	if d.Bus != DiskVirtioBlk && d.Bus != DiskVirtioSCSI {
		return fmt.Errorf("bus %q: want %s or %s", d.Bus, DiskVirtioBlk, DiskVirtioSCSI)
	}
	return nil
}

// ValidateDisks checks a VM's whole set of extra disks.
func ValidateDisks(disks []Disk) error {
	if len(disks) > MaxDisks {
		return fmt.Errorf("%d extra disks; at most %d are supported", len(disks), MaxDisks)
	}
	seen := map[string]bool{}
	for _, d := range disks {
		if err := d.validate(); err != nil {
			return fmt.Errorf("disk %s: %w", d.Serial, err)
		}
		if seen[d.Serial] {
			return fmt.Errorf("two disks have the serial %q; /dev/disk/by-id could name only one", d.Serial)
		}
		seen[d.Serial] = true
	}
	return nil
}

// diskFile is an extra disk's image in the work directory.
type diskFile struct {
	Disk
	Path string
}

// createDisks makes the disks' empty images in dir: sparse raw files, or
// qcow2 files that grow as the guest writes. They are removed with dir.
func createDisks(ctx context.Context, dir string, disks []Disk) ([]diskFile, error) {
	var files []diskFile
	for i, d := range disks {
		path := filepath.Join(dir, fmt.Sprintf("disk%d.%s", i+1, d.Format))
		var err error
		if d.Format == "qcow2" {
			err = createQcow2(ctx, path, d.Size)
		} else {
			err = createSparse(path, d.Size)
		}
		if err != nil {
			return nil, fmt.Errorf("creating disk %s: %w", d.Serial, err)
		}
		files = append(files, diskFile{Disk: d, Path: path})
	}
	return files, nil
}

func createSparse(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func createQcow2(ctx context.Context, path string, size int64) error {
	out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", path, strconv.FormatInt(size, 10)).CombinedOutput()
	if errors.Is(err, exec.ErrNotFound) {
		return fmt.Errorf("qemu-img not found; install qemu-utils: %w", err)
	}
	if err != nil {
		return fmt.Errorf("qemu-img create: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// scsiController is the QEMU id of the virtio-scsi controller that all
// virtio-scsi disks share.
const scsiController = "vmharness-scsi"

// diskQEMUArgs attaches the disks. Writes are not flushed to the host
// (cache=unsafe): the files die with the run, and a guest that syncs
// often would otherwise wait on the host's disk for nothing.
func diskQEMUArgs(files []diskFile) []string {
	var args []string
	scsi := false
	for i, f := range files {
		id := fmt.Sprintf("disk%d", i+1)
		args = append(args, "-drive", "if=none,id="+id+",file="+QEMUOptionValue(f.Path)+",format="+f.Format+",cache=unsafe,discard=unmap")
		switch f.Bus {
		case DiskVirtioSCSI:
			if !scsi {
				args = append(args, "-device", "virtio-scsi-pci,id="+scsiController)
				scsi = true
			}
			args = append(args, "-device", "scsi-hd,bus="+scsiController+".0,drive="+id+",serial="+f.Serial)
		default:
			args = append(args, "-device", "virtio-blk-pci,drive="+id+",serial="+f.Serial)
		}
	}
	return args
}

// ByIDPath is where udev links the disk in the guest.
func (d Disk) ByIDPath() string {
	if d.Bus == DiskVirtioSCSI {
		// scsi_id's ID_SERIAL for a QEMU scsi-hd: NAA type 0, vendor and
		// model "QEMU QEMU HARDDISK" with spaces made underscores, serial.
		return "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_" + d.Serial
	}
	return "/dev/disk/by-id/virtio-" + d.Serial
}

// disksDropIn orders the test unit after its disks' device units: the
// test's disks are there when it starts. virtio-scsi (a module, loaded by
// udev once the root file system is up) can otherwise appear after a test
// ordered only after basic.target has started. Wants=, not Requires=: a
// disk that never shows up delays the test by the device timeout
// (diskDeviceTimeout) and the test then sees it missing, instead of
// failing a dependency.
func disksDropIn(disks []Disk) []*unit.UnitOption {
	if len(disks) == 0 {
		return nil
	}
	var units []string
	for _, d := range disks {
		units = append(units, pathDeviceUnit(d.ByIDPath()))
	}
	list := strings.Join(units, " ")
	return []*unit.UnitOption{unit.NewUnitOption("Unit", "Wants", list), unit.NewUnitOption("Unit", "After", list)}
}

// diskDeviceTimeout is how long the guest's systemd waits for a disk's
// device unit (DefaultDeviceTimeoutSec= is 90s). Under TCG on a loaded
// host a virtio-scsi disk took longer than 90s from PID 1's start, and the
// test then started without it; the run's own --timeout bounds the wait.
const diskDeviceTimeout = "10min"

// diskDeviceCredentials are drop-ins for the disks' device units that
// give them diskDeviceTimeout.
func diskDeviceCredentials(disks []Disk) []Credential {
	var creds []Credential
	for _, d := range disks {
		creds = append(creds, Credential{
			Name:  "systemd.unit-dropin." + pathDeviceUnit(d.ByIDPath()),
			Value: []byte(unitfile.Serialize([]*unit.UnitOption{unit.NewUnitOption("Unit", "JobRunningTimeoutSec", diskDeviceTimeout)})),
		})
	}
	return creds
}

// pathDeviceUnit is systemd's device unit name for path, as
// `systemd-escape --path --suffix=device` makes it. go-systemd escapes a
// byte below 0x10 with one hex digit ("\x9" where systemd writes "\x09"),
// which a by-id path cannot hold: a serial is letters, digits, '-', '_'
// and '.' (Disk.validate).
func pathDeviceUnit(path string) string {
	return unit.UnitNamePathEscape(path) + ".device"
}
