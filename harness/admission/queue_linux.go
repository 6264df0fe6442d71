package admission

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Request is one VM that wants to start.
type Request struct {
	// Name identifies the run in the ticket (for people reading the
	// directory); it need not be unique.
	Name string
	// MemoryMiB is the guest's memory; QEMUOverheadMiB is added.
	MemoryMiB int
}

// Waiting is what a run waits for, reported once when it starts waiting.
type Waiting struct {
	Running, MaxVMs int
	// Why adds what else holds the VM back (see Decision.Why).
	Why string
}

// Slot is an admitted VM's place. Its owner releases it once QEMU has
// exited; a process that dies releases it with its last file descriptor.
type Slot struct {
	f    *os.File
	path string
	// Waited is how long the run waited to be admitted.
	Waited time.Duration
	// Note is set when the VM was admitted although memory looked short
	// (see Decide).
	Note string
}

// Release gives the slot back. It is safe to call more than once.
func (s *Slot) Release() {
	if s == nil || s.f == nil {
		return
	}
	// Unlink first: a run scanning the directory meanwhile sees a ticket
	// still locked (live) or none, never a reusable name.
	os.Remove(s.path)
	s.f.Close()
	s.f = nil
}

// ticket is the JSON content of a ticket file.
type ticket struct {
	Name      string    `json:"name"`
	PID       int       `json:"pid"`
	MemoryMiB int       `json:"memory_mib"` // QEMU overhead included
	Admitted  bool      `json:"admitted"`
	QueuedAt  time.Time `json:"queued_at"`
}

// Tickets and the queue's lock live next to the registry's files in the
// runtime directory, under names the registry leaves alone.
const ticketPrefix, ticketSuffix, lockName = "admission-", ".ticket", "admission.lock"

// Admit queues the VM and returns once it may start, or with ctx's cause
// when ctx ends first (a SIGTERM while waiting). onWait is called once,
// when the run first has to wait.
func Admit(ctx context.Context, cfg Config, req Request, onWait func(Waiting)) (*Slot, error) {
	if cfg.MaxVMs < 1 {
		cfg.MaxVMs = 1
	}
	if cfg.Poll <= 0 {
		cfg.Poll = 200 * time.Millisecond
	}
	if cfg.MemInfo == nil {
		cfg.MemInfo = ReadMemInfo
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("VM admission: %w", err)
	}
	start := time.Now()
	q := &queue{cfg: cfg}
	slot, err := q.join(req, start)
	if err != nil {
		return nil, err
	}
	waited := false
	for {
		d, w, err := q.poll(slot)
		if err != nil {
			slot.Release()
			return nil, err
		}
		if d.Admit {
			slot.Waited, slot.Note = time.Since(start), d.Why
			return slot, nil
		}
		if !waited && onWait != nil {
			onWait(w)
		}
		waited = true
		select {
		case <-ctx.Done():
			slot.Release()
			return nil, fmt.Errorf("while waiting for a VM slot (%s): %w", w, context.Cause(ctx))
		case <-time.After(cfg.Poll):
		}
	}
}

func (w Waiting) String() string {
	s := fmt.Sprintf("%d running, limit %d", w.Running, w.MaxVMs)
	if w.Why != "" {
		s += "; " + w.Why
	}
	return s
}

type queue struct{ cfg Config }

// lock serialises every look at and change of the queue.
func (q *queue) lock() (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(q.cfg.Dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("VM admission lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("VM admission lock %s: %w", f.Name(), err)
	}
	return func() { f.Close() }, nil
}

// liveTicket is another run's ticket found by scan.
type liveTicket struct {
	seq int
	t   ticket
}

// scan removes the tickets of runs that are gone and returns the others,
// in queue order. Call it with the lock held.
func (q *queue) scan(own string) ([]liveTicket, int, error) {
	entries, err := os.ReadDir(q.cfg.Dir)
	if err != nil {
		return nil, 0, fmt.Errorf("VM admission: %w", err)
	}
	var live []liveTicket
	maxSeq := 0
	for _, e := range entries {
		seq, ok := ticketSeq(e.Name())
		if !ok {
			continue
		}
		maxSeq = max(maxSeq, seq)
		path := filepath.Join(q.cfg.Dir, e.Name())
		if path == own {
			continue
		}
		t, alive, err := readTicket(path)
		if err != nil {
			return nil, 0, err
		}
		if alive {
			live = append(live, liveTicket{seq, t})
		}
	}
	sort.Slice(live, func(i, j int) bool { return live[i].seq < live[j].seq })
	return live, maxSeq, nil
}

func ticketSeq(name string) (int, bool) {
	s, ok := strings.CutPrefix(name, ticketPrefix)
	if !ok {
		return 0, false
	}
	s, ok = strings.CutSuffix(s, ticketSuffix)
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(s)
	return n, err == nil && n > 0
}

// readTicket reads another run's ticket. A ticket whose flock is free
// belongs to a run that is gone: it is removed and reported not alive.
func readTicket(path string) (ticket, bool, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return ticket{}, false, nil
	}
	if err != nil {
		return ticket{}, false, fmt.Errorf("VM admission: %w", err)
	}
	defer f.Close()
	err = unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB)
	if err == nil {
		os.Remove(path)
		return ticket{}, false, nil
	}
	if !errors.Is(err, unix.EWOULDBLOCK) {
		return ticket{}, false, fmt.Errorf("VM admission: checking %s: %w", path, err)
	}
	var t ticket
	data, err := io.ReadAll(f)
	if err != nil || json.Unmarshal(data, &t) != nil {
		// Written under the queue lock, so never half-written; count an
		// unreadable live ticket as a running VM rather than ignore it.
		return ticket{Admitted: true, MemoryMiB: QEMUOverheadMiB}, true, nil
	}
	return t, true, nil
}

// join takes a ticket at the end of the queue.
func (q *queue) join(req Request, now time.Time) (*Slot, error) {
	unlock, err := q.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	_, maxSeq, err := q.scan("")
	if err != nil {
		return nil, err
	}
	path := filepath.Join(q.cfg.Dir, fmt.Sprintf("%s%012d%s", ticketPrefix, maxSeq+1, ticketSuffix))
	// Go opens files close-on-exec: QEMU and other children never hold
	// the ticket.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("VM admission ticket: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("VM admission ticket %s: %w", path, err)
	}
	s := &Slot{f: f, path: path}
	t := ticket{Name: req.Name, PID: os.Getpid(), MemoryMiB: req.MemoryMiB + QEMUOverheadMiB, QueuedAt: now}
	if err := s.write(t); err != nil {
		s.Release()
		return nil, err
	}
	return s, nil
}

func (s *Slot) write(t ticket) error {
	data, err := json.Marshal(t)
	if err != nil {
		return err
	}
	if err := s.f.Truncate(0); err != nil {
		return fmt.Errorf("VM admission ticket: %w", err)
	}
	if _, err := s.f.WriteAt(append(data, '\n'), 0); err != nil {
		return fmt.Errorf("VM admission ticket: %w", err)
	}
	return nil
}

func (s *Slot) read() (ticket, error) {
	data := make([]byte, 4096)
	n, err := s.f.ReadAt(data, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return ticket{}, err
	}
	var t ticket
	return t, json.Unmarshal(data[:n], &t)
}

// poll decides once whether the run holding slot may start, and marks its
// ticket admitted if so.
func (q *queue) poll(slot *Slot) (Decision, Waiting, error) {
	unlock, err := q.lock()
	if err != nil {
		return Decision{}, Waiting{}, err
	}
	defer unlock()
	own, err := slot.read()
	if err != nil {
		return Decision{}, Waiting{}, fmt.Errorf("VM admission: reading own ticket %s: %w", slot.path, err)
	}
	others, _, err := q.scan(slot.path)
	if err != nil {
		return Decision{}, Waiting{}, err
	}
	mem, err := q.cfg.MemInfo()
	if err != nil {
		return Decision{}, Waiting{}, err
	}
	ownSeq, _ := ticketSeq(filepath.Base(slot.path))
	st := State{
		MaxVMs:          q.cfg.MaxVMs,
		WantMiB:         own.MemoryMiB,
		MemTotalMiB:     mem.TotalMiB,
		MemAvailableMiB: mem.AvailableMiB,
		ReserveMiB:      q.cfg.ReserveMiB,
	}
	for _, o := range others {
		switch {
		case o.t.Admitted:
			st.Running = append(st.Running, o.t.MemoryMiB)
		case o.seq < ownSeq:
			st.Ahead++
		}
	}
	d := Decide(st)
	w := Waiting{Running: len(st.Running), MaxVMs: st.MaxVMs, Why: d.Why}
	if d.Admit {
		own.Admitted = true
		if err := slot.write(own); err != nil {
			return Decision{}, Waiting{}, err
		}
	}
	return d, w, nil
}

// ReadMemInfo reads MemTotal and MemAvailable from /proc/meminfo.
func ReadMemInfo() (MemInfo, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return MemInfo{}, fmt.Errorf("reading the host's memory: %w", err)
	}
	defer f.Close()
	return parseMemInfo(f)
}

func parseMemInfo(r io.Reader) (MemInfo, error) {
	var m MemInfo
	var haveTotal, haveAvail bool
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		kb, err := strconv.Atoi(fields[1])
		if err != nil {
			continue
		}
		switch fields[0] {
		case "MemTotal:":
			m.TotalMiB, haveTotal = kb/1024, true
		case "MemAvailable:":
			m.AvailableMiB, haveAvail = kb/1024, true
		}
	}
	if !haveTotal || !haveAvail {
		return MemInfo{}, errors.New("reading the host's memory: /proc/meminfo has no MemTotal or MemAvailable")
	}
	return m, nil
}
