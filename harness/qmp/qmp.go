// Package qmp is a small client for the QEMU Machine Protocol: JSON
// objects over a Unix socket. Dial reads QEMU's greeting and leaves
// capability negotiation done; Execute sends one command and waits for its
// answer; events QEMU sends meanwhile go to Events.
//
// Only what the harness needs is here: one command in flight at a time
// (QEMU answers commands in order anyway), no out-of-band execution.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// Event is one asynchronous event QEMU sent.
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
}

// Error is a command's failure as QEMU reported it.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return e.Class + ": " + e.Desc }

// message is anything QEMU sends: a greeting, a return, an error or an event.
type message struct {
	Greeting *json.RawMessage `json:"QMP"`
	Return   *json.RawMessage `json:"return"`
	Error    *Error           `json:"error"`
	Event    string           `json:"event"`
	Data     json.RawMessage  `json:"data"`
}

// Conn is one QMP connection. Its methods may be called from several
// goroutines; commands are sent one at a time.
type Conn struct {
	c      net.Conn
	events chan Event
	// replies carries the answers to commands, in order.
	replies chan message
	// readErr is set when the reader stops; done is closed then.
	readErr error
	done    chan struct{}

	cmdMu sync.Mutex
}

// ErrClosed is returned by Execute once the connection is gone (QEMU quit).
var ErrClosed = errors.New("qmp: connection closed")

// Dial connects to QEMU's QMP socket at path, retrying until it exists or
// ctx ends (QEMU creates it shortly after it starts), reads the greeting
// and negotiates capabilities.
func Dial(ctx context.Context, path string) (*Conn, error) {
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return newConn(ctx, c)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("qmp: connecting to %s: %w (last error: %v)", path, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// NewConn speaks QMP over an established connection c, which it owns.
func NewConn(ctx context.Context, c net.Conn) (*Conn, error) { return newConn(ctx, c) }

func newConn(ctx context.Context, c net.Conn) (*Conn, error) {
	q := &Conn{c: c, events: make(chan Event, 64), replies: make(chan message, 1), done: make(chan struct{})}
	greeting := make(chan error, 1)
	go q.read(greeting)
	select {
	case err := <-greeting:
		if err != nil {
			q.Close()
			return nil, err
		}
	case <-ctx.Done():
		q.Close()
		return nil, fmt.Errorf("qmp: waiting for QEMU's greeting: %w", ctx.Err())
	}
	if _, err := q.Execute(ctx, "qmp_capabilities", nil); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

// read decodes QEMU's messages until the connection ends. The first must
// be the greeting; its result goes to greeting.
func (q *Conn) read(greeting chan<- error) {
	defer close(q.done)
	defer close(q.events)
	dec := json.NewDecoder(bufio.NewReader(q.c))
	first := true
	for {
		var m message
		if err := dec.Decode(&m); err != nil {
			q.readErr = err
			if first {
				greeting <- fmt.Errorf("qmp: reading QEMU's greeting: %w", err)
			}
			return
		}
		if first {
			first = false
			if m.Greeting == nil {
				q.readErr = errors.New("qmp: the peer's first message is not a QMP greeting")
				greeting <- q.readErr
				return
			}
			greeting <- nil
			continue
		}
		switch {
		case m.Event != "":
			select {
			case q.events <- Event{Name: m.Event, Data: m.Data}:
			default:
				// Nobody reads events: dropping one beats
				// stalling the replies behind it.
			}
		case m.Return != nil || m.Error != nil:
			select {
			case q.replies <- m:
			case <-q.done:
			}
		}
	}
}

// Events returns the events QEMU sent; it is closed when the connection
// ends. Events beyond a buffer of 64 unread ones are dropped.
func (q *Conn) Events() <-chan Event { return q.events }

// Execute runs command with args (nil for none) and returns its "return"
// value. A command QEMU refused returns an *Error.
func (q *Conn) Execute(ctx context.Context, command string, args any) (json.RawMessage, error) {
	q.cmdMu.Lock()
	defer q.cmdMu.Unlock()
	select {
	case <-q.done:
		return nil, fmt.Errorf("qmp: %s: %w (%v)", command, ErrClosed, q.readErr)
	default:
	}
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	data, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("qmp: encoding %s: %w", command, err)
	}
	if deadline, ok := ctx.Deadline(); ok {
		q.c.SetWriteDeadline(deadline)
	}
	if _, err := q.c.Write(append(data, '\n')); err != nil {
		return nil, fmt.Errorf("qmp: sending %s: %w", command, err)
	}
	select {
	case m := <-q.replies:
		if m.Error != nil {
			return nil, fmt.Errorf("qmp: %s: %w", command, m.Error)
		}
		return *m.Return, nil
	case <-q.done:
		return nil, fmt.Errorf("qmp: %s: %w (%v)", command, ErrClosed, q.readErr)
	case <-ctx.Done():
		// The answer may still come; the connection is out of step
		// now, so it is closed.
		q.Close()
		return nil, fmt.Errorf("qmp: waiting for the answer to %s: %w", command, ctx.Err())
	}
}

// Close closes the connection and waits for its reader.
func (q *Conn) Close() error {
	err := q.c.Close()
	<-q.done
	return err
}
