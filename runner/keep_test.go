package runner

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestPrepareKeeperProcess runs a stand-in keeper (this test binary,
// re-executed with the result pipe as fd 3, as runDetached starts it) whose
// foreground has gone: its stderr pipe has no reader. The keeper starts a
// long-running child, as it starts QEMU, logs a line and exits. Prepared,
// it survives the log line and the foreground sees EOF on the result pipe
// at once; unprepared (as before the fix), SIGPIPE kills it and the child
// holds the result pipe open.
func TestPrepareKeeperProcess(t *testing.T) {
	assert.NoError(t, prepareKeeperProcess(func(string) string { return "" }), "not a keeper: nothing to do")

	tests := []struct {
		name    string
		prepare bool
	}{
		{"prepared", true},
		{"unprepared", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resultR, resultW, err := os.Pipe()
			require.NoError(t, err)
			defer resultR.Close()
			stderrR, stderrW, err := os.Pipe()
			require.NoError(t, err)
			require.NoError(t, stderrR.Close(), "the foreground is gone")
			stdout, err := os.CreateTemp(t.TempDir(), "stdout")
			require.NoError(t, err)
			defer stdout.Close()

			cmd := exec.Command(os.Args[0], "-test.run=^TestKeeperProcessHelper$", "-test.count=1")
			cmd.Env = append(os.Environ(), supervisorFDEnv+"=3", "VMHARNESS_TEST_KEEPER_HELPER="+strconv.FormatBool(tt.prepare))
			cmd.ExtraFiles = []*os.File{resultW}
			cmd.Stdout, cmd.Stderr = stdout, stderrW
			require.NoError(t, cmd.Start())
			resultW.Close()
			stderrW.Close()
			waitErr := cmd.Wait()

			out, err := os.ReadFile(stdout.Name())
			require.NoError(t, err)
			t.Logf("keeper stdout:\n%s", out)
			child := 0
			for _, line := range strings.Split(string(out), "\n") {
				if pid, ok := strings.CutPrefix(line, "CHILD "); ok {
					child, err = strconv.Atoi(pid)
					require.NoError(t, err)
				}
			}
			require.NotZero(t, child, "the keeper started its child")
			t.Cleanup(func() { syscall.Kill(child, syscall.SIGKILL) })

			require.NoError(t, resultR.SetReadDeadline(time.Now().Add(2*time.Second)))
			_, readErr := io.ReadAll(resultR)
			if tt.prepare {
				require.NoError(t, waitErr, "the keeper survives writing to the gone foreground's pipe")
				assert.Contains(t, string(out), "STDERR write /dev/stderr: broken pipe")
				assert.NoError(t, readErr, "EOF on the result pipe while the keeper's child still runs")
				return
			}
			var exit *exec.ExitError
			require.ErrorAs(t, waitErr, &exit)
			ws := exit.Sys().(syscall.WaitStatus)
			assert.True(t, ws.Signaled() && ws.Signal() == syscall.SIGPIPE, "killed by SIGPIPE: %v", waitErr)
			assert.True(t, errors.Is(readErr, os.ErrDeadlineExceeded), "the child holds the result pipe: %v", readErr)
		})
	}
}

// TestKeeperProcessHelper is the stand-in keeper of TestPrepareKeeperProcess.
func TestKeeperProcessHelper(t *testing.T) {
	prepare, err := strconv.ParseBool(os.Getenv("VMHARNESS_TEST_KEEPER_HELPER"))
	if err != nil {
		t.Skip("helper for TestPrepareKeeperProcess")
	}
	if prepare {
		require.NoError(t, prepareKeeperProcess(os.Getenv))
	}
	child := exec.Command("sleep", "30") // stands in for QEMU
	require.NoError(t, child.Start())
	fmt.Printf("CHILD %d\n", child.Process.Pid)
	_, err = fmt.Fprintln(os.Stderr, "a log line after the foreground has gone")
	fmt.Printf("STDERR %v\n", err)
}
