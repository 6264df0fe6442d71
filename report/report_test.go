package report

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestWrite(t *testing.T) {
	jdir, rdir := t.TempDir(), t.TempDir()
	journal := filepath.Join(jdir, "boot.journal")
	console := filepath.Join(jdir, "boot.try1.console.log")
	require.NoError(t, os.WriteFile(journal, []byte("journal"), 0o644))
	require.NoError(t, os.WriteFile(console, []byte("console"), 0o644))
	// What an earlier run of the same name left is replaced.
	require.NoError(t, os.MkdirAll(filepath.Join(rdir, "boot"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(rdir, "boot", "stale.journal"), nil, 0o644))

	start := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	r := Report{
		Name: "boot", Unit: "boot.service", Result: Result(0), ExitCode: 0,
		Start: start, End: start.Add(time.Minute), ElapsedSeconds: 60,
		Attempts: []Attempt{{Attempt: 1, ExitCode: 99, Reason: "QEMU was killed by signal killed", Retried: true, Files: []string{"boot.try1.console.log"}}},
	}
	dir, err := Write(rdir, r, []string{journal, console})
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(rdir, "boot"), dir)
	got, err := Read(filepath.Join(dir, FileName))
	require.NoError(t, err)
	assert.Equal(t, Format, got.Format)
	assert.Equal(t, []string{"boot.journal", "boot.try1.console.log"}, got.Files)
	assert.Equal(t, "pass", got.Result)
	assert.Equal(t, r.Attempts, got.Attempts)
	assert.True(t, got.Start.Equal(start))
	assert.NoFileExists(t, filepath.Join(dir, "stale.journal"))
	data, err := os.ReadFile(filepath.Join(dir, "boot.journal"))
	require.NoError(t, err)
	assert.Equal(t, "journal", string(data))

	_, err = Write(rdir, Report{Name: "../x"}, nil)
	assert.ErrorContains(t, err, "invalid name")
	dir, err = Write(rdir, Report{Name: "gone"}, []string{filepath.Join(jdir, "missing.journal")})
	assert.ErrorContains(t, err, "missing files")
	assert.FileExists(t, filepath.Join(dir, FileName), "the report is written all the same")
}

func TestResult(t *testing.T) {
	for code, want := range map[int]string{0: "pass", 77: "skip", 99: "error", 1: "fail", 3: "fail"} {
		assert.Equal(t, want, Result(code), "exit %d", code)
	}
}
