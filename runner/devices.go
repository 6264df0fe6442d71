package runner

import (
	"flag"
	"fmt"

	"github.com/vmharness/vmharness/harness"
)

// deviceOptions are the flags that add devices to the VM (--disk,
// --firmware, --tpm) and variables to the test's environment (--setenv),
// parsed before anything is created so bad input fails with exit 99.
type deviceOptions struct {
	setenv   []string
	disks    []string
	firmware string
	tpm      bool

	// What parse made of them, for harness.Config.
	env            []harness.EnvVar
	parsedDisks    []harness.Disk
	parsedFirmware harness.Firmware
}

func (d *deviceOptions) register(fs *flag.FlagSet) {
	fs.Var((*stringList)(&d.setenv), "setenv", "set NAME=VALUE in the test unit's environment (repeatable); TEST_MATCH_SUBTEST, TEST_SKIP_SUBTESTS, TEST_MATCH_TESTCASE and TEST_RUN_DFUZZER pass through from the runner's environment")
	fs.Var((*stringList)(&d.disks), "disk", "add an empty disk SIZE[,serial=S][,format=raw|qcow2][,bus=virtio-blk|virtio-scsi] (repeatable), e.g. 1G,serial=data")
	fs.StringVar(&d.firmware, "firmware", string(harness.FirmwareLinux), "firmware: linux (QEMU's BIOS), uefi or uefi-secure-boot (OVMF)")
	fs.BoolVar(&d.tpm, "tpm", false, "give the VM a TPM 2.0 (swtpm)")
}

// parse checks the flags; getenv supplies the pass-through variables,
// which --setenv overrides.
func (d *deviceOptions) parse(getenv func(string) string) error {
	var passed []harness.EnvVar
	for _, name := range harness.PassthroughEnvNames() {
		if v := getenv(name); v != "" {
			ev := harness.EnvVar{Name: name, Value: v}
			if err := ev.Validate(); err != nil {
				return fmt.Errorf("$%s (passed on to the test): %w", name, err)
			}
			passed = append(passed, ev)
		}
	}
	var set []harness.EnvVar
	for _, arg := range d.setenv {
		v, err := harness.ParseEnvArg(arg)
		if err != nil {
			return err
		}
		set = append(set, v)
	}
	d.env = harness.MergeEnv(passed, set)
	for i, arg := range d.disks {
		disk, err := harness.ParseDiskArg(arg, i)
		if err != nil {
			return err
		}
		d.parsedDisks = append(d.parsedDisks, disk)
	}
	if err := harness.ValidateDisks(d.parsedDisks); err != nil {
		return fmt.Errorf("--disk: %w", err)
	}
	fw, err := harness.ParseFirmware(d.firmware)
	if err != nil {
		return err
	}
	d.parsedFirmware = fw
	return nil
}
