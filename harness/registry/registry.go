// Package registry records the harness VMs running on this machine, one JSON
// file per VM in a private per-user runtime directory, so that `vmharness ps`,
// `ssh`, `ssh-proxy` and `stop` can find VMs that other processes started.
//
// The runner that boots a VM owns its entry: it registers it before QEMU
// starts, updates it (QEMU pid, kept-after-failure deadline) and removes it
// when it has cleaned up. A VM's name stays taken as long as its runner or
// its QEMU runs, so a second run cannot take the name while the first is
// still cleaning up; and a registration only ever updates or removes its own
// entry (Entry.Token), never a later run's of the same name.
//
// Readers never trust an entry blindly: an entry whose runner and QEMU are
// both gone, or whose pids now belong to other processes (pid reuse is
// detected through the start time in /proc/PID/stat), is stale. Nobody is
// left to clean up after it (a runner killed with SIGKILL takes QEMU with
// it), so List, Lookup and Register delete stale entries together with
// their work dirs; the only directories they delete are work dirs made by
// NewWorkDir.
//
// The registry also allocates guest CIDs (ReserveCID) so that parallel VMs
// never share one.
package registry

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Transport values of Entry.Transport.
const (
	TransportUser   = "user"   // in-process vhost-user-vsock backend, hybrid socket
	TransportKernel = "kernel" // kernel vhost-vsock, reachable with AF_VSOCK
)

// Entry describes one harness VM.
type Entry struct {
	// Name identifies the VM for ps/ssh/stop; unique among live VMs.
	Name string `json:"name"`
	// CID is the guest's vsock context ID.
	CID uint32 `json:"cid"`
	// Transport is TransportUser or TransportKernel.
	Transport string `json:"transport"`
	// HybridSocket is the Unix socket speaking "CONNECT <port>\n"/"OK <n>\n"
	// to the guest. Both transports have one; ssh-proxy uses it only for
	// the userspace transport and AF_VSOCK for the kernel's.
	HybridSocket string `json:"hybrid_socket,omitempty"`
	// QEMUPID is the QEMU process, 0 until it has started.
	QEMUPID int `json:"qemu_pid"`
	// RunnerPID is the vmharness process that owns the VM.
	RunnerPID int `json:"runner_pid"`
	// JournalPath is where the guest journal is written.
	JournalPath string `json:"journal,omitempty"`
	// ConsoleLog is where the serial console is written.
	ConsoleLog string `json:"console_log,omitempty"`
	// StartTime is when the VM was registered.
	StartTime time.Time `json:"start_time"`
	// KeptUntil is zero unless the VM was kept running after a failed test
	// for inspection; then it is when the VM will be stopped.
	KeptUntil time.Time `json:"kept_until,omitzero"`
	// WorkDir is the per-run directory (overlay, sockets) that whoever stops
	// the VM last removes.
	WorkDir string `json:"work_dir,omitempty"`

	// Start times (clock ticks since boot, /proc/PID/stat field 22) of
	// QEMUPID and RunnerPID, recorded by the registry to detect pid reuse.
	QEMUStartTicks   uint64 `json:"qemu_start_ticks,omitempty"`
	RunnerStartTicks uint64 `json:"runner_start_ticks,omitempty"`

	// Token is random and set by Register. It tells this registration from
	// a later one of the same name, so a run that is late to clean up
	// cannot remove or overwrite the entry of the run that took its name.
	Token string `json:"token,omitempty"`
}

// Kept reports whether the VM was kept running after a failed test.
func (e Entry) Kept() bool { return !e.KeptUntil.IsZero() }

// QEMUAlive reports whether the recorded QEMU process still runs.
func (e Entry) QEMUAlive() bool { return e.QEMUPID > 0 && sameProcess(e.QEMUPID, e.QEMUStartTicks) }

// RunnerAlive reports whether the recorded runner process still runs.
func (e Entry) RunnerAlive() bool {
	return e.RunnerPID > 0 && sameProcess(e.RunnerPID, e.RunnerStartTicks)
}

// Live reports whether the VM's name is taken: its runner runs (before QEMU
// starts, while it serves the VM, while it cleans up after QEMU has exited)
// or its QEMU does (a kept VM, or a QEMU that outlived its runner). An entry
// that is not live is stale.
func (e Entry) Live() bool { return e.RunnerAlive() || e.QEMUAlive() }

// ErrNameTaken is returned by Register when a live VM already has the name.
var ErrNameTaken = errors.New("name is taken by a running harness VM")

// ErrNotFound is returned by the lookups when no live VM matches.
var ErrNotFound = errors.New("no such running harness VM")

// Registry is a directory of VM entries. Its methods are safe for concurrent
// use by goroutines and processes.
type Registry struct {
	dir string
}

// RuntimeDir returns the directory the registry lives in:
// $VMHARNESS_RUNTIME_DIR, else $XDG_RUNTIME_DIR/vmharness, else
// /run/user/<uid>/vmharness if /run/user/<uid> exists, else
// <os.TempDir()>/vmharness-<uid>. getenv is usually os.Getenv.
func RuntimeDir(getenv func(string) string) string {
	if d := getenv("VMHARNESS_RUNTIME_DIR"); d != "" {
		return d
	}
	if d := getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "vmharness")
	}
	uid := os.Geteuid()
	if d := fmt.Sprintf("/run/user/%d", uid); isDir(d) {
		return filepath.Join(d, "vmharness")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("vmharness-%d", uid))
}

// Open opens the registry in dir, creating dir with mode 0700. It refuses a
// directory owned by another user or writable by others, since entries
// direct ssh and stop at sockets and processes.
func Open(dir string) (*Registry, error) {
	// Entries record work dirs by absolute path, read from other processes
	// with other working directories.
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("registry dir %s: %w", dir, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create registry dir: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return nil, fmt.Errorf("registry dir %s: %w", dir, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil, fmt.Errorf("registry dir %s is not a directory", dir)
	}
	if int(st.Uid) != os.Geteuid() {
		return nil, fmt.Errorf("registry dir %s is owned by uid %d, not %d: remove it or set VMHARNESS_RUNTIME_DIR", dir, st.Uid, os.Geteuid())
	}
	if st.Mode&0o077 != 0 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return nil, fmt.Errorf("registry dir %s: make private: %w", dir, err)
		}
	}
	return &Registry{dir: dir}, nil
}

// Dir returns the registry directory.
func (r *Registry) Dir() string { return r.dir }

// Registration is a VM's entry owned by the process that registered it.
type Registration struct {
	reg   *Registry
	entry Entry
}

// Entry returns the entry as last written.
func (g *Registration) Entry() Entry { return g.entry }

var validName = regexp.MustCompile(`^[A-Za-z0-9_+:-][A-Za-z0-9._+:-]{0,199}$`)

// SanitizeName turns s (a unit name such as "foo@bar") into a valid entry
// name by replacing each byte Register would refuse with '_'.
func SanitizeName(s string) string {
	b := []byte(s)
	for i, c := range b {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			strings.IndexByte("._+:-", c) >= 0
		if !ok || (i == 0 && c == '.') {
			b[i] = '_'
		}
	}
	if len(b) == 0 {
		return "vm"
	}
	if len(b) > 200 {
		b = b[:200]
	}
	return string(b)
}

// Register writes a new entry. e.Name must be a plain name (letters, digits
// and ._+:-, not starting with a dot; no @, which ssh would read as
// user@host) not used by another live VM; a stale entry of that name is
// replaced, and every stale entry is pruned first (see List). RunnerPID
// defaults to this process and StartTime to now; Token is always new.
func (r *Registry) Register(e Entry) (*Registration, error) {
	if !validName.MatchString(e.Name) {
		return nil, fmt.Errorf("register VM: invalid name %q (use letters, digits and ._+:-)", e.Name)
	}
	if e.RunnerPID == 0 {
		e.RunnerPID = os.Getpid()
	}
	if e.StartTime.IsZero() {
		e.StartTime = time.Now()
	}
	e.Token = rand.Text()
	recordStartTicks(&e)

	unlock, err := r.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	live, err := r.prune()
	if err != nil {
		return nil, fmt.Errorf("register VM %q: %w", e.Name, err)
	}
	for _, old := range live {
		if old.Name == e.Name {
			return nil, fmt.Errorf("register VM %q: %w (QEMU pid %d, runner pid %d)", e.Name, ErrNameTaken, old.QEMUPID, old.RunnerPID)
		}
	}
	if err := r.write(e); err != nil {
		return nil, err
	}
	return &Registration{reg: r, entry: e}, nil
}

// Update applies fn to the entry and writes it back. The name and token
// cannot change. It fails with an error wrapping fs.ErrNotExist if the entry
// was removed (for example by `vmharness stop`), or replaced by another
// run's entry of the same name.
func (g *Registration) Update(fn func(*Entry)) error {
	unlock, err := g.reg.lock()
	if err != nil {
		return err
	}
	defer unlock()
	if err := g.reg.stillRegistered(g.entry); err != nil {
		return fmt.Errorf("update VM %q: %w", g.entry.Name, err)
	}
	e := g.entry
	fn(&e)
	e.Name, e.Token = g.entry.Name, g.entry.Token
	if e.QEMUPID != g.entry.QEMUPID || e.QEMUStartTicks == 0 {
		e.QEMUStartTicks = 0
	}
	if e.RunnerPID != g.entry.RunnerPID || e.RunnerStartTicks == 0 {
		e.RunnerStartTicks = 0
	}
	recordStartTicks(&e)
	if err := g.reg.write(e); err != nil {
		return err
	}
	g.entry = e
	return nil
}

// Remove deletes the entry if it is still this registration's. Removing an
// entry that is already gone, or that another run has registered under the
// same name since, does nothing and is not an error.
func (g *Registration) Remove() error {
	return g.reg.Remove(g.entry)
}

// Remove deletes e's entry, live or not, if the registry still holds that
// registration (same name and Token); `vmharness stop` uses it after it has
// stopped the VM. A missing entry, or a later run's entry of the same name,
// is left alone and is not an error.
func (r *Registry) Remove(e Entry) error {
	if !validName.MatchString(e.Name) {
		return fmt.Errorf("remove VM: invalid name %q", e.Name)
	}
	unlock, err := r.lock()
	if err != nil {
		return err
	}
	defer unlock()
	err = r.stillRegistered(e)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove VM %q: %w", e.Name, err)
	}
	if err := os.Remove(r.path(e.Name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove VM %q: %w", e.Name, err)
	}
	return nil
}

// stillRegistered checks that the entry file for e.Name is e's registration.
// An entry of that name from another registration counts as not existing.
// Call it with the lock held.
func (r *Registry) stillRegistered(e Entry) error {
	cur, err := r.read(e.Name)
	if err != nil {
		return err
	}
	if cur.Token != e.Token {
		return fmt.Errorf("the entry now belongs to another run (runner pid %d): %w", cur.RunnerPID, fs.ErrNotExist)
	}
	return nil
}

// List returns the live VMs sorted by start time. It deletes stale entries
// (runner and QEMU both gone) and their work dirs, since nobody is left to
// clean up after them.
func (r *Registry) List() ([]Entry, error) {
	unlock, err := r.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	live, err := r.prune()
	if err != nil {
		return nil, err
	}
	sort.Slice(live, func(i, j int) bool {
		if !live[i].StartTime.Equal(live[j].StartTime) {
			return live[i].StartTime.Before(live[j].StartTime)
		}
		return live[i].Name < live[j].Name
	})
	return live, nil
}

// prune deletes stale and unreadable entries and the work dirs of stale
// ones, and returns the live entries. A work dir is removed before its
// entry, so an interrupted prune leaves the entry for the next one; a work
// dir a live entry also names is left alone. Call it with the lock held.
func (r *Registry) prune() ([]Entry, error) {
	paths, err := filepath.Glob(filepath.Join(r.dir, "*.json"))
	if err != nil {
		return nil, fmt.Errorf("list VMs: %w", err)
	}
	var live, stale []Entry
	var toDelete []string // entry files
	for _, p := range paths {
		e, err := r.read(strings.TrimSuffix(filepath.Base(p), ".json"))
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			toDelete = append(toDelete, p)
		case e.Live():
			live = append(live, e)
		default:
			stale = append(stale, e)
		}
	}
	inUse := make(map[string]bool, len(live))
	for _, e := range live {
		inUse[filepath.Clean(e.WorkDir)] = true
	}
	for _, e := range stale {
		if e.WorkDir != "" && !inUse[filepath.Clean(e.WorkDir)] {
			// A path removeWorkDir refuses (not a work dir NewWorkDir
			// made) stays; the entry goes all the same.
			r.removeWorkDir(e.WorkDir)
		}
		toDelete = append(toDelete, r.path(e.Name))
	}
	for _, p := range toDelete {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("prune stale VM entry: %w", err)
		}
	}
	return live, nil
}

// Lookup returns the live VM called name, or an error wrapping ErrNotFound.
func (r *Registry) Lookup(name string) (Entry, error) {
	return r.find(func(e Entry) bool { return e.Name == name }, fmt.Sprintf("name %q", name))
}

// LookupCID returns the live VM with guest CID cid, or an error wrapping
// ErrNotFound.
func (r *Registry) LookupCID(cid uint32) (Entry, error) {
	return r.find(func(e Entry) bool { return e.CID == cid }, fmt.Sprintf("CID %d", cid))
}

func (r *Registry) find(match func(Entry) bool, what string) (Entry, error) {
	entries, err := r.List()
	if err != nil {
		return Entry{}, err
	}
	for _, e := range entries {
		if match(e) {
			return e, nil
		}
	}
	return Entry{}, fmt.Errorf("no running harness VM has %s: %w", what, ErrNotFound)
}

// FirstCID is the lowest CID ReserveCID hands out (0-2 are reserved by the
// vsock address space; 2 is the host).
const FirstCID = 3

// maxCIDs bounds the search so a broken lock directory fails instead of
// spinning.
const maxCIDs = 1 << 16

// ReserveCID returns a guest CID no other harness VM on this machine uses
// and a release func. The reservation is an flock on <dir>/cid-<N>.lock held
// by an O_CLOEXEC fd of this process (QEMU does not inherit it), so it ends
// when release is called or the process dies; CIDs of live registered VMs
// (a kept VM whose runner has exited) are skipped as well. Call release only
// after QEMU has exited. The kernel transport still has to confirm the CID
// with VHOST_VSOCK_SET_GUEST_CID, which also guards against VMs outside the
// harness; on EADDRINUSE, keep this reservation (so nobody else tries the
// same CID) and reserve again.
func (r *Registry) ReserveCID() (cid uint32, release func(), err error) {
	entries, err := r.List()
	if err != nil {
		return 0, nil, err
	}
	used := make(map[uint32]bool, len(entries))
	for _, e := range entries {
		used[e.CID] = true
	}
	for c := uint32(FirstCID); c < FirstCID+maxCIDs; c++ {
		if used[c] {
			continue
		}
		f, err := os.OpenFile(filepath.Join(r.dir, fmt.Sprintf("cid-%d.lock", c)), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return 0, nil, fmt.Errorf("reserve CID: %w", err)
		}
		// flock locks belong to the open file description, so this also
		// excludes other goroutines of this process.
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				continue
			}
			return 0, nil, fmt.Errorf("reserve CID %d: %w", c, err)
		}
		// Lock files are never deleted: unlinking one while another process
		// holds an fd to it would let two processes lock different inodes
		// under the same name.
		return c, func() { f.Close() }, nil
	}
	return 0, nil, fmt.Errorf("reserve CID: all %d CIDs from %d are in use", maxCIDs, FirstCID)
}

func (r *Registry) path(name string) string { return filepath.Join(r.dir, name+".json") }

// lock serialises registry changes between processes.
func (r *Registry) lock() (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(r.dir, "registry.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock registry: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock registry %s: %w", f.Name(), err)
	}
	return func() { f.Close() }, nil
}

func (r *Registry) read(name string) (Entry, error) {
	data, err := os.ReadFile(r.path(name))
	if err != nil {
		return Entry{}, err
	}
	var e Entry
	if err := json.Unmarshal(data, &e); err != nil {
		return Entry{}, fmt.Errorf("parse %s: %w", r.path(name), err)
	}
	if e.Name != name {
		return Entry{}, fmt.Errorf("parse %s: entry names %q", r.path(name), e.Name)
	}
	return e, nil
}

func (r *Registry) write(e Entry) error {
	data, err := json.MarshalIndent(e, "", "  ")
	if err != nil {
		return fmt.Errorf("encode VM entry: %w", err)
	}
	tmp, err := os.CreateTemp(r.dir, ".tmp-"+e.Name+"-*")
	if err != nil {
		return fmt.Errorf("write VM entry: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after rename
	_, werr := tmp.Write(append(data, '\n'))
	cerr := tmp.Close()
	if err := errors.Join(werr, cerr); err != nil {
		return fmt.Errorf("write VM entry: %w", err)
	}
	if err := os.Rename(tmp.Name(), r.path(e.Name)); err != nil {
		return fmt.Errorf("write VM entry: %w", err)
	}
	return nil
}

func recordStartTicks(e *Entry) {
	if e.QEMUPID > 0 && e.QEMUStartTicks == 0 {
		e.QEMUStartTicks, _ = startTicks(e.QEMUPID)
	}
	if e.RunnerPID > 0 && e.RunnerStartTicks == 0 {
		e.RunnerStartTicks, _ = startTicks(e.RunnerPID)
	}
}

// sameProcess reports whether pid runs and is the process that had start
// time ticks when it was recorded. Without a recorded start time (the
// process was already gone at registration, or the entry was not written by
// the registry) the identity is unknown, and an unknown process is never
// signalled or trusted, so it counts as gone.
func sameProcess(pid int, ticks uint64) bool {
	if ticks == 0 {
		return false
	}
	now, err := startTicks(pid)
	return err == nil && now == ticks
}

// startTicks returns the start time of a running process from
// /proc/PID/stat; zombies count as gone.
func startTicks(pid int) (uint64, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may contain spaces and parentheses; the
	// fields after the last ')' are well-formed.
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat: no command name", pid)
	}
	fields := strings.Fields(string(data[i+1:]))
	// fields[0] is field 3 (state), so field 22 (starttime) is fields[19].
	if len(fields) < 20 {
		return 0, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(fields))
	}
	if fields[0] == "Z" || fields[0] == "X" {
		return 0, fmt.Errorf("process %d has exited", pid)
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// workDirPrefix starts the name of every work dir NewWorkDir makes;
// os.MkdirTemp appends random digits.
const workDirPrefix = "vm-"

var workDirName = regexp.MustCompile(`^` + workDirPrefix + `[0-9]+$`)

// NewWorkDir creates a private (0700) per-run work dir directly in the
// registry dir. It is the only kind of directory the registry deletes when
// it finds a VM's runner and QEMU dead.
func (r *Registry) NewWorkDir() (string, error) {
	dir, err := os.MkdirTemp(r.dir, workDirPrefix)
	if err != nil {
		return "", fmt.Errorf("create the VM's work directory in %s: %w", r.dir, err)
	}
	return dir, nil
}

// RemoveWorkDir deletes e's WorkDir (overlay, sockets). Call it only when
// neither QEMU nor the runner of e is alive. It refuses any path that is not
// a work dir NewWorkDir made (see removeWorkDir).
func (r *Registry) RemoveWorkDir(e Entry) error { return r.removeWorkDir(e.WorkDir) }

// removeWorkDir deletes a dead VM's work dir. Entries are plain files a
// bug or a hand edit may corrupt, so it deletes only a directory that
// NewWorkDir could have made: directly in the registry dir, named vm-DIGITS,
// not a symlink, owned by this user. A dir that is already gone is not an
// error.
func (r *Registry) removeWorkDir(dir string) error {
	if dir == "" {
		return nil
	}
	refuse := func(why string) error {
		return fmt.Errorf("refusing to remove work dir %q: %s; only vmharness's own %s* dirs in %s are removed", dir, why, workDirPrefix, r.dir)
	}
	if !filepath.IsAbs(dir) {
		return refuse("not an absolute path")
	}
	clean := filepath.Clean(dir)
	name := filepath.Base(clean)
	if !workDirName.MatchString(name) {
		return refuse("not named like a work dir")
	}
	parent, err := os.Stat(filepath.Dir(clean))
	if err != nil {
		return refuse(err.Error())
	}
	regDir, err := os.Stat(r.dir)
	if err != nil {
		return refuse(err.Error())
	}
	if !os.SameFile(parent, regDir) {
		return refuse("not in the registry dir")
	}
	// From here on the path is spelled through the registry dir, which is
	// private to this user, so it cannot change under us.
	path := filepath.Join(r.dir, name)
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); errors.Is(err, unix.ENOENT) {
		return nil
	} else if err != nil {
		return refuse(err.Error())
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return refuse("not a directory (a symlink?)")
	}
	if int(st.Uid) != os.Geteuid() {
		return refuse(fmt.Sprintf("owned by uid %d, not %d", st.Uid, os.Geteuid()))
	}
	if err := os.RemoveAll(path); err != nil {
		return fmt.Errorf("remove work dir: %w", err)
	}
	return nil
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}
