package registry

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// deadPID returns the pid of a process that has exited and been reaped.
func deadPID(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	return cmd.Process.Pid
}

// livePID starts a process that runs until the test ends.
func livePID(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd.Process.Pid
}

func openTemp(t *testing.T) *Registry {
	t.Helper()
	r, err := Open(filepath.Join(t.TempDir(), "run"))
	require.NoError(t, err)
	return r
}

func TestRegisterListRemove(t *testing.T) {
	r := openTemp(t)
	qemu := livePID(t)
	work := filepath.Join(t.TempDir(), "work")
	require.NoError(t, os.Mkdir(work, 0o700))

	reg, err := r.Register(Entry{Name: "TEST-01-BASIC", CID: 3, Transport: TransportUser, HybridSocket: "/x/vsock.sock", WorkDir: work})
	require.NoError(t, err)
	assert.Equal(t, os.Getpid(), reg.Entry().RunnerPID)
	assert.NotZero(t, reg.Entry().RunnerStartTicks)

	require.NoError(t, reg.Update(func(e *Entry) { e.QEMUPID = qemu; e.Name = "renamed" }))
	assert.NotZero(t, reg.Entry().QEMUStartTicks)

	list, err := r.List()
	require.NoError(t, err)
	require.Len(t, list, 1)
	got := list[0]
	assert.Equal(t, "TEST-01-BASIC", got.Name)
	assert.Equal(t, qemu, got.QEMUPID)
	assert.Equal(t, uint32(3), got.CID)
	assert.Equal(t, "/x/vsock.sock", got.HybridSocket)
	assert.False(t, got.Kept())

	byCID, err := r.LookupCID(3)
	require.NoError(t, err)
	assert.Equal(t, "TEST-01-BASIC", byCID.Name)
	_, err = r.LookupCID(4)
	assert.ErrorIs(t, err, ErrNotFound)
	byName, err := r.Lookup("TEST-01-BASIC")
	require.NoError(t, err)
	assert.Equal(t, uint32(3), byName.CID)

	_, err = r.Register(Entry{Name: "TEST-01-BASIC", CID: 4})
	assert.ErrorIs(t, err, ErrNameTaken)

	require.NoError(t, reg.Remove())
	require.NoError(t, reg.Remove(), "second remove")
	list, err = r.List()
	require.NoError(t, err)
	assert.Empty(t, list)
	assert.DirExists(t, work, "Remove leaves the work dir to its owner")

	err = reg.Update(func(e *Entry) {})
	assert.True(t, errors.Is(err, os.ErrNotExist), "update after remove: %v", err)
}

func TestListPrunesStaleEntries(t *testing.T) {
	r := openTemp(t)
	live := livePID(t)
	dead := deadPID(t)
	// A stale entry's pid may already belong to a new process: ours.
	reused := os.Getpid()

	tests := []struct {
		name      string
		entry     Entry
		wantLive  bool
		wantclean bool // work dir removed
	}{
		{"qemu running", Entry{QEMUPID: live, RunnerPID: dead}, true, false},
		{"qemu dead, runner dead", Entry{QEMUPID: dead, RunnerPID: dead}, false, true},
		{"qemu dead, runner alive", Entry{QEMUPID: dead, RunnerPID: live}, false, false},
		{"qemu not started, runner alive", Entry{RunnerPID: live}, true, false},
		{"qemu not started, runner dead", Entry{RunnerPID: dead}, false, true},
		{"qemu pid reused", Entry{QEMUPID: reused, QEMUStartTicks: 1, RunnerPID: dead}, false, true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := tt.entry
			e.Name = "vm" + string(rune('a'+i))
			e.CID = uint32(FirstCID + i)
			e.WorkDir = filepath.Join(t.TempDir(), "work")
			require.NoError(t, os.Mkdir(e.WorkDir, 0o700))
			_, err := r.Register(e)
			require.NoError(t, err)

			_, err = r.Lookup(e.Name)
			if tt.wantLive {
				require.NoError(t, err)
			} else {
				require.ErrorIs(t, err, ErrNotFound)
				assert.NoFileExists(t, filepath.Join(r.Dir(), e.Name+".json"))
				// A stale name can be registered again.
				_, err := r.Register(Entry{Name: e.Name, RunnerPID: live})
				require.NoError(t, err)
			}
			if tt.wantclean {
				assert.NoDirExists(t, e.WorkDir)
			} else {
				assert.DirExists(t, e.WorkDir)
			}
		})
	}
}

// An entry without recorded start times cannot prove its pids are still the
// VM's processes, so it is never trusted, even if the pid is alive.
func TestHandWrittenEntryIsStale(t *testing.T) {
	r := openTemp(t)
	entry := fmt.Sprintf(`{"name":"manual","cid":9,"qemu_pid":%d,"runner_pid":1}`, os.Getpid())
	require.NoError(t, os.WriteFile(filepath.Join(r.Dir(), "manual.json"), []byte(entry), 0o600))
	_, err := r.Lookup("manual")
	assert.ErrorIs(t, err, ErrNotFound)
	assert.NoFileExists(t, filepath.Join(r.Dir(), "manual.json"))
}

func TestRegisterRejectsBadNames(t *testing.T) {
	r := openTemp(t)
	for _, name := range []string{"", ".hidden", "a/b", "../x", "sp ace", "new\nline", "root@vm"} {
		_, err := r.Register(Entry{Name: name})
		assert.Error(t, err, "name %q", name)
	}
}

func TestSanitizeName(t *testing.T) {
	tests := []struct{ in, want string }{
		{"TEST-01-BASIC", "TEST-01-BASIC"},
		{"foo@bar", "foo_bar"},
		{".hidden", "_hidden"},
		{"a/b c\n", "a_b_c_"},
		{"", "vm"},
		{"ünï", "__n__"},
	}
	r := openTemp(t)
	for _, tt := range tests {
		got := SanitizeName(tt.in)
		assert.Equal(t, tt.want, got, tt.in)
		_, err := r.Register(Entry{Name: got})
		assert.NoError(t, err, "sanitized %q must register", got)
	}
}

func TestReserveCIDUniqueUnderConcurrency(t *testing.T) {
	r := openTemp(t)
	// A kept VM whose runner is gone still owns its CID.
	_, err := r.Register(Entry{Name: "kept", CID: FirstCID, QEMUPID: livePID(t), KeptUntil: time.Now().Add(time.Hour)})
	require.NoError(t, err)

	const n = 32
	cids := make([]uint32, n)
	releases := make([]func(), n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Each goroutine opens the registry itself, as separate
			// processes would.
			ri, err := Open(r.Dir())
			if err != nil {
				errs[i] = err
				return
			}
			cids[i], releases[i], errs[i] = ri.ReserveCID()
		}()
	}
	wg.Wait()
	seen := map[uint32]bool{}
	for i := range n {
		require.NoError(t, errs[i])
		assert.Greater(t, cids[i], uint32(FirstCID), "CID of the kept VM or below")
		assert.False(t, seen[cids[i]], "CID %d handed out twice", cids[i])
		seen[cids[i]] = true
	}

	// Released CIDs are handed out again.
	releases[0]()
	c, release, err := r.ReserveCID()
	require.NoError(t, err)
	defer release()
	assert.Equal(t, cids[0], c)
	for _, rel := range releases[1:] {
		rel()
	}
}

func TestReserveCIDAcrossProcesses(t *testing.T) {
	flock, err := exec.LookPath("flock")
	if err != nil {
		t.Skip("flock(1) not installed")
	}
	r := openTemp(t)
	// Another process holds CID 3.
	holder := exec.Command(flock, filepath.Join(r.Dir(), "cid-3.lock"), "sleep", "600")
	require.NoError(t, holder.Start())
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	require.Eventually(t, func() bool {
		c, release, err := r.ReserveCID()
		if err != nil {
			return false
		}
		release()
		return c == 4
	}, 5*time.Second, 20*time.Millisecond)
}

func TestRuntimeDir(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want string
	}{
		{"explicit", map[string]string{"VMHARNESS_RUNTIME_DIR": "/r", "XDG_RUNTIME_DIR": "/x"}, "/r"},
		{"xdg", map[string]string{"XDG_RUNTIME_DIR": "/x"}, "/x/vmharness"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, RuntimeDir(func(k string) string { return tt.env[k] }))
		})
	}
	fallback := RuntimeDir(func(string) string { return "" })
	assert.Contains(t, fallback, "vmharness")
}

func TestOpenRefusesSharedDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run")
	require.NoError(t, os.Mkdir(dir, 0o777))
	require.NoError(t, os.Chmod(dir, 0o777))
	_, err := Open(dir)
	require.NoError(t, err)
	st, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), st.Mode().Perm(), "Open makes the dir private")

	if os.Geteuid() == 0 {
		other := filepath.Join(t.TempDir(), "other")
		require.NoError(t, os.Mkdir(other, 0o700))
		require.NoError(t, os.Chown(other, 65534, 65534))
		_, err := Open(other)
		assert.ErrorContains(t, err, "owned by uid 65534")
	}
}
