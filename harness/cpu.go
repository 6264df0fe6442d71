package harness

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
)

// slowUnderTCG are CPUID flags that make a Linux guest (kernel and glibc)
// copy and clear memory with byte-granular REP MOVSB/STOSB: ERMS, FSRM and
// FSRS. QEMU's TCG (7.2 here; the REP translation was reworked in December
// 2024) ends the translation block after every iteration of a REP string
// instruction, so such a guest moves one byte per dispatch:
// bench/cpumodel.sh measured guest→host vsock 2.7x slower with these flags
// than without (bench/README.md). Without them the guest uses its 8-byte
// and unrolled loops, which TCG runs well.
var slowUnderTCG = []string{"erms", "fsrm", "fsrs"}

// tcgCPUModel returns the -cpu value for software emulation: QEMU's "max"
// model with the flags of slowUnderTCG turned off. cpuHelp is the output
// of `qemu-system-x86_64 -cpu help`; only flags listed there as recognised
// are named, because QEMU rejects a flag it does not know (FSRS is newer
// than QEMU 7.2).
func tcgCPUModel(cpuHelp string) string {
	known := recognisedCPUFlags(cpuHelp)
	model := "max"
	for _, flag := range slowUnderTCG {
		if known[flag] {
			model += "," + flag + "=off"
		}
	}
	return model
}

// recognisedCPUFlags parses the "Recognized CPUID flags:" section of
// `-cpu help`: space-separated names on indented lines up to a blank line.
func recognisedCPUFlags(cpuHelp string) map[string]bool {
	flags := map[string]bool{}
	in := false
	sc := bufio.NewScanner(strings.NewReader(cpuHelp))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "Recognized CPUID flags:"):
			in = true
		case in && strings.TrimSpace(line) == "":
			return flags
		case in:
			for _, f := range strings.Fields(line) {
				flags[f] = true
			}
		}
	}
	return flags
}

// probeTCGCPUModel asks the QEMU binary which CPUID flags it knows and
// returns the -cpu value for software emulation.
func probeTCGCPUModel(ctx context.Context, qemu string) (string, error) {
	out, err := exec.CommandContext(ctx, qemu, "-cpu", "help").Output()
	if err != nil {
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) && len(bytes.TrimSpace(exitErr.Stderr)) > 0 {
			first, _, _ := strings.Cut(strings.TrimSpace(string(exitErr.Stderr)), "\n")
			err = fmt.Errorf("%w: %s", err, first)
		}
		return "", fmt.Errorf("asking %s for its CPU flags (-cpu help): %w", qemu, err)
	}
	return tcgCPUModel(string(out)), nil
}
