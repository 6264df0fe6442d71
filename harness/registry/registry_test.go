package registry

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
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

// killedPID starts a process and kills it, as SIGKILL ends a runner; the
// process is reaped, so its pid names nothing (until reused).
func killedPID(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	require.NoError(t, cmd.Start())
	require.NoError(t, cmd.Process.Kill())
	cmd.Wait()
	return cmd.Process.Pid
}

// newWorkDir makes a work dir as the runner does, with a file in it.
func newWorkDir(t *testing.T, r *Registry) string {
	t.Helper()
	dir, err := r.NewWorkDir()
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "overlay.qcow2"), []byte("x"), 0o600))
	return dir
}

func TestLiveWhileRunnerOrQEMURuns(t *testing.T) {
	live := livePID(t)
	dead := deadPID(t)
	kept := time.Now().Add(time.Hour)
	tests := []struct {
		name  string
		entry Entry
		want  bool
	}{
		{"booting: runner alive, QEMU not started", Entry{RunnerPID: live}, true},
		{"running: runner and QEMU alive", Entry{RunnerPID: live, QEMUPID: live}, true},
		{"cleaning up: runner alive, QEMU exited", Entry{RunnerPID: live, QEMUPID: dead}, true},
		{"QEMU outlived its runner", Entry{RunnerPID: dead, QEMUPID: live}, true},
		{"kept: keeper and QEMU alive", Entry{RunnerPID: live, QEMUPID: live, KeptUntil: kept}, true},
		{"kept: keeper gone, QEMU alive", Entry{RunnerPID: dead, QEMUPID: live, KeptUntil: kept}, true},
		{"kept: keeper alive, QEMU exited", Entry{RunnerPID: live, QEMUPID: dead, KeptUntil: kept}, true},
		{"kept: keeper and QEMU gone", Entry{RunnerPID: dead, QEMUPID: dead, KeptUntil: kept}, false},
		{"runner killed before QEMU started", Entry{RunnerPID: dead}, false},
		{"runner and QEMU gone", Entry{RunnerPID: dead, QEMUPID: dead}, false},
		{"both pids reused by other processes", Entry{RunnerPID: live, RunnerStartTicks: 1, QEMUPID: live, QEMUStartTicks: 1}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := tt.entry
			recordStartTicks(&e)
			assert.Equal(t, tt.want, e.Live())
		})
	}
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
		wantClean bool // work dir removed
	}{
		{"qemu running, runner dead", Entry{QEMUPID: live, RunnerPID: dead}, true, false},
		{"qemu dead, runner dead", Entry{QEMUPID: dead, RunnerPID: dead}, false, true},
		{"qemu dead, runner alive (cleaning up)", Entry{QEMUPID: dead, RunnerPID: live}, true, false},
		{"qemu not started, runner alive", Entry{RunnerPID: live}, true, false},
		{"qemu not started, runner dead", Entry{RunnerPID: dead}, false, true},
		{"qemu pid reused", Entry{QEMUPID: reused, QEMUStartTicks: 1, RunnerPID: dead}, false, true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := tt.entry
			e.Name = "vm" + string(rune('a'+i))
			e.CID = uint32(FirstCID + i)
			e.WorkDir = newWorkDir(t, r)
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
			if tt.wantClean {
				assert.NoDirExists(t, e.WorkDir)
			} else {
				assert.DirExists(t, e.WorkDir)
			}
		})
	}
}

// A runner killed with SIGKILL takes QEMU with it and leaves its entry and
// work dir; whichever command looks at the registry next removes both.
func TestEveryLookRemovesAKilledRunsLeftovers(t *testing.T) {
	tests := []struct {
		name string
		look func(r *Registry) error
	}{
		{"List (ps)", func(r *Registry) error { _, err := r.List(); return err }},
		{"Lookup (ssh, stop)", func(r *Registry) error {
			_, err := r.Lookup("killed")
			return notFound(err)
		}},
		{"LookupCID (ssh-proxy)", func(r *Registry) error {
			_, err := r.LookupCID(FirstCID)
			return notFound(err)
		}},
		{"Register (run)", func(r *Registry) error { _, err := r.Register(Entry{Name: "next"}); return err }},
		{"ReserveCID (run)", func(r *Registry) error {
			cid, release, err := r.ReserveCID()
			if err == nil {
				release()
				if cid != FirstCID {
					return fmt.Errorf("got CID %d, want the killed run's %d back", cid, FirstCID)
				}
			}
			return err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := openTemp(t)
			runner := exec.Command("sleep", "600")
			require.NoError(t, runner.Start())
			qemu := exec.Command("sleep", "600")
			require.NoError(t, qemu.Start())
			work := newWorkDir(t, r)
			_, err := r.Register(Entry{Name: "killed", CID: FirstCID, RunnerPID: runner.Process.Pid, QEMUPID: qemu.Process.Pid, WorkDir: work})
			require.NoError(t, err)
			for _, p := range []*exec.Cmd{runner, qemu} {
				require.NoError(t, p.Process.Kill())
				p.Wait()
			}
			require.FileExists(t, filepath.Join(r.Dir(), "killed.json"))
			require.DirExists(t, work)

			require.NoError(t, tt.look(r))
			assert.NoFileExists(t, filepath.Join(r.Dir(), "killed.json"))
			assert.NoDirExists(t, work)
		})
	}
}

// notFound turns the expected ErrNotFound of a lookup into nil.
func notFound(err error) error {
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	return fmt.Errorf("want ErrNotFound, got %v", err)
}

// Two runs with one name: while the first run's runner cleans up after its
// QEMU has exited, the name stays taken; once the first run is gone and a
// second has the name, nothing the first run does late touches the second
// run's entry.
func TestLateFirstRunCannotTouchSecondRunsEntry(t *testing.T) {
	tests := []struct {
		name string
		late func(first *Registration, r *Registry) error
	}{
		{"Registration.Remove", func(first *Registration, r *Registry) error { return first.Remove() }},
		{"Registration.Update", func(first *Registration, r *Registry) error {
			err := first.Update(func(e *Entry) { e.JournalPath = "/first/late.journal"; e.QEMUPID = 0 })
			if !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("Update of a replaced entry: want fs.ErrNotExist, got %v", err)
			}
			return nil
		}},
		{"Registry.Remove of the first run's entry (vmharness stop)", func(first *Registration, r *Registry) error {
			return r.Remove(first.Entry())
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := openTemp(t)
			firstRunner := exec.Command("sleep", "600")
			require.NoError(t, firstRunner.Start())
			t.Cleanup(func() { firstRunner.Process.Kill(); firstRunner.Wait() })
			first, err := r.Register(Entry{Name: "same", CID: 3, RunnerPID: firstRunner.Process.Pid, QEMUPID: deadPID(t)})
			require.NoError(t, err)

			// QEMU has exited, the first runner still cleans up.
			_, err = r.Register(Entry{Name: "same", CID: 4})
			require.ErrorIs(t, err, ErrNameTaken, "the name is taken while the first runner lives")

			// The first runner is gone without removing its entry; a
			// second run takes the name.
			require.NoError(t, firstRunner.Process.Kill())
			firstRunner.Wait()
			second, err := r.Register(Entry{Name: "same", CID: 4, JournalPath: "/second/same.journal"})
			require.NoError(t, err)
			assert.NotEqual(t, first.Entry().Token, second.Entry().Token)

			require.NoError(t, tt.late(first, r))
			got, err := r.Lookup("same")
			require.NoError(t, err, "the second run's entry is still there")
			assert.Equal(t, second.Entry().Token, got.Token)
			assert.Equal(t, "/second/same.journal", got.JournalPath)
			assert.Equal(t, os.Getpid(), got.RunnerPID)

			require.NoError(t, second.Remove())
			_, err = r.Lookup("same")
			assert.ErrorIs(t, err, ErrNotFound, "the second run removes its own entry")
		})
	}
}

func TestRemoveWorkDirRefusesWhatNewWorkDirDidNotMake(t *testing.T) {
	r := openTemp(t)
	outside := t.TempDir()
	tests := []struct {
		name    string
		setup   func(t *testing.T) string // returns the entry's WorkDir
		wantErr string
		keep    string // path that must survive
	}{
		{"relative path", func(t *testing.T) string { return "vm-123" }, "not an absolute path", ""},
		{"outside the registry dir", func(t *testing.T) string {
			d := filepath.Join(outside, "vm-1")
			require.NoError(t, os.Mkdir(d, 0o700))
			return d
		}, "not in the registry dir", filepath.Join(outside, "vm-1")},
		{"the registry dir itself", func(t *testing.T) string { return r.Dir() }, "not named like a work dir", r.Dir()},
		{"a registry file", func(t *testing.T) string { return filepath.Join(r.Dir(), "registry.lock") }, "not named like a work dir", ""},
		{"escapes with ..", func(t *testing.T) string {
			d := filepath.Join(outside, "vm-2")
			require.NoError(t, os.Mkdir(d, 0o700))
			rel, err := filepath.Rel(r.Dir(), d)
			require.NoError(t, err)
			return filepath.Join(r.Dir(), "vm-9") + "/../" + rel
		}, "not in the registry dir", filepath.Join(outside, "vm-2")},
		{"nested below a work dir", func(t *testing.T) string {
			d := filepath.Join(newWorkDir(t, r), "vm-3")
			require.NoError(t, os.Mkdir(d, 0o700))
			return d
		}, "not in the registry dir", ""},
		{"symlink named like a work dir", func(t *testing.T) string {
			target := filepath.Join(outside, "target")
			require.NoError(t, os.Mkdir(target, 0o700))
			require.NoError(t, os.WriteFile(filepath.Join(target, "precious"), []byte("x"), 0o600))
			link := filepath.Join(r.Dir(), "vm-4")
			require.NoError(t, os.Symlink(target, link))
			return link
		}, "not a directory", filepath.Join(outside, "target", "precious")},
	}
	if os.Geteuid() == 0 {
		tests = append(tests, struct {
			name    string
			setup   func(t *testing.T) string
			wantErr string
			keep    string
		}{"owned by another user", func(t *testing.T) string {
			d := filepath.Join(r.Dir(), "vm-5")
			require.NoError(t, os.Mkdir(d, 0o700))
			require.NoError(t, os.Chown(d, 65534, 65534))
			return d
		}, "owned by uid 65534", filepath.Join(r.Dir(), "vm-5")})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := tt.setup(t)
			err := r.RemoveWorkDir(Entry{WorkDir: dir})
			require.ErrorContains(t, err, tt.wantErr)
			assert.ErrorContains(t, err, "refusing to remove work dir")
			if tt.keep != "" {
				_, err := os.Stat(tt.keep)
				assert.NoError(t, err, "must survive")
			}

			// Pruning a stale entry with this work dir removes the
			// entry and leaves the path alone.
			_, err = r.Register(Entry{Name: "stale", RunnerPID: deadPID(t), WorkDir: dir})
			require.NoError(t, err)
			_, err = r.List()
			require.NoError(t, err)
			assert.NoFileExists(t, filepath.Join(r.Dir(), "stale.json"))
			if tt.keep != "" {
				_, err := os.Stat(tt.keep)
				assert.NoError(t, err, "must survive")
			}
		})
	}
}

func TestRemoveWorkDir(t *testing.T) {
	r := openTemp(t)
	work := newWorkDir(t, r)
	require.NoError(t, os.Symlink("/", filepath.Join(work, "root-link")), "links inside are removed, not followed")
	require.NoError(t, r.RemoveWorkDir(Entry{WorkDir: work}))
	assert.NoDirExists(t, work)
	require.NoError(t, r.RemoveWorkDir(Entry{WorkDir: work}), "already gone")
	require.NoError(t, r.RemoveWorkDir(Entry{}), "no work dir")
	assert.DirExists(t, "/etc")
}

// A stale entry that names a live VM's work dir (a corrupt or copied entry)
// must not delete it.
func TestPruneKeepsWorkDirOfLiveVM(t *testing.T) {
	r := openTemp(t)
	work := newWorkDir(t, r)
	_, err := r.Register(Entry{Name: "live", RunnerPID: livePID(t), WorkDir: work})
	require.NoError(t, err)
	_, err = r.Register(Entry{Name: "stale", RunnerPID: deadPID(t), WorkDir: work})
	require.NoError(t, err)
	list, err := r.List()
	require.NoError(t, err)
	require.Len(t, list, 1)
	assert.Equal(t, "live", list[0].Name)
	assert.DirExists(t, work)
}

// Open records the registry dir as an absolute path, so work dirs made in
// it are absolute in entries that other processes read.
func TestOpenRelativeDir(t *testing.T) {
	t.Chdir(t.TempDir())
	r, err := Open("run")
	require.NoError(t, err)
	assert.True(t, filepath.IsAbs(r.Dir()), r.Dir())
	work, err := r.NewWorkDir()
	require.NoError(t, err)
	assert.True(t, filepath.IsAbs(work), work)
	st, err := os.Stat(work)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), st.Mode().Perm())
	require.NoError(t, r.RemoveWorkDir(Entry{WorkDir: work}))
	assert.NoDirExists(t, work)
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
	// flock(1) runs sleep as its child: kill both through their group.
	holder.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, holder.Start())
	t.Cleanup(func() { syscall.Kill(-holder.Process.Pid, syscall.SIGKILL); holder.Wait() })
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
