package harness

import (
	"bufio"
	"os"
	"strings"
)

// DetectAccel picks KVM only when it can really run a guest, else TCG.
// getenv supplies VMHARNESS_ACCEL (auto, kvm or tcg).
func DetectAccel(getenv func(string) string) (Accel, error) {
	ev := kvmEvidence{forced: getenv("VMHARNESS_ACCEL")}
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err != nil {
		ev.devKVMErr = err
	} else {
		f.Close()
	}
	ev.cpuFlags = cpuFlags("/proc/cpuinfo")
	for _, m := range []string{"kvm_intel", "kvm_amd"} {
		if _, err := os.Stat("/sys/module/" + m); err == nil {
			ev.vendorModules = append(ev.vendorModules, m)
		}
	}
	return chooseAccel(ev)
}

func cpuFlags(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		key, value, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(key) == "flags" {
			return strings.TrimSpace(value)
		}
	}
	return ""
}
