package harness

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxNotifyMessage bounds one notify connection. systemd's own messages are
// a few hundred bytes; anything larger is a misbehaving guest.
const maxNotifyMessage = 64 << 10

// notifyReadTimeout bounds how long one notify connection may stay open.
// PID 1 writes a message and closes at once.
const notifyReadTimeout = 30 * time.Second

// NotifyMessage is one sd_notify message: the assignments of one connection.
type NotifyMessage map[string]string

// parseNotify splits a message into its NAME=VALUE lines. Lines without '='
// are ignored, as systemd does.
func parseNotify(data []byte) NotifyMessage {
	m := NotifyMessage{}
	for _, line := range bytes.Split(data, []byte("\n")) {
		key, value, ok := bytes.Cut(line, []byte("="))
		if !ok || len(key) == 0 {
			continue
		}
		m[string(key)] = string(value)
	}
	return m
}

// NotifyState is what the guest's service manager told the host so far.
type NotifyState struct {
	mu         sync.Mutex
	ready      bool
	exitStatus *int
	// testStatus is the failed test's status as reported by the
	// keep-on-failure drop-in while the VM stays up.
	testStatus *int
	// shutdown is the guest's announced shutdown (X_SYSTEMD_SHUTDOWN) in
	// the current boot; a reboot's EXIT_STATUS is not the test's result.
	shutdown   string
	lastStatus string
	events     chan NotifyMessage
	changed    chan struct{}
}

func newNotifyState() *NotifyState {
	return &NotifyState{changed: make(chan struct{}, 1)}
}

// ExitStatus returns the EXIT_STATUS the guest reported, if any.
func (s *NotifyState) ExitStatus() (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.exitStatus == nil {
		return 0, false
	}
	return *s.exitStatus, true
}

// TestFailedStatus returns the status the keep-on-failure drop-in reported
// for a failed test unit, if it did.
func (s *NotifyState) TestFailedStatus() (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.testStatus == nil {
		return 0, false
	}
	return *s.testStatus, true
}

// Ready reports whether the guest sent READY=1.
func (s *NotifyState) Ready() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ready
}

// Heard reports whether any message arrived.
func (s *NotifyState) heard() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastStatus != "" || s.ready || s.exitStatus != nil
}

func (s *NotifyState) apply(m NotifyMessage) {
	s.mu.Lock()
	if m["READY"] == "1" {
		s.ready = true
	}
	if v, ok := m["X_SYSTEMD_SHUTDOWN"]; ok {
		s.shutdown = v
		if rebooting(v) {
			s.exitStatus = nil
		}
	} else if _, ok := m["X_SYSTEMD_UNIT_ACTIVE"]; ok || m["READY"] == "1" {
		// A message from a running service manager: a new boot.
		s.shutdown = ""
	}
	if v, ok := m["EXIT_STATUS"]; ok && !rebooting(s.shutdown) {
		// A malformed status from the guest is recorded as an unparsable
		// status rather than ignored, so the test fails visibly.
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n < 0 || n > 255 {
			n = -1
		}
		s.exitStatus = &n
	}
	if _, ok := m[notifyTestResult]; ok {
		n, err := strconv.Atoi(strings.TrimSpace(m[notifyTestStatus]))
		if err != nil || n < 0 || n > 255 {
			// A test killed by a signal or a timeout has no exit status;
			// any nonzero status that is not 77 fails the test.
			n = 255
		}
		s.testStatus = &n
	}
	s.lastStatus = describeNotify(m)
	s.mu.Unlock()
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// rebooting reports whether a shutdown of this kind boots the guest again.
func rebooting(shutdown string) bool {
	switch shutdown {
	case "reboot", "kexec", "soft-reboot":
		return true
	}
	return false
}

func describeNotify(m NotifyMessage) string {
	for _, k := range []string{"EXIT_STATUS", "X_SYSTEMD_SHUTDOWN", "X_SYSTEMD_UNIT_ACTIVE", "STATUS", "READY"} {
		if v, ok := m[k]; ok {
			return k + "=" + v
		}
	}
	return "message"
}

// serveNotify accepts notify connections until the listener is closed or
// ctx ends, applying each complete message to state. It returns when every
// connection handler has finished.
func serveNotify(ctx context.Context, l net.Listener, state *NotifyState, logf func(string, ...any)) {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		conn, err := l.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) && ctx.Err() == nil {
				logf("notify: accept: %v", err)
			}
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer conn.Close()
			conn.SetReadDeadline(time.Now().Add(notifyReadTimeout))
			data, err := io.ReadAll(io.LimitReader(bufio.NewReader(conn), maxNotifyMessage+1))
			if err != nil {
				logf("notify: reading message: %v", err)
				return
			}
			if len(data) > maxNotifyMessage {
				logf("notify: dropping a message over %d bytes", maxNotifyMessage)
				return
			}
			state.apply(parseNotify(data))
		}()
	}
}
