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

// parseRecipe resolves a root recipe given as JSON, without files.
func parseRecipe(data []byte) (*Recipe, error) {
	f, err := parseRecipeFile(data)
	if err != nil {
		return nil, err
	}
	return resolve(nil, f, nil, "test")
}

// writeRecipe writes recipe.json and its files directory into dir and
// returns the recipe file's path.
func writeRecipe(t *testing.T, dir, recipeJSON string, files map[string]string) string {
	t.Helper()
	writeFile(t, filepath.Join(dir, "recipe.json"), recipeJSON)
	for name, content := range files {
		writeFile(t, filepath.Join(dir, "files", name), content)
	}
	return filepath.Join(dir, "recipe.json")
}
