package images

import (
	"fmt"
	"io/fs"
	"path"
	"strings"
	"unicode"
)

// checkSymlink checks one entry of a recipe's symlinks: the link's path
// must stay inside the tree, and a relative target must not climb out of
// it, which is always a mistake (an absolute target says it plainly).
func checkSymlink(p, target string) error {
	if strings.HasPrefix(p, "/") {
		return fmt.Errorf("symlinks: path %q: want a path relative to the tree's root, without the leading /", p)
	}
	if !fs.ValidPath(p) || p == "." {
		return fmt.Errorf("symlinks: path %q: want a relative slash-separated path inside the tree, with no . or .. elements", p)
	}
	if target == "" || strings.IndexFunc(target, unicode.IsControl) >= 0 || len(target) >= 4096 {
		return fmt.Errorf("symlinks[%q]: target %q: want a non-empty path without control characters", p, target)
	}
	if path.IsAbs(target) {
		return nil
	}
	depth := strings.Count(p, "/") // directories above the link
	for _, elem := range strings.Split(target, "/") {
		switch elem {
		case "..":
			depth--
		case ".", "":
		default:
			depth++
		}
		if depth < 0 {
			return fmt.Errorf("symlinks[%q]: target %q climbs out of the tree; use an absolute target", p, target)
		}
	}
	return nil
}
