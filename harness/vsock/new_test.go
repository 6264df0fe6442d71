package vsock

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeTransport stands in for a backend in selection tests.
type fakeTransport struct {
	kind Kind
	cid  uint32
}

func (f *fakeTransport) Kind() Kind             { return f.kind }
func (f *fakeTransport) CID() uint32            { return f.cid }
func (f *fakeTransport) QEMUArgs() []string     { return nil }
func (f *fakeTransport) ExtraFiles() []*os.File { return nil }
func (f *fakeTransport) Listen(uint32) (net.Listener, error) {
	return nil, errors.New("fake")
}
func (f *fakeTransport) Dial(context.Context, uint32) (net.Conn, error) {
	return nil, errors.New("fake")
}
func (f *fakeTransport) HybridSocket() string { return "" }
func (f *fakeTransport) Close() error         { return nil }

// privateDir returns a fresh 0700 directory with a short path (socket paths
// are limited to 107 bytes, and t.TempDir's can be long).
func privateDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "vsk")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o700))
	return dir
}

type logRecorder struct{ lines []string }

func (l *logRecorder) logf(format string, args ...any) {
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
}

func TestNewSelectsBackend(t *testing.T) {
	errNoDevice := &fs.PathError{Op: "open", Path: "/dev/vhost-vsock", Err: fs.ErrNotExist}
	errDenied := &fs.PathError{Op: "open", Path: "/dev/vhost-vsock", Err: fs.ErrPermission}
	kernelOK := func(context.Context, Config) (Transport, error) { return &fakeTransport{kind: KindKernel, cid: 3}, nil }
	kernelErr := func(err error) func(context.Context, Config) (Transport, error) {
		return func(context.Context, Config) (Transport, error) { return nil, err }
	}
	userOK := func(context.Context, Config) (Transport, error) { return &fakeTransport{kind: KindUser, cid: 42}, nil }
	userErr := func(context.Context, Config) (Transport, error) { return nil, errors.New("vhost-user socket: boom") }

	tests := []struct {
		name     string
		mode     Mode
		b        backends
		wantKind Kind
		wantLog  string // substring of the one log line
		wantErr  string // substring of the error
	}{
		{name: "auto prefers kernel", mode: ModeAuto, b: backends{kernelOK, userOK}, wantKind: KindKernel, wantLog: "using kernel vhost-vsock, guest CID 3"},
		{name: "zero mode is auto", mode: "", b: backends{kernelOK, userOK}, wantKind: KindKernel, wantLog: "kernel"},
		{name: "auto without device", mode: ModeAuto, b: backends{kernelErr(errNoDevice), userOK}, wantKind: KindUser,
			wantLog: "vsock: using userspace vhost-user transport, guest CID 42 (no /dev/vhost-vsock)"},
		{name: "auto says why kernel failed", mode: ModeAuto, b: backends{kernelErr(errDenied), userOK}, wantKind: KindUser,
			wantLog: "permission denied"},
		{name: "auto both fail", mode: ModeAuto, b: backends{kernelErr(errNoDevice), userErr}, wantErr: "boom"},
		{name: "kernel forced", mode: ModeKernel, b: backends{kernelOK, userOK}, wantKind: KindKernel, wantLog: "VMHARNESS_VSOCK=kernel"},
		{name: "kernel forced without device", mode: ModeKernel, b: backends{kernelErr(errNoDevice), userOK}, wantErr: "VMHARNESS_VSOCK=kernel"},
		{name: "user forced", mode: ModeUser, b: backends{kernelOK, userOK}, wantKind: KindUser, wantLog: "VMHARNESS_VSOCK=user"},
		{name: "user forced fails", mode: ModeUser, b: backends{kernelOK, userErr}, wantErr: "boom"},
		{name: "unknown mode", mode: "bogus", b: backends{kernelOK, userOK}, wantErr: "unknown mode"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var log logRecorder
			cfg := Config{Mode: tt.mode, RuntimeDir: privateDir(t), Logf: log.logf}
			tr, err := newTransport(context.Background(), cfg, tt.b)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.wantKind, tr.Kind())
			require.Len(t, log.lines, 1)
			assert.Contains(t, log.lines[0], tt.wantLog)
		})
	}
}

// TestNewAutoWithoutDeviceNode runs the real kernel backend against a device
// path that does not exist, as on hosts built without VHOST_VSOCK.
func TestNewAutoWithoutDeviceNode(t *testing.T) {
	dir := privateDir(t)
	missing := filepath.Join(dir, "vhost-vsock")
	var log logRecorder
	var userCalled bool
	b := backends{
		kernel: newKernel,
		user: func(_ context.Context, cfg Config) (Transport, error) {
			userCalled = true
			return &fakeTransport{kind: KindUser, cid: 3}, nil
		},
	}
	tr, err := newTransport(context.Background(), Config{RuntimeDir: dir, KernelDevice: missing, Logf: log.logf}, b)
	require.NoError(t, err)
	assert.True(t, userCalled)
	assert.Equal(t, KindUser, tr.Kind())
	require.Len(t, log.lines, 1)
	assert.Equal(t, "vsock: using userspace vhost-user transport, guest CID 3 (no "+missing+")", log.lines[0])

	_, err = newTransport(context.Background(), Config{Mode: ModeKernel, RuntimeDir: dir, KernelDevice: missing}, b)
	require.ErrorIs(t, err, fs.ErrNotExist)
}

func TestNewChecksRuntimeDir(t *testing.T) {
	open := privateDir(t)
	require.NoError(t, os.Chmod(open, 0o755))
	file := filepath.Join(privateDir(t), "file")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	long := filepath.Join(privateDir(t), strings.Repeat("d", 90))
	require.NoError(t, os.Mkdir(long, 0o700))

	tests := []struct {
		name, dir, wantErr string
	}{
		{"empty", "", "RuntimeDir is empty"},
		{"missing", filepath.Join(open, "nope"), "no such file"},
		{"not a directory", file, "not a directory"},
		{"not private", open, "mode 0755"},
		{"too long", long, "too long"},
	}
	b := backends{
		kernel: func(context.Context, Config) (Transport, error) { panic("backend built despite a bad runtime dir") },
		user:   func(context.Context, Config) (Transport, error) { panic("backend built despite a bad runtime dir") },
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := newTransport(context.Background(), Config{RuntimeDir: tt.dir}, b)
			require.ErrorContains(t, err, tt.wantErr)
		})
	}
}
