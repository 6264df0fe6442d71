package harness

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// ThreadRunDelays returns, for each thread of process pid, how long it has
// waited on a run queue for a CPU (the second field of
// /proc/PID/task/TID/schedstat). Threads that vanish while being read are
// left out; a process that is gone yields none.
func ThreadRunDelays(pid int) []time.Duration {
	files, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/schedstat")
	var delays []time.Duration
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if fields := bytes.Fields(data); len(fields) >= 2 {
			if ns, err := strconv.ParseInt(string(fields[1]), 10, 64); err == nil && ns >= 0 {
				delays = append(delays, time.Duration(ns))
			}
		}
	}
	return delays
}

// cpuStarvation is how long QEMU's most-delayed thread has waited for a
// host CPU: time in which the guest could not run, however long it took.
func cpuStarvation(pid int) time.Duration {
	var most time.Duration
	for _, d := range ThreadRunDelays(pid) {
		most = max(most, d)
	}
	return most
}
