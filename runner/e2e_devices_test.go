package runner

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The devices' end-to-end tests boot real VMs with --setenv, --disk,
// --firmware and --tpm and check from inside the guest that each is
// there. The guest side is a shell script passed as a credential, so it
// needs no unit-file escaping; it prints "CHECK <what>: ok" or
// "CHECK <what>: FAIL ..." per check and fails the unit if any failed.

// checkUnit writes a test unit that runs script in the guest and returns
// its path.
func checkUnit(t *testing.T, name, script string) (unit, scriptFile string) {
	t.Helper()
	dir := t.TempDir()
	scriptFile = filepath.Join(dir, "checks.sh")
	writeTestFile(t, scriptFile, checkPrelude+script+"\nexit $failed\n")
	unit = filepath.Join(dir, name+".service")
	writeTestFile(t, unit, `[Unit]
Description=vmharness device checks

[Service]
Type=oneshot
ImportCredential=vmharness.checks
ExecStart=/bin/sh ${CREDENTIALS_DIRECTORY}/vmharness.checks
`)
	return unit, scriptFile
}

// checkPrelude defines check NAME COMMAND...: it runs the command and
// records the result.
const checkPrelude = `failed=0
check() {
  what=$1; shift
  if out=$("$@" 2>&1); then echo "CHECK $what: ok"
  else echo "CHECK $what: FAIL: $out"; failed=1; fi
}
`

// startRunWithEnv is startRun with extra variables in the runner's
// environment.
func startRunWithEnv(t *testing.T, env []string, args ...string) *e2eRun {
	t.Helper()
	bin := vmharnessBinary(t)
	dir := t.TempDir()
	r := &e2eRun{runtime: filepath.Join(dir, "run"), jdir: filepath.Join(dir, "journal")}
	r.cmd = exec.Command(bin, append([]string{"run", "--journal-dir", r.jdir, "--keep-journal", "always"}, args...)...)
	r.cmd.Env = append(append(os.Environ(), "VMHARNESS_RUNTIME_DIR="+r.runtime), env...)
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

// checkLines returns the CHECK lines the guest logged.
func (r *e2eRun) checkLines(t *testing.T, name string) []string {
	t.Helper()
	out, err := exec.Command("journalctl", "--file="+filepath.Join(r.jdir, name+".journal"), "-u", name+".service", "-o", "cat", "--no-pager").Output()
	require.NoError(t, err)
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "CHECK ") {
			lines = append(lines, l)
		}
	}
	t.Logf("guest checks:\n%s", strings.Join(lines, "\n"))
	return lines
}

// swtpmProcesses lists the swtpm processes whose state lives under dir
// (swtpm gets its state directory as $TPM_PATH).
func swtpmProcesses(t *testing.T, dir string) []string {
	t.Helper()
	procs, err := filepath.Glob("/proc/[0-9]*")
	require.NoError(t, err)
	var found []string
	for _, p := range procs {
		comm, err := os.ReadFile(filepath.Join(p, "comm"))
		if err != nil || strings.TrimSpace(string(comm)) != "swtpm" {
			continue
		}
		environ, err := os.ReadFile(filepath.Join(p, "environ"))
		if err != nil {
			continue
		}
		for _, kv := range bytes.Split(environ, []byte{0}) {
			if strings.HasPrefix(string(kv), "TPM_PATH="+dir) {
				found = append(found, filepath.Base(p))
			}
		}
	}
	return found
}

// runDeviceChecks boots name with args and the checks, asserts that
// every check ran and passed, and that the run left no swtpm, disk file,
// socket or work directory behind. During the run it looks at the work
// directory from outside: wantFiles are there, and a swtpm runs if tpm.
func runDeviceChecks(t *testing.T, name string, env, args []string, script string, wantChecks []string, wantFiles []string, tpm bool) {
	unit, scriptFile := checkUnit(t, name, script)
	args = append([]string{"--name", name, "--timeout", "10m", "--credential", "vmharness.checks=@" + scriptFile}, args...)
	r := startRunWithEnv(t, env, append(args, unit)...)
	entry := r.waitForQEMU(t, name)
	for _, f := range wantFiles {
		_, err := os.Stat(filepath.Join(entry.WorkDir, f))
		assert.NoError(t, err, "%s in the work directory while the VM runs", f)
	}
	if tpm {
		assert.Len(t, swtpmProcesses(t, r.runtime), 1, "one swtpm for the VM")
	}
	r.wait(t)
	assert.Equal(t, 0, r.exitCode, "the guest's checks pass")
	lines := r.checkLines(t, name)
	for _, c := range wantChecks {
		assert.Contains(t, lines, "CHECK "+c+": ok")
	}
	assert.Empty(t, swtpmProcesses(t, r.runtime), "no swtpm left")
	_, err := os.Stat(entry.WorkDir)
	assert.ErrorIs(t, err, os.ErrNotExist, "the work directory, disks and TPM state included, is gone")
	r.assertNothingLeft(t, entry.QEMUPID)
}

func TestE2EDevices(t *testing.T) {
	requireE2E(t)
	if _, err := exec.LookPath("swtpm"); err != nil {
		t.Fatal("swtpm is not installed; scripts/install-deps installs it")
	}
	const efivar = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
	// efivarfs is a module in Debian's cloud kernel; mount it should
	// nothing have yet.
	const mountEfivars = `findmnt /sys/firmware/efi/efivars >/dev/null || mount -t efivarfs efivarfs /sys/firmware/efi/efivars
secure_boot() { od -An -tu1 -j4 -N1 ` + efivar + ` | tr -d ' '; }
`
	const tpmChecks = `check "tpmrm0" test -c /dev/tpmrm0
check "has-tpm2" systemd-analyze has-tpm2
`
	// systemd counts a TPM as the firmware's only when booted by UEFI, so
	// under QEMU's BIOS has-tpm2 says "partial" with "-firmware".
	const tpmChecksBIOS = `check "tpmrm0" test -c /dev/tpmrm0
check "has-tpm2 but firmware" sh -c 'test "$(systemd-analyze has-tpm2 | grep -E "^[+-](driver|system|subsystem|libraries)$" | tr "\n" " ")" = "+driver +system +subsystem +libraries "'
`
	tests := []struct {
		name       string
		env, args  []string
		script     string
		wantChecks []string
		wantFiles  []string
		tpm        bool
	}{
		{
			// Firmware linux: QEMU's BIOS. Environment from --setenv and
			// passed through from the runner's own; two disks on both
			// buses; a TPM, which the kernel finds through QEMU's ACPI table.
			name: "devlinux",
			env:  []string{"TEST_MATCH_SUBTEST=from-runner-env", "TEST_SKIP_SUBTESTS=overridden"},
			args: []string{
				"--setenv", `VMH_GREETING=hello world 50% "q" \x`,
				"--setenv", "TEST_SKIP_SUBTESTS=from flag",
				"--disk", "64M,serial=alpha",
				"--disk", "1G,serial=beta,format=qcow2,bus=virtio-scsi",
				"--tpm",
			},
			script: `check "env greeting" test "$VMH_GREETING" = 'hello world 50% "q" \x'
check "env passthrough" test "$TEST_MATCH_SUBTEST" = from-runner-env
check "env flag wins" test "$TEST_SKIP_SUBTESTS" = "from flag"
check "disk alpha" test "$(lsblk -bdno SIZE,SERIAL,TRAN /dev/disk/by-id/virtio-alpha | tr -s ' ')" = "67108864 alpha virtio"
check "disk beta" test "$(lsblk -bdno SIZE,SERIAL /dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_beta | tr -s ' ')" = "1073741824 beta"
check "no efi" test ! -e /sys/firmware/efi
lsblk -o NAME,SIZE,SERIAL,TRAN; ls -l /dev/disk/by-id/
` + tpmChecksBIOS,
			wantChecks: []string{"env greeting", "env passthrough", "env flag wins", "disk alpha", "disk beta", "no efi", "tpmrm0", "has-tpm2 but firmware"},
			wantFiles:  []string{"disk1.raw", "disk2.qcow2", "tpm.sock", "tpm"},
			tpm:        true,
		},
		{
			// UEFI without Secure Boot, with a TPM: the firmware measures
			// the boot into it (the event log has entries; securityfs
			// files show size 0, so test -s cannot tell).
			name: "devuefi",
			args: []string{"--firmware", "uefi", "--tpm"},
			script: mountEfivars + `check "efi" test -d /sys/firmware/efi
check "64-bit uefi" test "$(cat /sys/firmware/efi/fw_platform_size)" = 64
check "secure boot off" test "$(secure_boot)" = 0
check "tpm event log" sh -c 'test "$(head -c 64 /sys/kernel/security/tpm0/binary_bios_measurements | wc -c)" = 64'
` + tpmChecks,
			wantChecks: []string{"efi", "64-bit uefi", "secure boot off", "tpm event log", "tpmrm0", "has-tpm2"},
			wantFiles:  []string{"efivars.raw", "tpm.sock"},
			tpm:        true,
		},
		{
			// Secure Boot: the firmware says it is on, and the kernel sees
			// it (and locks itself down, as Debian's kernels do).
			name: "devsecboot",
			args: []string{"--firmware", "uefi-secure-boot"},
			script: mountEfivars + `check "efi" test -d /sys/firmware/efi
check "secure boot on" test "$(secure_boot)" = 1
check "kernel saw secure boot" sh -c 'dmesg | grep -q "secureboot: Secure boot enabled"'
cat /sys/kernel/security/lockdown
`,
			wantChecks: []string{"efi", "secure boot on", "kernel saw secure boot"},
			wantFiles:  []string{"efivars.raw"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			runDeviceChecks(t, tt.name, tt.env, tt.args, tt.script, tt.wantChecks, tt.wantFiles, tt.tpm)
		})
	}
}

// TestE2EDeviceBadInput checks that bad device flags are refused with exit
// 99 and one line, before any VM is started.
func TestE2EDeviceBadInput(t *testing.T) {
	requireE2E(t)
	// A PATH without swtpm (the runner looks for nothing else first).
	noSWTPM := t.TempDir()
	tests := []struct {
		args []string
		want string
		env  []string
	}{
		{[]string{"--firmware", "bios"}, `--firmware "bios": want linux, uefi or uefi-secure-boot`, nil},
		{[]string{"--disk", "0"}, "a disk needs more than 0 bytes", nil},
		{[]string{"--disk", "-1G"}, "want a whole number", nil},
		{[]string{"--disk", "lots"}, "want a whole number", nil},
		{[]string{"--disk", "1T"}, "over the limit of 64G", nil},
		{[]string{"--disk", "1G,serial=a/b"}, "only letters, digits", nil},
		{[]string{"--disk", "1G,serial=x", "--disk", "1G,serial=x"}, `two disks have the serial "x"`, nil},
		{[]string{"--setenv", "1X=2"}, "must not start with a digit", nil},
		{[]string{"--setenv", "NOVALUE"}, "want NAME=VALUE", nil},
		{[]string{"--tpm"}, "--tpm: swtpm not found; install the swtpm package", []string{"PATH=" + noSWTPM}},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			r := startRunWithEnv(t, tt.env, append(tt.args, testUnitPath("boot.service"))...)
			r.wait(t)
			assert.Equal(t, 99, r.exitCode)
			out := strings.TrimSpace(r.stderr.String())
			assert.Contains(t, out, tt.want)
			assert.NotContains(t, out, "\n", "one line")
			_, err := os.Stat(r.runtime)
			assert.ErrorIs(t, err, os.ErrNotExist, "refused before the runtime directory was even made")
		})
	}
}

// TestE2EDevicesSIGTERM plays Meson's timeout on a VM with a TPM and a
// disk: SIGTERM to the runner stops QEMU and swtpm and removes the work
// directory with the disk and the TPM state.
func TestE2EDevicesSIGTERM(t *testing.T) {
	requireE2E(t)
	r := startRun(t, "--name", "devterm", "--tpm", "--disk", "1G", testUnitPath("hang.service"))
	entry := r.waitForQEMU(t, "devterm")
	_, err := os.Stat(filepath.Join(entry.WorkDir, "disk1.raw"))
	require.NoError(t, err)
	require.Len(t, swtpmProcesses(t, r.runtime), 1)
	time.Sleep(5 * time.Second)

	r.terminate(t)
	assert.Empty(t, swtpmProcesses(t, r.runtime), "no swtpm left")
	r.assertNothingLeft(t, entry.QEMUPID)
}
