package harness

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/verdict"
)

func TestSnapshotUnsupported(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"plain run", Config{}, ""},
		{"linux firmware spelled out", Config{Firmware: FirmwareLinux}, ""},
		{"system credential", Config{Credentials: []Credential{{Name: "systemd.extra-unit.x.service"}, {Name: "a"}}}, "--credential a "},
		{"unit credentials", Config{Credentials: []Credential{{Name: "systemd.extra-unit.x.service"}, {Name: "systemd.unit-dropin.y.service"}}}, ""},
		{"kernel arg", Config{KernelArgs: []string{"quiet"}}, "--kernel-arg"},
		{"qemu arg", Config{QEMUArgs: []string{"-s"}}, "--qemu-arg"},
		{"layer", Config{Layer: "l.img"}, "--build-dir"},
		{"shell", Config{SkipTestUnit: true}, "--shell"},
		{"keep", Config{KeepOnFailure: func(Outcome) time.Duration { return 0 }}, "--keep-failed-vm"},
		{"disk", Config{Disks: []Disk{{}}}, "--disk"},
		{"uefi", Config{Firmware: FirmwareUEFI}, "--firmware uefi"},
		{"tpm", Config{TPM: true}, "--tpm"},
		{"env", Config{Env: []EnvVar{{Name: "A"}}}, "--setenv"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := SnapshotUnsupported(tt.cfg)
			if tt.want == "" {
				require.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), "--snapshot does not support "+tt.want)
			assert.NotContains(t, err.Error(), "\n")
		})
	}
}

func TestSnapshotBootImage(t *testing.T) {
	dir := t.TempDir()
	initrd := filepath.Join(dir, "initrd.img")
	require.NoError(t, os.WriteFile(initrd, nil, 0o644))
	nvme := BootImage{Kernel: "k", Rootfs: "r", RootDevice: "/dev/nvme0n1", RootCmdline: "root=/dev/nvme0n1 rw"}

	got, err := SnapshotBootImage(nvme, initrd)
	require.NoError(t, err)
	assert.Equal(t, BootImage{Kernel: "k", Rootfs: "r", Initrd: initrd, RootDevice: "/dev/vda", RootCmdline: "root=/dev/vda rw"}, got)

	virtio := BootImage{Kernel: "k", Rootfs: "r", Initrd: "i", RootDevice: "/dev/vda"}
	got, err = SnapshotBootImage(virtio, initrd)
	require.NoError(t, err)
	assert.Equal(t, virtio, got, "a virtio-blk image boots as it is")

	_, err = SnapshotBootImage(nvme, filepath.Join(dir, "missing"))
	require.ErrorContains(t, err, "QEMU cannot migrate")
}

func TestSnapshotFiles(t *testing.T) {
	unit := TestUnit{Name: "t.service", Text: []byte("[Service]\nExecStart=/bin/true\n")}
	creds := testUnitCredentials(unit, verdict.GuestSetup{Unit: unit.Name, NotifyAddress: "vsock-stream:2:900"})
	files, err := guestFilesFromCredentials(snapshotCredentials(creds, unit.Name))
	require.NoError(t, err)
	var paths []string
	for p := range files {
		paths = append(paths, p)
	}
	// The emergency units are the template's; only the test's own go.
	assert.ElementsMatch(t, []string{
		"/run/systemd/system/t.service",
		"/run/systemd/system/t.service.d/50-vmharness.conf",
		"/run/systemd/system/" + verdict.ConditionCheckUnit,
	}, paths)
	assert.Equal(t, unit.Text, files["/run/systemd/system/t.service"])

	_, err = guestFilesFromCredentials([]Credential{{Name: "ssh.authorized_keys.root"}})
	require.ErrorContains(t, err, "cannot pass credential ssh.authorized_keys.root")
}

func TestTemplateCredentials(t *testing.T) {
	names := map[string]string{}
	for _, c := range templateCredentials() {
		names[c.Name] = string(c.Value)
	}
	assert.Equal(t, "vsock-stream:2:900", names["vmm.notify_socket"])
	assert.Equal(t, "vsock-stream:2:901", names["journal.forward_to_socket"])
	assert.Contains(t, names, "systemd.extra-unit."+verdict.EmergencyExitUnit)
	assert.Contains(t, names, "systemd.extra-unit."+snapshotAgentUnit)
	assert.NotContains(t, names, "systemd.extra-unit."+verdict.ConditionCheckUnit, "the condition check names the test unit")
	assert.Contains(t, names["systemd.extra-unit."+snapshotAgentUnit], "/sys/class/virtio-ports/")
}

func TestSplitTransportArgs(t *testing.T) {
	keep, dev, err := splitTransportArgs([]string{"-chardev", "socket,id=v,path=/x", "-device", "vhost-user-vsock-pci,chardev=v"})
	require.NoError(t, err)
	assert.Equal(t, []string{"-chardev", "socket,id=v,path=/x"}, keep)
	assert.Equal(t, "vhost-user-vsock-pci,chardev=v", dev)

	_, _, err = splitTransportArgs([]string{"-chardev", "x"})
	require.Error(t, err, "no device to hot-plug")
	_, _, err = splitTransportArgs([]string{"-device", "a", "-device", "b"})
	require.Error(t, err)
}

func TestTemplateArgsFor(t *testing.T) {
	tp := &Template{Dir: "/cache/t,1", args: []string{"-name", phName, "-chardev", "file,id=c,path=" + phConsole,
		"-drive", "file=" + phDisk + ",format=qcow2", "-device", "vmgenid,guid=" + phGenID, "-smbios", "type=11,path=@DIR@/credential-000.smbios"}}
	got := tp.argsFor(runPaths{name: "a,b", console: "/w/c.log", disk: "/w/o.qcow2", agent: "/w/a", qmp: "/w/q"}, "G")
	assert.Equal(t, []string{"-name", "a,b", "-chardev", "file,id=c,path=/w/c.log",
		"-drive", "file=/w/o.qcow2,format=qcow2", "-device", "vmgenid,guid=G", "-smbios", "type=11,path=/cache/t,,1/credential-000.smbios"}, got)
}

// TestAgentScript runs the script a restored guest's agent gets with sh,
// with the guest's paths moved into a temporary directory and its
// commands replaced by ones that record their arguments.
func TestAgentScript(t *testing.T) {
	now := time.Unix(1700000000, 5)
	script := agentScript(map[string][]byte{"/run/systemd/system/t.service": []byte("[Service]\nExecStart=/bin/true\n")}, "t.service", now)
	assert.Contains(t, script, "date -u -s @1700000000.000000005 ")
	assert.True(t, strings.HasSuffix(script, "echo DONE >&0\nexit 0\n"))

	root := t.TempDir()
	bin := filepath.Join(root, "bin")
	require.NoError(t, os.Mkdir(bin, 0o755))
	for _, cmd := range []string{"date", "systemctl", "env"} {
		require.NoError(t, os.WriteFile(filepath.Join(bin, cmd), []byte("#!/bin/sh\necho "+cmd+" \"$@\" >>"+root+"/calls\n"), 0o755))
	}
	s := strings.NewReplacer("/run/", root+"/run/", "/dev/urandom", root+"/urandom", "/usr/bin/env", bin+"/env").Replace(script)
	cmd := exec.Command("/bin/sh")
	cmd.Stdin = strings.NewReader(s)
	cmd.Env = []string{"PATH=" + bin + ":/usr/bin:/bin"}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	unit, err := os.ReadFile(filepath.Join(root, "run/systemd/system/t.service"))
	require.NoError(t, err)
	assert.Equal(t, "[Service]\nExecStart=/bin/true\n", string(unit))
	_, err = os.Stat(filepath.Join(root, strings.TrimPrefix(snapshotAgentDone, "/")))
	require.NoError(t, err, "the agent's done marker")
	seed, err := os.ReadFile(filepath.Join(root, "urandom"))
	require.NoError(t, err)
	assert.Len(t, seed, 64)
	calls, err := os.ReadFile(filepath.Join(root, "calls"))
	require.NoError(t, err)
	assert.Equal(t, "date -u -s @1700000000.000000005\n"+
		"env NOTIFY_SOCKET=vsock-stream:2:900 /usr/bin/systemd-notify READY=1\n"+
		"systemctl start --no-block t.service\n", string(calls))
}

// TestExpectLine: the agent's answer is found among other lines, and an
// endless line from the guest is skipped, not buffered, and cannot end in
// a false match.
func TestExpectLine(t *testing.T) {
	long := strings.Repeat("x", 3*maxAgentLine)
	tests := []struct {
		name    string
		sent    string
		wantErr bool
	}{
		{"the line alone", "READY\n", false},
		{"after other lines, with CRLF", "noise\nmore\r\nREADY\r\n", false},
		{"only a prefix", "READ", true},
		{"a longer line", "NOT READY\n", true},
		{"a too-long line ending in the answer", long + "READY\n", true},
		{"a too-long line, then the answer", long + "\nREADY\n", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host, guest := net.Pipe()
			go func() {
				guest.Write([]byte(tt.sent))
				guest.Close()
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			err := expectLine(ctx, host, "READY")
			if tt.wantErr {
				require.Error(t, err)
			} else {
				require.NoError(t, err)
			}
		})
	}
}
