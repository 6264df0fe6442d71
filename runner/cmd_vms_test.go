package runner

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/registry"
)

// vmsEnv is a cliEnv with private runtime and state dirs.
type vmsEnv struct {
	env            *cliEnv
	stdout, stderr *bytes.Buffer
	runtime, state string
}

func newVMsEnv(t *testing.T) *vmsEnv {
	t.Helper()
	dir := t.TempDir()
	v := &vmsEnv{
		stdout:  &bytes.Buffer{},
		stderr:  &bytes.Buffer{},
		runtime: filepath.Join(dir, "run"),
		state:   filepath.Join(dir, "state"),
	}
	vars := map[string]string{"VMHARNESS_RUNTIME_DIR": v.runtime, "VMHARNESS_STATE_DIR": v.state}
	v.env = &cliEnv{stdin: strings.NewReader(""), stdout: v.stdout, stderr: v.stderr, getenv: func(k string) string { return vars[k] }}
	return v
}

func (v *vmsEnv) registry(t *testing.T) *registry.Registry {
	t.Helper()
	r, err := registry.Open(v.runtime)
	require.NoError(t, err)
	return r
}

// fakeQEMU starts a process that plays a VM's QEMU until it is signalled.
func fakeQEMU(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd
}

func reapedPID(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	return cmd.Process.Pid
}

func TestPs(t *testing.T) {
	v := newVMsEnv(t)
	reg := v.registry(t)
	qemu := fakeQEMU(t)
	start := time.Now().Add(-90 * time.Second)
	kept := time.Date(2030, 1, 2, 15, 4, 0, 0, time.Local)
	_, err := reg.Register(registry.Entry{Name: "TEST-01", CID: 3, Transport: "user", QEMUPID: qemu.Process.Pid,
		JournalPath: "/b/TEST-01.journal", StartTime: start})
	require.NoError(t, err)
	_, err = reg.Register(registry.Entry{Name: "TEST-02", CID: 4, Transport: "kernel", QEMUPID: qemu.Process.Pid,
		StartTime: start.Add(time.Second), KeptUntil: kept, RunnerPID: reapedPID(t)})
	require.NoError(t, err)
	_, err = reg.Register(registry.Entry{Name: "gone", CID: 5, QEMUPID: reapedPID(t), RunnerPID: reapedPID(t)})
	require.NoError(t, err)

	require.Equal(t, exitPass, cmdPs(context.Background(), v.env, nil), v.stderr.String())
	lines := strings.Split(strings.TrimRight(v.stdout.String(), "\n"), "\n")
	require.Len(t, lines, 3, v.stdout.String())
	assert.Equal(t, []string{"NAME", "CID", "TRANSPORT", "PID", "UPTIME", "STATE", "JOURNAL"}, strings.Fields(lines[0]))
	f := strings.Fields(lines[1])
	require.Len(t, f, 7, lines[1])
	assert.Equal(t, []string{"TEST-01", "3", "user"}, f[:3])
	assert.Equal(t, qemu.Process.Pid, atoi(t, f[3]))
	assert.Equal(t, []string{"running", "/b/TEST-01.journal"}, f[5:])
	assert.Contains(t, lines[2], "kept until 15:04")
	assert.NotContains(t, v.stdout.String(), "gone")

	v.stdout.Reset()
	require.Equal(t, exitPass, cmdPs(context.Background(), v.env, []string{"--json"}))
	var entries []registry.Entry
	require.NoError(t, json.Unmarshal(v.stdout.Bytes(), &entries))
	require.Len(t, entries, 2)
	assert.Equal(t, "TEST-01", entries[0].Name)

	assert.Equal(t, exitHarnessError, cmdPs(context.Background(), v.env, []string{"extra"}))
}

func TestVMState(t *testing.T) {
	qemu := fakeQEMU(t).Process.Pid
	kept := time.Date(2030, 1, 2, 15, 4, 0, 0, time.Local)
	tests := []struct {
		name  string
		entry registry.Entry
		want  string
	}{
		{"QEMU not started yet", registry.Entry{}, "starting"},
		{"QEMU runs", registry.Entry{QEMUPID: qemu}, "running"},
		{"QEMU exited, runner cleans up", registry.Entry{QEMUPID: reapedPID(t)}, "stopping"},
		{"kept", registry.Entry{QEMUPID: qemu, KeptUntil: kept}, "kept until 15:04"},
		{"kept VM's QEMU exited", registry.Entry{QEMUPID: reapedPID(t), KeptUntil: kept}, "stopping"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Registered by this test process, the entry's live runner.
			reg := newVMsEnv(t).registry(t)
			e := tt.entry
			e.Name = fmt.Sprintf("vm%d", i)
			g, err := reg.Register(e)
			require.NoError(t, err)
			assert.Equal(t, tt.want, vmState(g.Entry()))
		})
	}
}

// A runner killed with SIGKILL (QEMU dies with it) leaves its entry and
// work dir; the next `vmharness ps` lists no VM and removes both.
func TestPsRemovesKilledRunsLeftovers(t *testing.T) {
	v := newVMsEnv(t)
	reg := v.registry(t)
	runner, qemu := fakeQEMU(t), fakeQEMU(t)
	work, err := reg.NewWorkDir()
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(work, "overlay.qcow2"), []byte("x"), 0o600))
	_, err = reg.Register(registry.Entry{Name: "killed", CID: 3, RunnerPID: runner.Process.Pid, QEMUPID: qemu.Process.Pid, WorkDir: work})
	require.NoError(t, err)
	for _, p := range []*exec.Cmd{runner, qemu} {
		require.NoError(t, p.Process.Kill())
		p.Wait()
	}

	require.Equal(t, exitPass, cmdPs(context.Background(), v.env, nil), v.stderr.String())
	assert.Equal(t, "NAME CID TRANSPORT PID UPTIME STATE JOURNAL", strings.Join(strings.Fields(v.stdout.String()), " "))
	assert.NoDirExists(t, work)
	assert.NoFileExists(t, filepath.Join(v.runtime, "killed.json"))
}

// A VM whose QEMU has exited while its runner still cleans up: stop leaves
// the entry and work dir to the runner.
func TestStopVMWhoseRunnerCleansUp(t *testing.T) {
	v := newVMsEnv(t)
	reg := v.registry(t)
	work, err := reg.NewWorkDir()
	require.NoError(t, err)
	// This test process is the runner; QEMU is gone.
	_, err = reg.Register(registry.Entry{Name: "stopping", CID: 3, QEMUPID: reapedPID(t), WorkDir: work})
	require.NoError(t, err)

	require.Equal(t, exitPass, cmdStop(context.Background(), v.env, []string{"stopping"}), v.stderr.String())
	assert.Contains(t, v.stdout.String(), "cleans up the rest")
	assert.DirExists(t, work)
	_, err = reg.Lookup("stopping")
	assert.NoError(t, err)
}

func atoi(t *testing.T, s string) int {
	n, err := strconv.Atoi(s)
	require.NoError(t, err, s)
	return n
}

func TestStopKeptVMCleansUp(t *testing.T) {
	v := newVMsEnv(t)
	reg := v.registry(t)
	qemu := fakeQEMU(t)
	work, err := reg.NewWorkDir()
	require.NoError(t, err)
	require.NoError(t, os.MkdirAll(filepath.Join(work, "sockets"), 0o700))
	_, err = reg.Register(registry.Entry{Name: "TEST-03", CID: 3, QEMUPID: qemu.Process.Pid,
		RunnerPID: reapedPID(t), WorkDir: work, KeptUntil: time.Now().Add(time.Hour)})
	require.NoError(t, err)

	start := time.Now()
	require.Equal(t, exitPass, cmdStop(context.Background(), v.env, []string{"TEST-03"}), v.stderr.String())
	assert.Less(t, time.Since(start), 5*time.Second, "sleep dies on SIGTERM, no SIGKILL wait")
	out := v.stdout.String()
	assert.Contains(t, out, "TEST-03: stopped QEMU (pid ")
	assert.Contains(t, out, "terminated")
	assert.Contains(t, out, "TEST-03: removed "+work)
	assert.Contains(t, out, "TEST-03: removed registry entry")
	assert.NoDirExists(t, work)
	_, err = reg.Lookup("TEST-03")
	assert.ErrorIs(t, err, registry.ErrNotFound)
	assert.NoFileExists(t, filepath.Join(v.runtime, "TEST-03.json"))
}

func TestStopOwnedVMLeavesCleanupToRunner(t *testing.T) {
	v := newVMsEnv(t)
	reg := v.registry(t)
	qemu := fakeQEMU(t)
	work := t.TempDir()
	// This test process is the VM's live runner.
	r, err := reg.Register(registry.Entry{Name: "TEST-04", CID: 3, QEMUPID: qemu.Process.Pid, WorkDir: work})
	require.NoError(t, err)

	require.Equal(t, exitPass, cmdStop(context.Background(), v.env, []string{"TEST-04"}), v.stderr.String())
	assert.Contains(t, v.stdout.String(), "cleans up the rest")
	assert.DirExists(t, work)
	assert.False(t, r.Entry().QEMUAlive())
}

func TestStopStartingVMStopsItsRunner(t *testing.T) {
	v := newVMsEnv(t)
	reg := v.registry(t)
	runner := fakeQEMU(t) // plays the runner here
	_, err := reg.Register(registry.Entry{Name: "booting", CID: 3, RunnerPID: runner.Process.Pid})
	require.NoError(t, err)

	require.Equal(t, exitPass, cmdStop(context.Background(), v.env, []string{"booting"}), v.stderr.String())
	assert.Contains(t, v.stdout.String(), "booting: stopped its runner before QEMU started")
	assert.Error(t, runner.Wait(), "runner was signalled")
}

func TestStopUnknownVM(t *testing.T) {
	v := newVMsEnv(t)
	assert.Equal(t, exitFail, cmdStop(context.Background(), v.env, []string{"nope"}))
	assert.Equal(t, "vmharness stop: no running harness VM is called \"nope\" (see vmharness ps)\n", v.stderr.String())
	assert.Equal(t, exitHarnessError, cmdStop(context.Background(), v.env, nil))
}

func TestStopEscalatesToSIGKILL(t *testing.T) {
	v := newVMsEnv(t)
	reg := v.registry(t)
	// A QEMU that ignores SIGTERM.
	qemu := exec.Command("sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done")
	stdout, err := qemu.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, qemu.Start())
	t.Cleanup(func() { qemu.Process.Kill(); qemu.Wait() })
	buf := make([]byte, 6)
	_, err = stdout.Read(buf)
	require.NoError(t, err)
	_, err = reg.Register(registry.Entry{Name: "stubborn", CID: 3, QEMUPID: qemu.Process.Pid, RunnerPID: reapedPID(t)})
	require.NoError(t, err)

	require.Equal(t, exitPass, cmdStop(context.Background(), v.env, []string{"--grace", "300ms", "stubborn"}), v.stderr.String())
	assert.Contains(t, v.stdout.String(), "killed")
}

func TestSSHArgv(t *testing.T) {
	if _, err := exec.LookPath("ssh"); err != nil {
		t.Skip("OpenSSH client not installed")
	}
	v := newVMsEnv(t)
	reg := v.registry(t)
	qemu := fakeQEMU(t)
	_, err := reg.Register(registry.Entry{Name: "TEST-05", CID: 9, QEMUPID: qemu.Process.Pid})
	require.NoError(t, err)
	cfg := filepath.Join(v.state, "ssh_config")

	tests := []struct {
		args    []string
		want    []string
		wantErr string
	}{
		{args: []string{"TEST-05"}, want: []string{"-F", cfg, "machine/TEST-05"}},
		{args: []string{"TEST-05", "--", "systemctl", "-a"}, want: []string{"-F", cfg, "machine/TEST-05", "--", "systemctl", "-a"}},
		{args: []string{"TEST-05", "uname"}, want: []string{"-F", cfg, "machine/TEST-05", "--", "uname"}},
		{args: []string{"9"}, want: []string{"-F", cfg, "vsock/9"}},
		{args: []string{"10"}, wantErr: `no running harness VM is called "10"`},
		{args: []string{"nope"}, wantErr: `no running harness VM is called "nope" (see vmharness ps)`},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			argv, err := sshArgv(v.env, tt.args)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, "ssh", filepath.Base(argv[0]))
			assert.Equal(t, tt.want, argv[1:])
		})
	}
	data, err := os.ReadFile(cfg)
	require.NoError(t, err)
	assert.Contains(t, string(data), "IdentityFile "+filepath.Join(v.state, "id_ed25519"))
}

func TestSSHConfig(t *testing.T) {
	v := newVMsEnv(t)
	require.Equal(t, exitPass, cmdSSHConfig(context.Background(), v.env, nil), v.stderr.String())
	self, err := os.Executable()
	require.NoError(t, err)
	self, err = filepath.EvalSymlinks(self)
	require.NoError(t, err)
	assert.Contains(t, v.stdout.String(), "ProxyCommand "+self+" ssh-proxy %n %p\n")
	assert.Contains(t, v.stdout.String(), "IdentityFile "+filepath.Join(v.state, "id_ed25519")+"\n")
	assert.FileExists(t, filepath.Join(v.state, "id_ed25519"))

	out := filepath.Join(t.TempDir(), "cfg")
	require.Equal(t, exitPass, cmdSSHConfig(context.Background(), v.env, []string{"--output", out}))
	data, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Equal(t, v.stdout.String(), string(data))
}

func TestSSHProxyErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"vsock/17", "22"}, "vmharness ssh-proxy: vsock/17: no running harness VM has CID 17 (see vmharness ps)\n"},
		{[]string{"machine/x"}, "vmharness ssh-proxy: machine/x: no running harness VM is called \"x\" (see vmharness ps)\n"},
		{[]string{"vsock/3", "ssh"}, "vmharness ssh-proxy: vsock/3: port \"ssh\" is not a port number\n"},
		{[]string{"example.com", "22"}, "vmharness ssh-proxy: \"example.com\" is not a vmharness address (want vsock/CID, vsock-mux/PATH, unix/PATH or machine/NAME)\n"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			v := newVMsEnv(t)
			start := time.Now()
			assert.Equal(t, 255, cmdSSHProxy(context.Background(), v.env, tt.args))
			assert.Equal(t, tt.want, v.stderr.String())
			assert.Less(t, time.Since(start), time.Second)
		})
	}
	v := newVMsEnv(t)
	assert.Equal(t, 255, cmdSSHProxy(context.Background(), v.env, nil))
}
