// Package admission admits test VMs against the host's CPUs and memory, so
// that any number of concurrent runners (meson test -j 8, several CI jobs
// on one machine) start only as many VMs as the host can run at a useful
// speed, and the rest wait their turn instead of slowing every VM down
// until boots time out.
//
// There is no daemon. Every run that wants to start a VM takes a ticket,
// a file admission-NNNNNNNNNNNN.ticket in the runtime directory (next to
// the registry's entries), and holds an exclusive flock on it for as long
// as it waits or its VM runs. A new ticket is numbered one above the
// highest there is, which makes the queue first come, first served. A
// waiting run polls: under the queue's lock (admission.lock) it lists the
// tickets, removes those whose owner is gone (their flock is free: a
// runner killed with SIGKILL releases its ticket with its last fd), and
// asks Decide whether it may start. Decide is a pure function of that
// state.
package admission

import (
	"fmt"
	"runtime"
	"strings"
)

// QEMUOverheadMiB is what a VM costs beyond its guest memory: QEMU's own
// memory, mostly TCG's translation cache (measured 150-1200 MB resident
// per QEMU under TCG, depending on how long and how much code the guest
// ran).
const QEMUOverheadMiB = 512

// DefaultReserveMiB is the memory kept free for the host by default
// (VMHARNESS_MEMORY_RESERVE overrides it).
const DefaultReserveMiB = 2048

// DefaultMaxVMs is how many VMs run at once by default on a host with
// ncpu CPUs (VMHARNESS_MAX_VMS overrides it): one per host CPU. Measured
// under TCG on 2 cores with 2-vCPU guests (bench/parallel.sh): more VMs than
// cores only make each boot slower, fewer leave a core idle while a guest
// waits on I/O or timers.
func DefaultMaxVMs(ncpu int) int { return max(1, ncpu) }

// HostCPUs is the number of CPUs this process may run on.
func HostCPUs() int { return runtime.NumCPU() }

// State is what one waiting run knows when it decides.
type State struct {
	// MaxVMs is the limit on VMs running at once (>= 1).
	MaxVMs int
	// Running lists the memory (MiB, QEMU overhead included) of each
	// admitted VM.
	Running []int
	// Ahead is how many live runs took their ticket before this one and
	// are still waiting.
	Ahead int
	// WantMiB is this VM's memory, QEMU overhead included.
	WantMiB int
	// MemTotalMiB and MemAvailableMiB are /proc/meminfo's; ReserveMiB is
	// kept free for the host.
	MemTotalMiB, MemAvailableMiB, ReserveMiB int
}

// Decision is Decide's answer.
type Decision struct {
	Admit bool
	// Why says what, besides the VM count, the run waits for (runs queued
	// ahead, memory), or, for a run admitted although memory looks short,
	// why it was admitted anyway.
	Why string
}

// Decide admits a VM when no run is queued ahead of it, fewer than MaxVMs
// VMs run, the admitted VMs' memory and its own fit in the host's memory
// less the reserve, and the memory available right now (other processes'
// use included) less the reserve holds it. A VM admitted moments ago may
// not show in MemAvailable yet; the first memory rule bounds that.
//
// When nothing runs and nobody is ahead, the VM is always admitted, so a
// VM bigger than the memory rules allow runs alone instead of waiting
// forever.
func Decide(s State) Decision {
	used := 0
	for _, m := range s.Running {
		used += m
	}
	budget := s.MemTotalMiB - s.ReserveMiB
	available := s.MemAvailableMiB - s.ReserveMiB
	var short string
	switch {
	case used+s.WantMiB > budget:
		short = fmt.Sprintf("memory: %d MiB for running VMs + %d MiB for this one > %d MiB total - %d MiB reserve",
			used, s.WantMiB, s.MemTotalMiB, s.ReserveMiB)
	case s.WantMiB > available:
		short = fmt.Sprintf("memory: %d MiB available - %d MiB reserve < %d MiB for this VM",
			s.MemAvailableMiB, s.ReserveMiB, s.WantMiB)
	}
	if len(s.Running) == 0 && s.Ahead == 0 {
		if short != "" {
			return Decision{Admit: true, Why: "admitted with no other VM running although " + short}
		}
		return Decision{Admit: true}
	}
	full := len(s.Running) >= s.MaxVMs
	if s.Ahead == 0 && !full && short == "" {
		return Decision{Admit: true}
	}
	// The count against the limit is always part of the message; Why
	// adds what else holds the VM back.
	var why []string
	if s.Ahead > 0 {
		why = append(why, fmt.Sprintf("%d queued ahead", s.Ahead))
	}
	if short != "" {
		why = append(why, short)
	}
	return Decision{Why: strings.Join(why, "; ")}
}
