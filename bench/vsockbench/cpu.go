package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/vmharness/vmharness/harness"
)

// userHZ is the unit of the utime and stime fields of /proc/PID/stat
// (USER_HZ, 100 on every Linux architecture Go supports for this).
const userHZ = 100

// cpuSample is the CPU time used so far by QEMU (all its threads), by this
// process (the vsock device, the relays, the journal collector) and by this
// process's other children (systemd-journal-remote).
type cpuSample struct {
	at                   time.Time
	qemu, self, children time.Duration
	// qemuWait is how long QEMU's threads were runnable but waiting for
	// a CPU (schedstat run_delay): the machine's other load.
	qemuWait time.Duration
}

// cpuUse is the CPU used between two samples, as a share of one core.
type cpuUse struct {
	qemu, self, children, qemuWait float64
}

func (b cpuSample) to(e cpuSample) cpuUse {
	wall := e.at.Sub(b.at).Seconds()
	if wall <= 0 {
		return cpuUse{}
	}
	share := func(x, y time.Duration) float64 { return (y - x).Seconds() / wall }
	return cpuUse{qemu: share(b.qemu, e.qemu), self: share(b.self, e.self), children: share(b.children, e.children), qemuWait: share(b.qemuWait, e.qemuWait)}
}

func sampleCPU(qemuPID int) cpuSample {
	s := cpuSample{at: time.Now()}
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		s.self = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	if qemuPID > 0 {
		s.qemu, _ = procCPU(qemuPID)
		s.qemuWait = runDelay(qemuPID)
	}
	self := os.Getpid()
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil || pid == qemuPID {
			continue
		}
		if t, ppid := procCPU(pid); ppid == self {
			s.children += t
		}
	}
	return s
}

// procCPU returns a process's user+system time and its parent's pid from
// /proc/PID/stat; zeros if the process is gone.
func procCPU(pid int) (cpu time.Duration, ppid int) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0
	}
	// The command name may contain blanks and parentheses; the fields
	// that follow it start after the last ')'.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, 0
	}
	f := bytes.Fields(data[i+1:])
	// f[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
	if len(f) < 13 {
		return 0, 0
	}
	ppid, _ = strconv.Atoi(string(f[1]))
	utime, _ := strconv.ParseInt(string(f[11]), 10, 64)
	stime, _ := strconv.ParseInt(string(f[12]), 10, 64)
	return time.Duration(utime+stime) * time.Second / userHZ, ppid
}

// runDelay sums how long the process's threads have waited on a run queue.
func runDelay(pid int) time.Duration {
	var total time.Duration
	for _, d := range harness.ThreadRunDelays(pid) {
		total += d
	}
	return total
}
