package harness

import (
	"fmt"
	"time"
)

// Accel is the QEMU accelerator chosen for a VM and why.
type Accel struct {
	// Name is the QEMU accelerator: "kvm" or "tcg".
	Name string
	// Reason says why it was chosen, for the user.
	Reason string
}

// KVM reports whether the accelerator is KVM.
func (a Accel) KVM() bool { return a.Name == "kvm" }

// TimeoutScale is the factor by which the harness stretches its internal
// timeouts (boot, shutdown): software emulation boots several times slower.
func (a Accel) TimeoutScale() time.Duration {
	if a.KVM() {
		return 1
	}
	return 4
}

// String formats the accelerator for log lines.
func (a Accel) String() string {
	return fmt.Sprintf("%s (%s)", a.Name, a.Reason)
}

// kvmEvidence is what DetectAccel looks at, gathered by the platform code
// so the decision itself is testable.
type kvmEvidence struct {
	devKVMErr     error  // error opening /dev/kvm read-write, nil if it opened
	cpuFlags      string // the "flags" line of /proc/cpuinfo
	vendorModules []string
	forced        string // VMHARNESS_ACCEL: "", "kvm" or "tcg"
}

// chooseAccel decides from the evidence. /dev/kvm alone is not enough: a
// host that is itself a guest may offer a paravirtual KVM flavour (kvm_pvm)
// that cannot run ordinary guest kernels, so KVM also needs the CPU's
// hardware virtualisation flag and a vendor module (kvm_intel or kvm_amd).
func chooseAccel(ev kvmEvidence) (Accel, error) {
	switch ev.forced {
	case "tcg":
		return Accel{Name: "tcg", Reason: "forced by VMHARNESS_ACCEL=tcg"}, nil
	case "kvm":
		if ev.devKVMErr != nil {
			return Accel{}, fmt.Errorf("VMHARNESS_ACCEL=kvm but /dev/kvm is not usable: %w", ev.devKVMErr)
		}
		return Accel{Name: "kvm", Reason: "forced by VMHARNESS_ACCEL=kvm"}, nil
	case "", "auto":
	default:
		return Accel{}, fmt.Errorf("VMHARNESS_ACCEL=%q: want auto, kvm or tcg", ev.forced)
	}
	if ev.devKVMErr != nil {
		return Accel{Name: "tcg", Reason: "software emulation: /dev/kvm not usable: " + ev.devKVMErr.Error()}, nil
	}
	hasFlag := containsWord(ev.cpuFlags, "vmx") || containsWord(ev.cpuFlags, "svm")
	if !hasFlag {
		return Accel{Name: "tcg", Reason: "software emulation: /dev/kvm exists but the CPU has no vmx/svm flag (paravirtual KVM cannot run a stock kernel)"}, nil
	}
	if len(ev.vendorModules) == 0 {
		return Accel{Name: "tcg", Reason: "software emulation: /dev/kvm exists but neither kvm_intel nor kvm_amd is loaded"}, nil
	}
	return Accel{Name: "kvm", Reason: "hardware virtualisation via " + ev.vendorModules[0]}, nil
}

func containsWord(s, word string) bool {
	start := -1
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == ' ' || s[i] == '\t' {
			if start >= 0 && s[start:i] == word {
				return true
			}
			start = -1
			continue
		}
		if start < 0 {
			start = i
		}
	}
	return false
}
