// Package registry records the harness VMs running on this machine, one JSON
// file per VM in a private per-user runtime directory, so that `vmharness ps`,
// `ssh`, `ssh-proxy` and `stop` can find VMs that other processes started.
//
// The runner that boots a VM owns its entry: it registers it before QEMU
// starts, updates it (QEMU pid, kept-after-failure deadline) and removes it
// when it has cleaned up. Readers never trust an entry blindly: an entry whose
// QEMU process is gone, or whose pid now belongs to another process (pid
// reuse is detected through the start time in /proc/PID/stat), is stale and
// List prunes it.
//
// The registry also allocates guest CIDs (ReserveCID) so that parallel VMs
// never share one.
package registry

import (
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
	// to the guest, or "" for the kernel transport.
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
}

// Kept reports whether the VM was kept running after a failed test.
func (e Entry) Kept() bool { return !e.KeptUntil.IsZero() }

// QEMUAlive reports whether the recorded QEMU process still runs.
func (e Entry) QEMUAlive() bool { return e.QEMUPID > 0 && sameProcess(e.QEMUPID, e.QEMUStartTicks) }

// RunnerAlive reports whether the recorded runner process still runs.
func (e Entry) RunnerAlive() bool {
	return e.RunnerPID > 0 && sameProcess(e.RunnerPID, e.RunnerStartTicks)
}

// Live reports whether the VM exists: its QEMU runs or, before QEMU has
// started, its runner does.
func (e Entry) Live() bool {
	if e.QEMUPID > 0 {
		return e.QEMUAlive()
	}
	return e.RunnerAlive()
}

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
// replaced. RunnerPID defaults to this process and
// StartTime to now.
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
	recordStartTicks(&e)

	unlock, err := r.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	old, err := r.read(e.Name)
	switch {
	case err == nil && old.Live():
		return nil, fmt.Errorf("register VM %q: %w (QEMU pid %d, runner pid %d)", e.Name, ErrNameTaken, old.QEMUPID, old.RunnerPID)
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		// A corrupt file is as good as stale: overwrite it.
	}
	if err := r.write(e); err != nil {
		return nil, err
	}
	return &Registration{reg: r, entry: e}, nil
}

// Update applies fn to the entry and writes it back. The name cannot change.
// It fails with an error wrapping fs.ErrNotExist if the entry was removed
// (for example by `vmharness stop`).
func (g *Registration) Update(fn func(*Entry)) error {
	unlock, err := g.reg.lock()
	if err != nil {
		return err
	}
	defer unlock()
	if _, err := os.Stat(g.reg.path(g.entry.Name)); err != nil {
		return fmt.Errorf("update VM %q: %w", g.entry.Name, err)
	}
	e := g.entry
	fn(&e)
	e.Name = g.entry.Name
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

// Remove deletes the entry. Removing an entry that is already gone is not an
// error.
func (g *Registration) Remove() error {
	return g.reg.Remove(g.entry.Name)
}

// Remove deletes the entry called name, live or not; `vmharness stop` uses
// it after it has stopped the VM. A missing entry is not an error.
func (r *Registry) Remove(name string) error {
	if !validName.MatchString(name) {
		return fmt.Errorf("remove VM: invalid name %q", name)
	}
	unlock, err := r.lock()
	if err != nil {
		return err
	}
	defer unlock()
	if err := os.Remove(r.path(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove VM %q: %w", name, err)
	}
	return nil
}

// List returns the live VMs sorted by start time and deletes the entries of
// VMs that are gone. For a stale entry whose runner is gone too, nobody is
// left to clean up, so List also removes its WorkDir.
func (r *Registry) List() ([]Entry, error) {
	unlock, err := r.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	names, err := filepath.Glob(filepath.Join(r.dir, "*.json"))
	if err != nil {
		return nil, fmt.Errorf("list VMs: %w", err)
	}
	var live []Entry
	for _, p := range names {
		name := strings.TrimSuffix(filepath.Base(p), ".json")
		e, err := r.read(name)
		if err != nil && errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err == nil && e.Live() {
			live = append(live, e)
			continue
		}
		// Stale or unreadable: prune.
		if err == nil && !e.RunnerAlive() {
			removeWorkDir(e.WorkDir)
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("prune stale VM entry: %w", err)
		}
	}
	sort.Slice(live, func(i, j int) bool {
		if !live[i].StartTime.Equal(live[j].StartTime) {
			return live[i].StartTime.Before(live[j].StartTime)
		}
		return live[i].Name < live[j].Name
	})
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

// removeWorkDir deletes a dead VM's per-run directory. It refuses paths that
// cannot be a per-run directory, so a corrupt entry cannot delete much.
func removeWorkDir(dir string) error {
	if dir == "" {
		return nil
	}
	clean := filepath.Clean(dir)
	if !filepath.IsAbs(clean) || strings.Count(clean, "/") < 2 {
		return fmt.Errorf("refusing to remove work dir %q: not a per-run directory", dir)
	}
	return os.RemoveAll(clean)
}

// RemoveWorkDir deletes e's WorkDir (overlay, sockets). Call it only when
// neither QEMU nor the runner of e is alive.
func RemoveWorkDir(e Entry) error { return removeWorkDir(e.WorkDir) }

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}
