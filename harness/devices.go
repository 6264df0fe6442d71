package harness

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/vmharness/vmharness/harness/unitfile"
)

// devices is what a Machine adds to its VM beyond the fixed hardware,
// from Config's Disks, Firmware, TPM and Env: the Machine owns it, the
// files it creates live in the work directory, and the TPM process lives
// within Machine.Run.
type devices struct {
	disks    []Disk
	files    []diskFile
	firmware Firmware
	uefi     uefiFirmware
	vars     string // the VM's own UEFI variable store
	tpm      *swtpm
	env      []EnvVar
}

// newDevices validates what cfg asks for and finds the firmware and
// swtpm, so bad input fails before anything is created or started.
func newDevices(cfg Config) (*devices, error) {
	d := &devices{disks: cfg.Disks, env: MergeEnv(cfg.Env)}
	for _, v := range d.env {
		if err := v.Validate(); err != nil {
			return nil, fmt.Errorf("environment: %w", err)
		}
	}
	if err := ValidateDisks(cfg.Disks); err != nil {
		return nil, fmt.Errorf("--disk: %w", err)
	}
	fw, err := ParseFirmware(string(cfg.Firmware))
	if err != nil {
		return nil, err
	}
	d.firmware = fw
	if fw.UEFI() {
		dirs := cfg.FirmwareDescriptorDirs
		if len(dirs) == 0 {
			dirs = DefaultFirmwareDescriptorDirs()
		}
		if d.uefi, err = findUEFIFirmware(dirs, fw); err != nil {
			return nil, err
		}
		d.vars = filepath.Join(cfg.WorkDir, "efivars."+d.uefi.VarsFormat)
	}
	if cfg.TPM {
		if d.tpm, err = newSWTPM(cfg.SWTPM, cfg.WorkDir); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// CheckHostSupport reports a firmware or TPM this host cannot provide (no
// OVMF, no swtpm) with the default locations, so a runner can refuse the
// run before it sets anything up; NewMachine checks again either way.
func CheckHostSupport(f Firmware, tpm bool) error {
	if f.UEFI() {
		if _, err := findUEFIFirmware(DefaultFirmwareDescriptorDirs(), f); err != nil {
			return err
		}
	}
	if tpm {
		if _, err := exec.LookPath("swtpm"); err != nil {
			return fmt.Errorf("--tpm: swtpm not found; install the swtpm package: %w", err)
		}
	}
	return nil
}

// create makes the disk images and the UEFI variable store in workDir.
func (d *devices) create(ctx context.Context, workDir string) error {
	files, err := createDisks(ctx, workDir, d.disks)
	if err != nil {
		return err
	}
	d.files = files
	if d.firmware.UEFI() {
		return copyVarsTemplate(d.uefi.VarsTemplate, d.vars)
	}
	return nil
}

// qemuArgs attaches the firmware, the disks and the TPM.
func (d *devices) qemuArgs() []string {
	var args []string
	if d.firmware.UEFI() {
		args = append(args, firmwareQEMUArgs(d.uefi, d.vars)...)
	}
	args = append(args, diskQEMUArgs(d.files)...)
	if d.tpm != nil {
		args = append(args, d.tpm.qemuArgs()...)
	}
	return args
}

// guestCredentials adds to creds what the guest's systemd needs for
// these settings: the test unit's environment and its wait for its disks
// (in the test unit's drop-in), and the disks' device timeouts.
func (d *devices) guestCredentials(creds []Credential, unit string) []Credential {
	creds = withTestUnitDropIn(creds, unit, unitfile.Serialize(append(environmentDropIn(d.env), disksDropIn(d.disks)...)))
	return append(creds, diskDeviceCredentials(d.disks)...)
}

// startTPM starts the TPM, if any, and returns the function that stops it.
func (d *devices) startTPM() (stop func() error, err error) {
	if d.tpm == nil {
		return func() error { return nil }, nil
	}
	if err := d.tpm.start(); err != nil {
		d.tpm.stop()
		return nil, fmt.Errorf("--tpm: %w", err)
	}
	return d.tpm.stop, nil
}

// describe says what the VM gets, for the runner's boot line.
func (d *devices) describe() string {
	var parts []string
	switch d.firmware {
	case FirmwareUEFI:
		parts = append(parts, fmt.Sprintf("firmware %s (%s)", d.firmware, d.uefi.Code))
	case FirmwareUEFISecureBoot:
		// Measured, see README "Devices": OVMF boots a -kernel image it
		// cannot verify through its legacy loader.
		parts = append(parts, fmt.Sprintf("firmware %s (%s; Secure Boot is on in the guest, but OVMF does not verify a directly booted kernel)", d.firmware, d.uefi.Code))
	}
	for _, f := range d.disks {
		parts = append(parts, fmt.Sprintf("disk %s %s %s %s", f.Serial, formatSize(f.Size), f.Format, f.Bus))
	}
	if d.tpm != nil {
		parts = append(parts, "TPM 2.0 (swtpm)")
	}
	return strings.Join(parts, ", ")
}

// formatSize prints a byte count in the largest binary unit that divides it.
func formatSize(n int64) string {
	for _, u := range []struct {
		suffix string
		shift  uint
	}{{"T", 40}, {"G", 30}, {"M", 20}, {"K", 10}} {
		if n >= 1<<u.shift && n%(1<<u.shift) == 0 {
			return fmt.Sprintf("%d%s", n>>u.shift, u.suffix)
		}
	}
	return fmt.Sprintf("%dB", n)
}

// withTestUnitDropIn appends text to the test unit's drop-in credential
// (the one verdict.GuestSetup writes); a unit has one credential drop-in.
func withTestUnitDropIn(creds []Credential, unit, text string) []Credential {
	if text == "" {
		return creds
	}
	name := "systemd.unit-dropin." + unit
	for i, c := range creds {
		if c.Name == name {
			v := append([]byte(nil), c.Value...)
			creds[i].Value = append(v, text...)
			return creds
		}
	}
	return append(creds, Credential{Name: name, Value: []byte(text)})
}
