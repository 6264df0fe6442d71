package admission

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Environment variables that override the defaults.
const (
	// MaxVMsEnv is how many VMs may run at once (a positive integer).
	MaxVMsEnv = "VMHARNESS_MAX_VMS"
	// ReserveEnv is the memory kept free for the host: MiB, or a number
	// with a unit (512M, 2G, 1.5GiB).
	ReserveEnv = "VMHARNESS_MEMORY_RESERVE"
)

// Config is how a host admits VMs.
type Config struct {
	// Dir holds the tickets and the queue's lock (created 0700 if
	// missing): the runtime directory, shared by every runner of the user.
	Dir string
	// MaxVMs is the most VMs that run at once; MaxVMsFromEnv says whether
	// VMHARNESS_MAX_VMS set it (for messages).
	MaxVMs        int
	MaxVMsFromEnv bool
	ReserveMiB    int
	// MemInfo reads the host's memory; nil reads /proc/meminfo.
	MemInfo func() (MemInfo, error)
	// Poll is how often a waiting run looks again; 0 means 200ms.
	Poll time.Duration
}

// MemInfo is the host's memory as /proc/meminfo gives it.
type MemInfo struct{ TotalMiB, AvailableMiB int }

// ConfigFromEnv is the admission of VMs whose runners share runtimeDir
// (harness/registry.RuntimeDir), with the defaults for a host with ncpu
// CPUs and the environment's overrides.
func ConfigFromEnv(getenv func(string) string, runtimeDir string, ncpu int) (Config, error) {
	cfg := Config{
		Dir:        runtimeDir,
		MaxVMs:     DefaultMaxVMs(ncpu),
		ReserveMiB: DefaultReserveMiB,
	}
	if s := getenv(MaxVMsEnv); s != "" {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			return Config{}, fmt.Errorf("%s=%q: want how many VMs may run at once, a whole number of at least 1", MaxVMsEnv, s)
		}
		cfg.MaxVMs, cfg.MaxVMsFromEnv = n, true
	}
	if s := getenv(ReserveEnv); s != "" {
		n, err := ParseMiB(s)
		if err != nil {
			return Config{}, fmt.Errorf("%s=%q: %v", ReserveEnv, s, err)
		}
		cfg.ReserveMiB = n
	}
	return cfg, nil
}

// ParseMiB reads a memory size: a plain number is MiB; K, M, G and T (or
// KiB, MiB, GiB, TiB, in any case) are powers of 1024.
func ParseMiB(s string) (int, error) {
	t := strings.TrimSpace(s)
	unit := strings.TrimLeft(t, "0123456789.")
	num := strings.TrimSpace(t[:len(t)-len(unit)])
	scale := map[string]float64{"": 1, "k": 1.0 / 1024, "kib": 1.0 / 1024, "m": 1, "mib": 1, "g": 1024, "gib": 1024, "t": 1 << 20, "tib": 1 << 20}
	f, ok := scale[strings.ToLower(strings.TrimSpace(unit))]
	v, err := strconv.ParseFloat(num, 64)
	if !ok || err != nil || v < 0 {
		return 0, fmt.Errorf("want a memory size such as 2048 (MiB), 512M or 2G")
	}
	return int(v * f), nil
}
