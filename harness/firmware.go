package harness

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
)

// Firmware is what the VM runs before the kernel. Every firmware boots
// the image's kernel and initrd directly (QEMU's -kernel and -initrd).
type Firmware string

const (
	// FirmwareLinux is QEMU's default BIOS (SeaBIOS) loading the kernel.
	FirmwareLinux Firmware = "linux"
	// FirmwareUEFI is OVMF without Secure Boot; the guest boots in UEFI
	// mode (/sys/firmware/efi, EFI variables, a TPM event log).
	FirmwareUEFI Firmware = "uefi"
	// FirmwareUEFISecureBoot is OVMF with Secure Boot enabled and
	// Microsoft's keys enrolled. OVMF does not check the signature of a
	// kernel given with -kernel (see README, "Devices"): the guest runs in
	// Secure Boot mode, but its kernel was not verified by the firmware.
	FirmwareUEFISecureBoot Firmware = "uefi-secure-boot"
)

// ParseFirmware checks a --firmware value; "" is FirmwareLinux.
func ParseFirmware(s string) (Firmware, error) {
	switch f := Firmware(s); f {
	case "":
		return FirmwareLinux, nil
	case FirmwareLinux, FirmwareUEFI, FirmwareUEFISecureBoot:
		return f, nil
	}
	return "", fmt.Errorf("--firmware %q: want %s, %s or %s", s, FirmwareLinux, FirmwareUEFI, FirmwareUEFISecureBoot)
}

// UEFI reports whether f is an OVMF firmware.
func (f Firmware) UEFI() bool { return f == FirmwareUEFI || f == FirmwareUEFISecureBoot }

// DefaultFirmwareDescriptorDirs are where QEMU's firmware descriptors
// (QEMU's docs/interop/firmware.json) are installed, lowest precedence
// first: a file in a later directory replaces one of the same name in an
// earlier one. Debian's ovmf package installs its descriptors in the first.
func DefaultFirmwareDescriptorDirs() []string {
	return []string{"/usr/share/qemu/firmware", "/etc/qemu/firmware"}
}

// uefiFirmware is the OVMF build a VM boots: its read-only code, the
// template of its variable store, and whether it needs SMM (the builds
// that enforce Secure Boot keep the variable store in SMM).
type uefiFirmware struct {
	Descriptor   string
	Code         string
	CodeFormat   string
	VarsTemplate string
	VarsFormat   string
	RequiresSMM  bool
}

// firmwareDescriptor is the part of a QEMU firmware descriptor we read.
type firmwareDescriptor struct {
	InterfaceTypes []string `json:"interface-types"`
	Mapping        struct {
		Device     string `json:"device"`
		Mode       string `json:"mode"`
		Executable struct {
			Filename string `json:"filename"`
			Format   string `json:"format"`
		} `json:"executable"`
		NVRAMTemplate struct {
			Filename string `json:"filename"`
			Format   string `json:"format"`
		} `json:"nvram-template"`
	} `json:"mapping"`
	Targets []struct {
		Architecture string   `json:"architecture"`
		Machines     []string `json:"machines"`
	} `json:"targets"`
	Features []string `json:"features"`
}

// findUEFIFirmware picks the firmware for f from the descriptors in dirs,
// as QEMU's descriptor convention has it: by file name, in order. For
// "uefi" the first x86_64 q35 flash build whose variables do not enroll
// Secure Boot keys, preferring builds without SMM (faster under TCG); for
// "uefi-secure-boot" the first with Secure Boot and enrolled keys.
func findUEFIFirmware(dirs []string, f Firmware) (uefiFirmware, error) {
	files := map[string]string{} // base name -> path, later dirs win
	for _, dir := range dirs {
		entries, err := os.ReadDir(dir)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return uefiFirmware{}, fmt.Errorf("reading firmware descriptors: %w", err)
		}
		for _, e := range entries {
			if strings.HasSuffix(e.Name(), ".json") {
				files[e.Name()] = filepath.Join(dir, e.Name())
			}
		}
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)

	var candidates []uefiFirmware
	for _, n := range names {
		fw, ok, err := readFirmwareDescriptor(files[n], f)
		if err != nil {
			return uefiFirmware{}, err
		}
		if ok {
			candidates = append(candidates, fw)
		}
	}
	if f == FirmwareUEFI {
		// A stable sort keeps the descriptors' own order among equals.
		sort.SliceStable(candidates, func(i, j int) bool { return !candidates[i].RequiresSMM && candidates[j].RequiresSMM })
	}
	if len(candidates) == 0 {
		what := "UEFI firmware for x86_64 q35 without enrolled Secure Boot keys"
		if f == FirmwareUEFISecureBoot {
			what = "UEFI firmware for x86_64 q35 with Secure Boot and enrolled keys"
		}
		return uefiFirmware{}, fmt.Errorf("--firmware %s: no %s is described in %s (QEMU firmware descriptors); install the ovmf package",
			f, what, strings.Join(dirs, " or "))
	}
	return candidates[0], nil
}

// readFirmwareDescriptor reads one descriptor and reports whether it
// describes firmware usable as f. An empty file masks a descriptor of the
// same name in an earlier directory, as the convention says.
func readFirmwareDescriptor(file string, f Firmware) (uefiFirmware, bool, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return uefiFirmware{}, false, fmt.Errorf("reading firmware descriptor: %w", err)
	}
	if len(strings.TrimSpace(string(data))) == 0 {
		return uefiFirmware{}, false, nil
	}
	var d firmwareDescriptor
	if err := json.Unmarshal(data, &d); err != nil {
		// Someone else's broken descriptor must not stop our choice.
		return uefiFirmware{}, false, nil
	}
	m := d.Mapping
	usable := slices.Contains(d.InterfaceTypes, "uefi") && m.Device == "flash" &&
		(m.Mode == "" || m.Mode == "split") &&
		m.Executable.Filename != "" && m.NVRAMTemplate.Filename != "" &&
		flashFormat(m.Executable.Format) != "" && flashFormat(m.NVRAMTemplate.Format) != "" &&
		targetsQ35(d)
	if !usable {
		return uefiFirmware{}, false, nil
	}
	enrolled := slices.Contains(d.Features, "enrolled-keys")
	switch f {
	case FirmwareUEFI:
		if enrolled {
			return uefiFirmware{}, false, nil
		}
	case FirmwareUEFISecureBoot:
		if !enrolled || !slices.Contains(d.Features, "secure-boot") {
			return uefiFirmware{}, false, nil
		}
	}
	fw := uefiFirmware{
		Descriptor:   file,
		Code:         m.Executable.Filename,
		CodeFormat:   flashFormat(m.Executable.Format),
		VarsTemplate: m.NVRAMTemplate.Filename,
		VarsFormat:   flashFormat(m.NVRAMTemplate.Format),
		RequiresSMM:  slices.Contains(d.Features, "requires-smm"),
	}
	for _, p := range []string{fw.Code, fw.VarsTemplate} {
		if _, err := os.Stat(p); err != nil {
			return uefiFirmware{}, false, fmt.Errorf("firmware descriptor %s names %s, which is missing; reinstall the package that owns it (ovmf): %w", file, p, err)
		}
	}
	return fw, true, nil
}

// flashFormat is the QEMU block format of a flash image, "" if unusable.
func flashFormat(f string) string {
	switch f {
	case "", "raw":
		return "raw"
	case "qcow2":
		return "qcow2"
	}
	return ""
}

// targetsQ35 reports whether a descriptor names x86_64 q35 machines.
func targetsQ35(d firmwareDescriptor) bool {
	for _, t := range d.Targets {
		if t.Architecture != "x86_64" {
			continue
		}
		for _, glob := range t.Machines {
			if ok, _ := path.Match(glob, "pc-q35-7.2"); ok {
				return true
			}
		}
	}
	return false
}

// copyVarsTemplate gives the VM its own writable variable store: the
// template is shared by every VM and never written.
func copyVarsTemplate(template, dst string) error {
	in, err := os.Open(template)
	if err != nil {
		return fmt.Errorf("UEFI variable store template: %w", err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("UEFI variable store: %w", err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copying the UEFI variable store template %s: %w", template, err)
	}
	return out.Close()
}

// firmwareQEMUArgs boots fw with its variable store at vars. SMM builds
// need SMM on, the flash's secure mode (so only SMM code writes the
// variables) and S3 off (OVMF's SMM does not support suspend).
func firmwareQEMUArgs(fw uefiFirmware, vars string) []string {
	args := []string{
		"-drive", "if=pflash,unit=0,format=" + fw.CodeFormat + ",readonly=on,file=" + QEMUOptionValue(fw.Code),
		"-drive", "if=pflash,unit=1,format=" + fw.VarsFormat + ",file=" + QEMUOptionValue(vars),
	}
	if fw.RequiresSMM {
		// QEMU merges this -machine into the machine's other options.
		args = append(args,
			"-machine", "smm=on",
			"-global", "driver=cfi.pflash01,property=secure,value=on",
			"-global", "ICH9-LPC.disable_s3=1")
	}
	return args
}
