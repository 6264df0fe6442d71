// Command breakdown times where a trivial test's wall time goes, phase by
// phase, for one or two vmharness binaries run alternately, and prints the
// medians and, for two binaries, the ratio of each phase.
//
// Guest phases come from the test's journal (monotonic time since the
// guest kernel started): the kernel's start of /init, the real root's PID 1
// starting (the end of the initrd), basic.target, the test unit's start
// and end. Host phases come from the runner's "timings:" line (offsets
// from QEMU's start: the guest's first notify message, the test's result,
// the final EXIT_STATUS, QEMU gone) and from the wall clock around the
// whole run; "host CPU" is the CPU time the run used, QEMU's included.
// "firmware", the time before the guest kernel starts, is derived from
// both: the host's time of the first notify message less the guest's.
//
//	go run ./bench/breakdown -runs 5 -base a8032bf   (see bench/breakdown.sh)
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// phase is one measured interval, named for where it ends.
type phase struct {
	name string
	// what says where the figure comes from.
	what string
}

var phases = []phase{
	{"firmware", "host and guest: QEMU start to the guest kernel's start (QEMU's own start and the firmware), derived: the host's time of the first notify message less PID 1's guest time of sending it (its 'Hostname set' line); the runner's timings have 0.1 s resolution"},
	{"kernel", "guest: kernel start to init (kernel log 'Run /init' or 'Run /sbin/init')"},
	{"initrd", "guest: init to the real root's PID 1 banner (the initrd, if any)"},
	{"basic.target", "guest: PID 1 start to basic.target"},
	{"unit start", "guest: basic.target to the test unit's start"},
	{"unit", "guest: the test unit, start to finish"},
	{"unit stop", "guest: the journal marker to PID 1's line that the test unit finished, the rest of its ExecStopPost= (only with --full-shutdown: the runner otherwise stops the VM first)"},
	{"unit, whole", "guest: the test unit's start to PID 1's line that it finished (only with --full-shutdown)"},
	{"host: first message", "host: QEMU start to the guest's first notify message"},
	{"host: test result", "host: QEMU start to the test's result"},
	{"host: exit status", "host: QEMU start to PID 1's final EXIT_STATUS"},
	{"host: QEMU gone", "host: QEMU start to QEMU's exit"},
	{"run", "host: the whole `vmharness run`, wall clock"},
	{"host CPU", "host: CPU time (user+system) of the run and everything it waited for, QEMU included"},
}

func main() {
	runs := flag.Int("runs", 5, "runs of each binary")
	unit := flag.String("unit", "bench/trivial.service", "test unit to run")
	flag.Parse()
	bins := flag.Args()
	if len(bins) < 1 || len(bins) > 2 {
		fmt.Fprintln(os.Stderr, "usage: breakdown [-runs N] [-unit FILE] NEW_BINARY[::RUN ARGS] [OLD_BINARY[::RUN ARGS]]")
		os.Exit(2)
	}
	work, err := os.MkdirTemp("", "breakdown-")
	if err != nil {
		fatal(err)
	}
	defer os.RemoveAll(work)

	results := make([][]map[string]float64, len(bins))
	for i := 0; i < *runs; i++ {
		// Alternate, so machine noise hits every binary alike.
		for b, bin := range bins {
			r, err := measure(bin, *unit, filepath.Join(work, fmt.Sprintf("b%d-r%d", b, i)))
			if err != nil {
				fatal(fmt.Errorf("%s, run %d: %w", bin, i+1, err))
			}
			results[b] = append(results[b], r)
			fmt.Fprintf(os.Stderr, "run %d, %s: %.1fs, host CPU %.1fs\n", i+1, label(b, len(bins)), r["run"], r["host CPU"])
		}
	}
	printTable(os.Stdout, bins, results, *runs)
}

func label(b, n int) string {
	if n == 1 {
		return "new"
	}
	return []string{"new", "old"}[b]
}

// measure runs unit once with bin and returns each phase's duration in
// seconds (phases it could not see are missing).
//
// bin may carry extra `vmharness run` arguments after "::", separated by
// spaces, to compare one binary with and without an option.
func measure(bin, unit, dir string) (map[string]float64, error) {
	jdir := filepath.Join(dir, "journal")
	bin, extra, _ := strings.Cut(bin, "::")
	args := append([]string{"run", "--name", "breakdown", "--keep-journal", "always", "--journal-dir", jdir}, strings.Fields(extra)...)
	cmd := exec.Command(bin, append(args, unit)...)
	cmd.Env = append(os.Environ(), "VMHARNESS_RUNTIME_DIR="+filepath.Join(dir, "run"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	wall := time.Since(start).Seconds()
	if err != nil {
		return nil, fmt.Errorf("%v:\n%s", err, stderr.String())
	}
	// The runner reaps QEMU, so the runner's rusage holds QEMU's CPU time
	// too: the guest's work, far less disturbed by other load on the
	// machine than the wall clock is (waiting for a CPU costs no CPU
	// time).
	cpu := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	r := map[string]float64{"run": wall, "host CPU": cpu.Seconds()}
	hostPhases(stderr.String(), r)
	if err := guestPhases(filepath.Join(jdir, "breakdown.journal"), unit, r); err != nil {
		return nil, err
	}
	return r, nil
}

var timingsLine = regexp.MustCompile(`timings: (.*)`)

// hostPhases reads the runner's "timings: first message 9.8s, test end
// 21.0s, ..." line.
func hostPhases(stderr string, r map[string]float64) {
	m := timingsLine.FindStringSubmatch(stderr)
	if m == nil {
		return
	}
	names := map[string]string{"first message": "host: first message", "test end": "host: test result",
		"exit status": "host: exit status", "QEMU gone": "host: QEMU gone"}
	for _, part := range strings.Split(m[1], ", ") {
		i := strings.LastIndexByte(part, ' ')
		if i < 0 {
			continue
		}
		secs, err := strconv.ParseFloat(strings.TrimSuffix(part[i+1:], "s"), 64)
		if name, ok := names[part[:i]]; ok && err == nil {
			r[name] = secs
		}
	}
}

// guestPhases reads the journal's monotonic timestamps of the phase marks.
func guestPhases(journal, unit string, r map[string]float64) error {
	out, err := exec.Command("journalctl", "--file="+journal, "-o", "json", "--no-pager",
		"--output-fields=MESSAGE,_PID,_UID,_TRANSPORT,SYSLOG_IDENTIFIER,_SOURCE_MONOTONIC_TIMESTAMP,__MONOTONIC_TIMESTAMP").Output()
	if err != nil {
		return fmt.Errorf("reading %s: %w", journal, err)
	}
	name := filepath.Base(unit)
	marks := map[string]float64{}
	first := func(key string, t float64) {
		if _, ok := marks[key]; !ok {
			marks[key] = t
		}
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e map[string]any
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			continue
		}
		msg, _ := e["MESSAGE"].(string)
		// Kernel messages reach the journal when journald starts and
		// reads them from /dev/kmsg; their own time is in
		// _SOURCE_MONOTONIC_TIMESTAMP (what journalctl -o
		// short-monotonic shows too).
		mono, _ := e["_SOURCE_MONOTONIC_TIMESTAMP"].(string)
		if mono == "" {
			mono, _ = e["__MONOTONIC_TIMESTAMP"].(string)
		}
		usec, err := strconv.ParseFloat(mono, 64)
		if err != nil {
			continue
		}
		t := usec / 1e6
		switch {
		case e["_TRANSPORT"] == "kernel" && strings.HasPrefix(msg, "Run /") && strings.HasSuffix(msg, " as init process"):
			// "Run /init" (an initrd) or "Run /sbin/init" (none).
			first("init", t)
		case strings.Contains(msg, " running in system mode"):
			// PID 1's banner: logged to the kernel log before journald
			// runs, so it comes in with the kernel's transport.
			first("pid1", t)
		case e["SYSLOG_IDENTIFIER"] == "vmharness-journal-marker" || e["_UID"] == "0" && strings.HasPrefix(msg, "vmharness-journal-marker "):
			// Logged by the test's ExecStopPost= once its main process
			// has exited: the identifier vmharness-journal-marker,
			// written to /dev/kmsg after the journal sync, or, from
			// binaries before that, through systemd-cat before the sync
			// or the shell's echo (message "vmharness-journal-marker
			// <invocation ID>" from root). A runner that stops the VM as
			// soon as it has the marker may never receive PID 1's
			// "Finished" line.
			first("unit end", t)
		case e["SYSLOG_IDENTIFIER"] == "systemd" && strings.HasPrefix(msg, "Hostname set to <"):
			// PID 1 sends its first notify message,
			// X_SYSTEMD_HOSTNAME, right after this line; like the
			// banner it comes in through the kernel log.
			first("hostname", t)
		case e["_PID"] == "1":
			if strings.HasPrefix(msg, "Reached target basic.target") {
				first("basic", t)
			}
			if strings.HasPrefix(msg, "Starting "+name) {
				first("unit start", t)
			}
			if strings.HasPrefix(msg, "Finished "+name) || strings.HasPrefix(msg, name+": Deactivated successfully") {
				first("unit end", t)
				first("unit finished", t)
			}
		}
	}
	need := []string{"init", "pid1", "basic", "unit start", "unit end"}
	for _, k := range need {
		if _, ok := marks[k]; !ok {
			return errors.New("journal " + journal + " lacks the mark " + k)
		}
	}
	if host, ok := r["host: first message"]; ok {
		if t, ok := marks["hostname"]; ok {
			r["firmware"] = host - t
		}
	}
	r["kernel"] = marks["init"]
	r["initrd"] = marks["pid1"] - marks["init"]
	r["basic.target"] = marks["basic"] - marks["pid1"]
	r["unit start"] = marks["unit start"] - marks["basic"]
	r["unit"] = marks["unit end"] - marks["unit start"]
	if t, ok := marks["unit finished"]; ok {
		r["unit stop"] = t - marks["unit end"]
		r["unit, whole"] = t - marks["unit start"]
	}
	return nil
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func printTable(w *os.File, bins []string, results [][]map[string]float64, runs int) {
	fmt.Fprintf(w, "median of %d runs each, %s\n", runs, time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	for b, bin := range bins {
		fmt.Fprintf(w, "  %s: %s\n", label(b, len(bins)), bin)
	}
	header := "| phase | new |"
	sep := "| --- | --- |"
	if len(bins) == 2 {
		header += " old | new/old |"
		sep += " --- | --- |"
	}
	fmt.Fprintln(w, header+" measured")
	fmt.Fprintln(w, sep+" --- |")
	for _, p := range phases {
		row := "| " + p.name + " |"
		var meds []float64
		for b := range bins {
			var xs []float64
			for _, r := range results[b] {
				if v, ok := r[p.name]; ok {
					xs = append(xs, v)
				}
			}
			if len(xs) == 0 {
				row += " - |"
				meds = append(meds, 0)
				continue
			}
			m := median(xs)
			meds = append(meds, m)
			row += fmt.Sprintf(" %.2fs |", m)
		}
		if len(bins) == 2 {
			if meds[0] > 0 && meds[1] > 0 {
				row += fmt.Sprintf(" %.2f |", meds[0]/meds[1])
			} else {
				row += " - |"
			}
		}
		fmt.Fprintln(w, row+" "+p.what+" |")
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "breakdown:", err)
	os.Exit(1)
}
