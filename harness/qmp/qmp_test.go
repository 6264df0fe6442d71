package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeQEMU serves one QMP connection on a Unix socket: it greets, then
// answers each command with script[command] (a JSON reply line or lines,
// events included), recording the requests it got.
func fakeQEMU(t *testing.T, greeting string, script map[string][]string) (path string, requests <-chan map[string]any) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	reqs := make(chan map[string]any, 16)
	done := make(chan struct{})
	t.Cleanup(func() { l.Close(); <-done })
	go func() {
		defer close(done)
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte(greeting + "\n"))
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			var req map[string]any
			if json.Unmarshal(sc.Bytes(), &req) != nil {
				return
			}
			reqs <- req
			cmd, _ := req["execute"].(string)
			for _, line := range script[cmd] {
				c.Write([]byte(line + "\n"))
			}
		}
	}()
	return path, reqs
}

const qemuGreeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}`

func TestExecuteAndEvents(t *testing.T) {
	path, reqs := fakeQEMU(t, qemuGreeting, map[string][]string{
		"qmp_capabilities": {`{"return": {}}`},
		// An event arrives before the answer, as QEMU may send one.
		"stop":         {`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}`, `{"return": {}}`},
		"query-status": {`{"return": {"status": "paused", "running": false}}`},
		"device_add":   {`{"error": {"class": "GenericError", "desc": "Bus 'nope' not found"}}`},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	q, err := Dial(ctx, path)
	require.NoError(t, err)
	defer q.Close()
	assert.Equal(t, "qmp_capabilities", (<-reqs)["execute"])

	_, err = q.Execute(ctx, "stop", nil)
	require.NoError(t, err)
	ev := <-q.Events()
	assert.Equal(t, "STOP", ev.Name)

	ret, err := q.Execute(ctx, "query-status", nil)
	require.NoError(t, err)
	var st struct{ Status string }
	require.NoError(t, json.Unmarshal(ret, &st))
	assert.Equal(t, "paused", st.Status)

	_, err = q.Execute(ctx, "device_add", map[string]any{"driver": "virtio-rng-pci", "bus": "nope"})
	var qerr *Error
	require.ErrorAs(t, err, &qerr)
	assert.Equal(t, "GenericError", qerr.Class)
	assert.Contains(t, err.Error(), "device_add")
	<-reqs // stop
	<-reqs // query-status
	req := <-reqs
	assert.Equal(t, map[string]any{"driver": "virtio-rng-pci", "bus": "nope"}, req["arguments"])
}

func TestNotQMP(t *testing.T) {
	path, _ := fakeQEMU(t, `{"hello": "world"}`, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := Dial(ctx, path)
	require.ErrorContains(t, err, "not a QMP greeting")
}

func TestPeerGoesAway(t *testing.T) {
	// QEMU quits while a command waits for its answer (as after "quit").
	path, _ := fakeQEMU(t, qemuGreeting, map[string][]string{"qmp_capabilities": {`{"return": {}}`}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	q, err := Dial(ctx, path)
	require.NoError(t, err)
	defer q.Close()
	short, cancelShort := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancelShort()
	_, err = q.Execute(short, "quit", nil) // the fake answers nothing
	require.ErrorIs(t, err, context.DeadlineExceeded)
	// The fake never closes by itself: the deadline ended the wait and
	// closed the connection; a later command fails at once.
	_, err = q.Execute(context.Background(), "query-status", nil)
	require.ErrorIs(t, err, ErrClosed)
}

func TestDialGivesUp(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := Dial(ctx, filepath.Join(t.TempDir(), "missing.sock"))
	require.ErrorIs(t, err, context.DeadlineExceeded)
}
