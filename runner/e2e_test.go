package runner

import (
	"bytes"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/registry"
	"github.com/vmharness/vmharness/images"
)

// The end-to-end tests boot real VMs from the real default image (built on
// first use, cached afterwards). They run when VMHARNESS_E2E=1, as in CI.

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func requireE2E(t *testing.T) {
	t.Helper()
	if os.Getenv("VMHARNESS_E2E") != "1" {
		t.Skip("boots a real VM; set VMHARNESS_E2E=1 (scripts/test does)")
	}
}

// vmharnessBinary builds the runner once per test process.
func vmharnessBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "vmharness-e2e-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "vmharness")
		out, err := exec.Command("go", "build", "-o", binPath, "..").CombinedOutput()
		if err != nil {
			buildErr = &buildError{out: string(out), err: err}
		}
	})
	require.NoError(t, buildErr)
	return binPath
}

type buildError struct {
	out string
	err error
}

func (e *buildError) Error() string { return e.err.Error() + ": " + e.out }

// e2eRun is one `vmharness run` process with private runtime and journal dirs.
type e2eRun struct {
	cmd            *exec.Cmd
	stderr         bytes.Buffer
	runtime, jdir  string
	exitCode       int
	elapsed        time.Duration
	start          time.Time
	registryOpened *registry.Registry
}

func startRun(t *testing.T, args ...string) *e2eRun {
	t.Helper()
	bin := vmharnessBinary(t)
	dir := t.TempDir()
	r := &e2eRun{runtime: filepath.Join(dir, "run"), jdir: filepath.Join(dir, "journal")}
	full := append([]string{"run", "--journal-dir", r.jdir}, args...)
	r.cmd = exec.Command(bin, full...)
	r.cmd.Env = append(os.Environ(), "VMHARNESS_RUNTIME_DIR="+r.runtime)
	r.cmd.Stderr = &r.stderr
	r.start = time.Now()
	require.NoError(t, r.cmd.Start())
	t.Cleanup(func() {
		if r.cmd.ProcessState == nil {
			r.cmd.Process.Kill()
			r.cmd.Wait()
		}
	})
	return r
}

func (r *e2eRun) wait(t *testing.T) {
	t.Helper()
	err := r.cmd.Wait()
	r.elapsed = time.Since(r.start)
	r.exitCode = r.cmd.ProcessState.ExitCode()
	if err != nil {
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee)
	}
	t.Logf("vmharness run exited %d after %s:\n%s", r.exitCode, r.elapsed.Round(time.Second), r.stderr.String())
}

// terminate plays Meson's timeout: SIGTERM to the runner, which must exit
// within a minute with 1 and say it was interrupted.
func (r *e2eRun) terminate(t *testing.T) {
	t.Helper()
	require.NoError(t, r.cmd.Process.Signal(syscall.SIGTERM))
	done := make(chan struct{})
	go func() { r.wait(t); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("the runner did not exit within 60s of SIGTERM")
	}
	assert.Equal(t, 1, r.exitCode)
	assert.Contains(t, r.stderr.String(), "interrupted")
}

// waitForQEMU waits until the run named name has registered QEMU's pid
// and returns its registry entry.
func (r *e2eRun) waitForQEMU(t *testing.T, name string) registry.Entry {
	t.Helper()
	reg, err := registry.Open(r.runtime)
	require.NoError(t, err)
	var entry registry.Entry
	require.Eventually(t, func() bool {
		e, err := reg.Lookup(name)
		entry = e
		return err == nil && e.QEMUPID > 0
	}, 10*time.Minute, 200*time.Millisecond, "the VM never started")
	return entry
}

// assertNothingLeft checks that a finished run left no QEMU, no work dir
// (overlay, sockets) and no registry entry.
func (r *e2eRun) assertNothingLeft(t *testing.T, qemuPID int) {
	t.Helper()
	if qemuPID > 0 {
		assert.ErrorIs(t, syscall.Kill(qemuPID, 0), syscall.ESRCH, "QEMU pid %d still exists", qemuPID)
	}
	entries, err := os.ReadDir(r.runtime)
	require.NoError(t, err)
	for _, e := range entries {
		assert.False(t, e.IsDir(), "leftover work dir %s", e.Name())
		assert.NotEqual(t, ".json", filepath.Ext(e.Name()), "leftover registry entry %s", e.Name())
	}
}

func testUnitPath(name string) string { return filepath.Join("..", "tests", name) }

func TestE2EExitCodes(t *testing.T) {
	requireE2E(t)
	tests := []struct {
		name     string
		unit     string
		args     []string
		wantCode int
		wantText string
	}{
		{"pass", "boot.service", nil, 0, "PASS"},
		{"fail", "fail.service", nil, 1, "test exited with status 3"},
		{"skip", "skip.service", nil, 77, "SKIP"},
		{"condition", "condition.service", nil, 77, "SKIP: test skipped: a condition of its unit was not met"},
		{"poweroff", "poweroff.service", nil, 1, "FAIL: VM powered off before the test finished"},
		{"panic", "panic.service", nil, 1, "FAIL: guest kernel panicked"},
		{"hang", "hang.service", []string{"--timeout", "90s"}, 1, "FAIL: test timed out after 1m30s"},
		{"boot timeout", "boot.service", []string{"--boot-timeout", "2s"}, 1, "FAIL: boot timeout: guest did not boot within 2s"},
		// The exit statuses of the success action and of the emergency-exit
		// unit, coming from the test itself, are plain failures.
		{"exit 123", "exit123.service", nil, 1, "FAIL: test exited with status 123 "},
		{"exit 124", "exit124.service", nil, 1, "FAIL: test exited with status 124 "},
		{"sigkill", "sigkill.service", nil, 1, "FAIL: test killed by signal SIGKILL "},
		{"emergency", "isolate-emergency.service", nil, 1, "FAIL: guest fell into emergency mode"},
		{"expect right reason", "fail.service", []string{"--expect-failure", "^test exited with status 3$"}, 0, "failed as expected"},
		{"expect wrong reason", "fail.service", []string{"--expect-failure", "^guest kernel panicked"}, 1, "expected a failure matching"},
		{"expect fail, passed", "boot.service", []string{"--expect-failure", "."}, 1, "but the test did not fail"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Two at a time: each VM spends most of its time in TCG.
			t.Parallel()
			args := tt.args
			if !slices.Contains(args, "--timeout") {
				// A verdict bug must fail this test, not hang CI.
				args = append([]string{"--timeout", "8m"}, args...)
			}
			r := startRun(t, append(args, testUnitPath(tt.unit))...)
			r.wait(t)
			assert.Equal(t, tt.wantCode, r.exitCode)
			assert.Contains(t, r.stderr.String(), tt.wantText)
			r.assertNothingLeft(t, 0)
		})
	}
}

// TestE2ESIGTERM plays Meson's timeout: SIGTERM to the runner while the
// test runs must stop QEMU, report, and leave nothing behind.
func TestE2ESIGTERM(t *testing.T) {
	requireE2E(t)
	r := startRun(t, "--name", "sigterm", testUnitPath("hang.service"))
	qemuPID := r.waitForQEMU(t, "sigterm").QEMUPID
	// Let the guest get somewhere so there is something to collect.
	time.Sleep(5 * time.Second)

	r.terminate(t)
	r.assertNothingLeft(t, qemuPID)
	// What was collected is kept for the failed run.
	_, err := os.Stat(filepath.Join(r.jdir, "sigterm.console.log"))
	assert.NoError(t, err)
}

// TestE2EQEMUKilled kills QEMU from outside while the test runs (what the
// OOM killer or a QEMU crash does): with --no-retry, the runner must call
// it a harness error naming the signal, not a guest panic or a test
// failure, and leave nothing behind. (Without --no-retry it runs the test
// again: TestE2ERetryAfterQEMUKilled.)
func TestE2EQEMUKilled(t *testing.T) {
	requireE2E(t)
	r := startRun(t, "--name", "qemu-killed", "--no-retry", testUnitPath("hang.service"))
	qemuPID := r.waitForQEMU(t, "qemu-killed").QEMUPID
	time.Sleep(5 * time.Second)

	require.NoError(t, syscall.Kill(qemuPID, syscall.SIGKILL))
	r.wait(t)
	assert.Equal(t, 99, r.exitCode)
	assert.Contains(t, r.stderr.String(), "QEMU was killed by signal killed")
	assert.Contains(t, r.stderr.String(), "not retried (--no-retry)")
	assert.NotContains(t, r.stderr.String(), "panicked")
	r.assertNothingLeft(t, qemuPID)
}

// TestE2EJournalFlood checks that nothing is lost at the end: 20,000 lines
// and a marker logged right before the unit fails (and FailureAction powers
// the VM off) are all in the kept journal, and the failure summary shows
// the marker.
func TestE2EJournalFlood(t *testing.T) {
	requireE2E(t)
	r := startRun(t, "--name", "flood", filepath.Join("testdata", "journal-flood.service"))
	r.wait(t)
	require.Equal(t, 1, r.exitCode)
	path := filepath.Join(r.jdir, "flood.journal")
	out, err := exec.Command("journalctl", "--file="+path, "-u", "journal-flood.service", "-o", "cat", "--no-pager").Output()
	require.NoError(t, err)
	lines := 0
	marker := false
	for _, l := range bytes.Split(out, []byte("\n")) {
		if bytes.HasPrefix(l, []byte("flood line ")) {
			lines++
		}
		if string(l) == "VMHARNESS-FINAL-MARKER" {
			marker = true
		}
	}
	assert.Equal(t, 20000, lines, "numbered lines in the journal")
	assert.True(t, marker, "final marker in the journal")
	assert.Contains(t, r.stderr.String(), "VMHARNESS-FINAL-MARKER", "the failure summary shows the unit's last lines")
	assert.Contains(t, r.stderr.String(), "journalctl --file="+path, "the failure summary says how to read the journal")
}

// TestE2EPVHBoot checks that the default image's run starts the
// uncompressed kernel through its PVH entry point (images/vmlinux), the
// boot that skips the decompressor.
func TestE2EPVHBoot(t *testing.T) {
	requireE2E(t)
	r := startRun(t, "--name", "pvh", "--keep-journal", "always", filepath.Join("testdata", "pvh-boot.service"))
	r.wait(t)
	out, err := exec.Command("journalctl", "--file="+filepath.Join(r.jdir, "pvh.journal"), "-u", "pvh-boot.service", "-o", "cat", "--no-pager").Output()
	require.NoError(t, err)
	require.Equal(t, 0, r.exitCode, "the guest's boot protocol: %s", out)
	assert.Contains(t, string(out), "boot protocol 0x020c")
}

// TestE2EBootUnits checks in the guest what the default image trims from
// the boot: every unit its recipe masks is masked, every generator it
// masks links to /dev/null (and the getty generator, the one whose output
// a stock boot of this image has, wrote none), the static device
// nodes written at build time are the ones kmod lists for the running
// kernel, udev's credential loader runs only when there are udev
// credentials, and the kernel got cryptomgr.notests.
func TestE2EBootUnits(t *testing.T) {
	requireE2E(t)
	r, err := images.Default()
	require.NoError(t, err)
	var masked, generators []string
	for link, target := range r.Symlinks {
		switch {
		case target != "/dev/null":
		case strings.HasPrefix(link, "etc/systemd/system/"):
			masked = append(masked, path.Base(link))
		case strings.HasPrefix(link, "etc/systemd/system-generators/"):
			generators = append(generators, path.Base(link))
		}
	}
	require.Contains(t, masked, "kmod-static-nodes.service")
	require.Contains(t, generators, "systemd-getty-generator")
	tests := []struct {
		name, udevLoaded string
		args             []string
	}{
		{"no udev credentials", "no", nil},
		{"a udev rule credential", "yes", []string{"--credential", "udev.rules.99-vmharness-e2e=# nothing"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"--name", "bootunits", "--keep-journal", "always",
				"--setenv", "VMHARNESS_TEST_MASKED=" + strings.Join(masked, " "),
				"--setenv", "VMHARNESS_TEST_MASKED_GENERATORS=" + strings.Join(generators, " "),
				"--setenv", "VMHARNESS_TEST_UDEV_CREDENTIALS=" + tt.udevLoaded}, tt.args...)
			run := startRun(t, append(args, filepath.Join("testdata", "boot-units.service"))...)
			run.wait(t)
			out, err := exec.Command("journalctl", "--file="+filepath.Join(run.jdir, "bootunits.journal"), "-u", "boot-units.service", "-o", "cat", "--no-pager").Output()
			require.NoError(t, err)
			require.Equal(t, 0, run.exitCode, "the guest's checks:\n%s", out)
			assert.Contains(t, string(out), "kmod-static-nodes.service: masked")
			assert.Contains(t, string(out), "systemd-getty-generator: /dev/null")
			assert.Contains(t, string(out), "kernel crypto self-tests off")
			assert.Contains(t, string(out), "udev credentials loader condition: "+tt.udevLoaded)
		})
	}
}

// TestE2EJournalMarkerFallback runs a unit whose device policy keeps its
// ExecStopPost= from /dev/kmsg: its journal marker must still reach the
// host (through systemd-cat), so the runner stops the VM at once instead
// of waiting for the marker in vain.
func TestE2EJournalMarkerFallback(t *testing.T) {
	requireE2E(t)
	r := startRun(t, "--name", "privdev", "--keep-journal", "always", filepath.Join("testdata", "private-devices.service"))
	r.wait(t)
	require.Equal(t, 0, r.exitCode)
	assert.NotContains(t, r.stderr.String(), "journal marker did not arrive")
	out, err := exec.Command("journalctl", "--file="+filepath.Join(r.jdir, "privdev.journal"),
		"SYSLOG_IDENTIFIER=vmharness-journal-marker", "-o", "export", "--no-pager").Output()
	require.NoError(t, err)
	assert.Contains(t, string(out), "\n_TRANSPORT=stdout\n", "the marker came through systemd-cat:\n%s", out)
	assert.NotContains(t, string(out), "\n_TRANSPORT=kernel\n")
}

// TestE2EReboot checks that a guest rebooting inside a test keeps one
// readable journal with both boots, and still reports its result.
func TestE2EReboot(t *testing.T) {
	requireE2E(t)
	r := startRun(t, "--name", "reboot", "--keep-journal", "always", filepath.Join("testdata", "test-reboot.service"))
	r.wait(t)
	require.Equal(t, 0, r.exitCode)
	path := filepath.Join(r.jdir, "reboot.journal")
	out, err := exec.Command("journalctl", "--file="+path, "--list-boots", "--no-pager").Output()
	require.NoError(t, err)
	boots := 0
	for _, l := range bytes.Split(bytes.TrimSpace(out), []byte("\n")) {
		if len(bytes.Fields(l)) > 1 && !bytes.Contains(l, []byte("IDX")) {
			boots++
		}
	}
	assert.Equal(t, 2, boots, "boots in the journal:\n%s", out)
	out, err = exec.Command("journalctl", "--file="+path, "-u", "test-reboot.service", "-o", "cat", "--no-pager").Output()
	require.NoError(t, err)
	assert.Contains(t, string(out), "first boot, rebooting")
	assert.Contains(t, string(out), "second boot")
}

// sshEnv returns the environment for ssh and vmharness commands that must
// see the run's registry.
func (r *e2eRun) env() []string {
	return append(os.Environ(), "VMHARNESS_RUNTIME_DIR="+r.runtime)
}

// waitForSSH retries until sshd in the guest answers (it is socket
// activated and slow to start under TCG).
func waitForSSH(t *testing.T, r *e2eRun, cfg, host string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	for {
		cmd := exec.Command("ssh", "-F", cfg, "-o", "ConnectTimeout=60", host, "true")
		cmd.Env = r.env()
		out, err := cmd.CombinedOutput()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("ssh %s never worked: %v: %s", host, err, out)
		}
		time.Sleep(3 * time.Second)
	}
}

// TestE2ESSH uses the real OpenSSH client through the generated config:
// commands, scp both ways and `vmharness ssh`, while the test runs; then
// ends the test over ssh.
func TestE2ESSH(t *testing.T) {
	requireE2E(t)
	bin := vmharnessBinary(t)
	r := startRun(t, "--name", "sshtest", filepath.Join("testdata", "ssh-wait.service"))
	entry := r.waitForQEMU(t, "sshtest")

	cfg := filepath.Join(t.TempDir(), "ssh_config")
	gen := exec.Command(bin, "ssh-config", "--output", cfg)
	gen.Env = r.env()
	out, err := gen.CombinedOutput()
	require.NoError(t, err, "%s", out)

	host := "vsock/" + strconv.FormatUint(uint64(entry.CID), 10)
	waitForSSH(t, r, cfg, host)

	run := func(args ...string) string {
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Env = r.env()
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%v: %s", args, out)
		return string(out)
	}
	assert.Contains(t, run("ssh", "-F", cfg, host, "cat", "/etc/os-release"), "trixie")
	assert.Equal(t, "active\n", run("ssh", "-F", cfg, host, "systemctl", "is-active", "sshd-vsock.socket"))
	// The guest's own idea of its CID (what it would announce; trixie's
	// systemd 257 has no systemd-ssh-issue yet) is the address that works
	// on the host.
	assert.Contains(t, run("ssh", "-F", cfg, host, "hostnamectl", "--json=short"), `"VSockCID":`+strconv.FormatUint(uint64(entry.CID), 10))

	local := filepath.Join(t.TempDir(), "in.txt")
	require.NoError(t, os.WriteFile(local, []byte("copied in by scp\n"), 0o644))
	// scp reads "vsock/3:..." as a local path; the '%' form is for scp.
	scpHost := "vsock%" + strconv.FormatUint(uint64(entry.CID), 10)
	run("scp", "-F", cfg, local, scpHost+":/root/in.txt")
	assert.Equal(t, "copied in by scp\n", run("ssh", "-F", cfg, host, "cat", "/root/in.txt"))
	back := filepath.Join(t.TempDir(), "hostname")
	run("scp", "-F", cfg, scpHost+":/etc/hostname", back)
	got, err := os.ReadFile(back)
	require.NoError(t, err)
	assert.Equal(t, "vmharness\n", string(got))

	assert.Contains(t, run(bin, "ssh", "sshtest", "--", "cat", "/etc/os-release"), "Debian")
	assert.Contains(t, run(bin, "ps"), "sshtest")

	run(bin, "ssh", "sshtest", "--", "touch", "/run/finish-test")
	r.wait(t)
	assert.Equal(t, 0, r.exitCode)
	r.assertNothingLeft(t, entry.QEMUPID)
}

// TestE2EKeepFailedVM: a failed test's VM stays up after the runner has
// exited with the failure, answers ssh, and `vmharness stop` removes it and
// everything it left.
func TestE2EKeepFailedVM(t *testing.T) {
	requireE2E(t)
	bin := vmharnessBinary(t)
	r := startRun(t, "--name", "kept", "--keep-failed-vm", "10m", testUnitPath("fail.service"))
	r.wait(t)
	require.Equal(t, 1, r.exitCode)
	assert.Contains(t, r.stderr.String(), "test exited with status 3")
	assert.Contains(t, r.stderr.String(), "stop kept")

	reg, err := registry.Open(r.runtime)
	require.NoError(t, err)
	entry, err := reg.Lookup("kept")
	require.NoError(t, err, "the kept VM is registered")
	assert.True(t, entry.Kept())
	t.Cleanup(func() { syscall.Kill(entry.QEMUPID, syscall.SIGKILL); syscall.Kill(entry.RunnerPID, syscall.SIGKILL) })

	cfg := filepath.Join(t.TempDir(), "ssh_config")
	gen := exec.Command(bin, "ssh-config", "--output", cfg)
	gen.Env = r.env()
	out, err := gen.CombinedOutput()
	require.NoError(t, err, "%s", out)
	waitForSSH(t, r, cfg, "machine/kept")

	ssh := exec.Command(bin, "ssh", "kept", "--", "systemctl", "is-failed", "fail.service")
	ssh.Env = r.env()
	out, err = ssh.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Equal(t, "failed\n", string(out), "the failed unit's state is intact")

	stop := exec.Command(bin, "stop", "kept")
	stop.Env = r.env()
	out, err = stop.CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Eventually(t, func() bool {
		return syscall.Kill(entry.RunnerPID, 0) == syscall.ESRCH
	}, time.Minute, 200*time.Millisecond, "the keeper exits after stop")
	r.assertNothingLeft(t, entry.QEMUPID)
}

// TestE2EShell boots a test's VM in shell mode (what `meson test
// --setup=shell -i` does): the test unit is installed but not started, the
// guest reaches multi-user, and the user's shell session (here commands on
// stdin) runs in the VM; the run ends with the shell.
func TestE2EShell(t *testing.T) {
	requireE2E(t)
	bin := vmharnessBinary(t)
	dir := t.TempDir()
	runtime := filepath.Join(dir, "run")
	cmd := exec.Command(bin, "run", "--shell", "--name", "shell", "--journal-dir", filepath.Join(dir, "journal"), testUnitPath("boot.service"))
	cmd.Env = append(os.Environ(), "VMHARNESS_RUNTIME_DIR="+runtime)
	cmd.Stdin = bytes.NewBufferString("systemctl is-system-running --wait\nsystemctl is-active boot.service\necho shell-done\nexit 0\n")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	t.Logf("stdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, 77, ee.ExitCode(), "a test that did not run never passes, whatever the shell's status")
	assert.Contains(t, stderr.String(), "shell mode: the test unit was installed but not run")
	assert.Contains(t, stdout.String(), "running\n", "the guest booted to a running system")
	assert.Contains(t, stdout.String(), "inactive\n", "the test unit was not started")
	assert.Contains(t, stdout.String(), "shell-done\n")
	r := &e2eRun{runtime: runtime}
	r.assertNothingLeft(t, 0)
}

// TestE2EImagePrune runs a test from a private cache holding the current
// image (hard links to the real one) and an older image, and prunes that
// cache with --all while the run is up: the running test's image must
// stay and the old one go; once the run is over, prune removes it too.
// privateImageCache makes a cache directory of its own holding the
// default image (hard links to the real cache's files, or copies), so a
// test may prune it; the caller sets VMHARNESS_CACHE_DIR to cache.
func privateImageCache(t *testing.T) (cache, realDir, current string) {
	t.Helper()
	built, err := exec.Command(vmharnessBinary(t), "image", "build").Output()
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(string(built)), "\n")
	realDir = lines[len(lines)-1]

	cache = t.TempDir()
	current = filepath.Join(cache, "images", filepath.Base(realDir))
	require.NoError(t, os.MkdirAll(current, 0o755))
	entries, err := os.ReadDir(realDir)
	require.NoError(t, err)
	for _, e := range entries {
		src, dst := filepath.Join(realDir, e.Name()), filepath.Join(current, e.Name())
		if os.Link(src, dst) != nil {
			out, err := exec.Command("cp", "--reflink=auto", "--sparse=always", src, dst).CombinedOutput()
			require.NoError(t, err, "%s", out)
		}
	}
	return cache, realDir, current
}

func TestE2EImagePrune(t *testing.T) {
	requireE2E(t)
	bin := vmharnessBinary(t)
	cache, realDir, current := privateImageCache(t)
	old := filepath.Join(cache, "images", "default-0123456789abcdef")
	for _, f := range []string{"vmlinuz", "initrd.img", "rootfs.img"} {
		writeTestFile(t, filepath.Join(old, f), f)
	}
	t.Setenv("VMHARNESS_CACHE_DIR", cache)

	r := startRun(t, "--name", "prune", testUnitPath("hang.service"))
	r.waitForQEMU(t, "prune")

	out, err := exec.Command(bin, "image", "prune", "--all").CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "kept "+current)
	assert.Contains(t, string(out), "in use by a run")
	assert.Contains(t, string(out), "removed "+old)
	assert.DirExists(t, current)
	assert.NoDirExists(t, old)

	require.NoError(t, r.cmd.Process.Signal(syscall.SIGTERM))
	r.wait(t)
	assert.Equal(t, 1, r.exitCode, "a SIGTERM'd test fails")

	out, err = exec.Command(bin, "image", "prune", "--all").CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "removed "+current)
	assert.NoDirExists(t, current)
	_, err = os.Stat(filepath.Join(realDir, "rootfs.img"))
	assert.NoError(t, err, "the real cache is untouched")
}

func writeTestFile(t *testing.T, path, content string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	require.NoError(t, os.WriteFile(path, []byte(content), 0o644))
}

// TestE2ESameName runs two tests with one --name at once, as two Meson
// test setups or a rerun racing a slow cleanup would: each gets its own
// verdict, registry entry and journal.
func TestE2ESameName(t *testing.T) {
	requireE2E(t)
	bin := vmharnessBinary(t)
	dir := t.TempDir()
	runtime, jdir := filepath.Join(dir, "run"), filepath.Join(dir, "journal")
	type run struct {
		unit   string
		cmd    *exec.Cmd
		stderr bytes.Buffer
	}
	runs := []*run{{unit: "boot.service"}, {unit: "fail.service"}}
	for _, r := range runs {
		r.cmd = exec.Command(bin, "run", "--name", "same", "--keep-journal", "always", "--journal-dir", jdir, testUnitPath(r.unit))
		r.cmd.Env = append(os.Environ(), "VMHARNESS_RUNTIME_DIR="+runtime)
		r.cmd.Stderr = &r.stderr
		require.NoError(t, r.cmd.Start())
		t.Cleanup(func() {
			if r.cmd.ProcessState == nil {
				r.cmd.Process.Kill()
				r.cmd.Wait()
			}
		})
	}
	for _, r := range runs {
		r.cmd.Wait()
		t.Logf("%s:\n%s", r.unit, r.stderr.String())
	}
	assert.Equal(t, 0, runs[0].cmd.ProcessState.ExitCode(), "boot.service passes")
	assert.Equal(t, 1, runs[1].cmd.ProcessState.ExitCode(), "fail.service fails")

	// Whichever registered first is "same", the other "same-2"; each
	// journal holds its own unit's run and not the other's.
	nameOf := func(stderr string) string {
		if strings.Contains(stderr, "vmharness: same-2:") {
			return "same-2"
		}
		return "same"
	}
	n0, n1 := nameOf(runs[0].stderr.String()), nameOf(runs[1].stderr.String())
	require.NotEqual(t, n0, n1, "two live runs never share a name")
	for _, c := range []struct{ name, own, other string }{{n0, "boot.service", "fail.service"}, {n1, "fail.service", "boot.service"}} {
		file := filepath.Join(jdir, c.name+".journal")
		own, err := exec.Command("journalctl", "--file="+file, "-u", c.own, "-o", "cat").CombinedOutput()
		require.NoError(t, err, "%s", own)
		assert.NotEmpty(t, strings.TrimSpace(string(own)), "%s holds %s's log", file, c.own)
		other, err := exec.Command("journalctl", "--file="+file, "-u", c.other, "-o", "cat").CombinedOutput()
		require.NoError(t, err, "%s", other)
		assert.Empty(t, strings.TrimSpace(string(other)), "%s holds nothing of %s", file, c.other)
		assert.FileExists(t, filepath.Join(jdir, c.name+".console.log"))
	}
	reg, err := registry.Open(runtime)
	require.NoError(t, err)
	entries, err := reg.List()
	require.NoError(t, err)
	assert.Empty(t, entries, "both runs removed their own entries")
}
