package images

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func replace(s, old, new string) string {
	if !strings.Contains(s, old) {
		panic("test bug: " + old + " not in recipe")
	}
	return strings.Replace(s, old, new, 1)
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	require.NoError(t, os.WriteFile(path, []byte(content), 0o644))
}
