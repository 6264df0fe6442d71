package images

import (
	"bytes"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// Recipe declares what goes into an image. It is read from a JSON file; the
// files it names live in a directory next to it and are copied over the tree,
// owned by root, with mode 0644 (0755 for directories) unless FileModes says
// otherwise. Modes are declared rather than taken from the checkout so the
// image, and its cache key, do not depend on a user's umask.
type Recipe struct {
	// Name names the image in the cache (letters, digits, '-', '_', '.').
	Name string `json:"name"`
	// Distribution is the Debian suite given to mmdebstrap, e.g. "trixie".
	Distribution string `json:"distribution"`
	// Variant is mmdebstrap's --variant, e.g. "minbase".
	Variant string `json:"variant"`
	// Packages are installed on top of the variant (mmdebstrap --include).
	Packages []string `json:"packages"`
	// Files is the directory, relative to the recipe file, whose contents are
	// copied over the root of the tree. Empty means no files.
	Files string `json:"files,omitempty"`
	// FileModes overrides the mode of files under Files, keyed by their
	// slash-separated path relative to Files, e.g. {"usr/local/bin/x": "0755"}.
	FileModes map[string]string `json:"file_modes,omitempty"`
	// EnableUnits and DisableUnits are passed to systemctl enable/disable in
	// the tree after the files are copied in.
	EnableUnits  []string `json:"enable_units,omitempty"`
	DisableUnits []string `json:"disable_units,omitempty"`
	// RootfsSize is the size of the ext4 root file system, as mke2fs takes it
	// (e.g. "2G"). The raw image is sparse, so unused space costs nothing.
	RootfsSize string `json:"rootfs_size"`
	// RootDevice is the block device the root file system appears as in the
	// guest, and KernelCmdline the command line fragment that mounts it.
	RootDevice    string `json:"root_device"`
	KernelCmdline string `json:"kernel_cmdline"`

	// source describes where the recipe came from, for messages.
	source string
	// files holds the tree named by Files; nil when Files is empty.
	files fs.FS
}

// Source says where the recipe was loaded from ("built-in default" or a path).
func (r *Recipe) Source() string { return r.source }

//go:embed default
var builtin embed.FS

// Default returns the built-in recipe, embedded in the binary so vmharness
// works from any directory.
func Default() (*Recipe, error) {
	dir, err := fs.Sub(builtin, "default")
	if err != nil {
		return nil, fmt.Errorf("built-in image recipe: %w", err)
	}
	return loadRecipeFS(dir, "recipe.json", "built-in default recipe")
}

// LoadRecipe reads a recipe file; its Files directory is resolved relative to
// the file's directory.
func LoadRecipe(file string) (*Recipe, error) {
	abs, err := filepath.Abs(file)
	if err != nil {
		return nil, fmt.Errorf("image recipe %s: %w", file, err)
	}
	return loadRecipeFS(os.DirFS(filepath.Dir(abs)), filepath.Base(abs), abs)
}

func loadRecipeFS(dir fs.FS, name, source string) (*Recipe, error) {
	data, err := fs.ReadFile(dir, name)
	if err != nil {
		return nil, fmt.Errorf("image recipe %s: %w", source, err)
	}
	r, err := parseRecipe(data)
	if err != nil {
		return nil, fmt.Errorf("image recipe %s: %w", source, err)
	}
	r.source = source
	if r.Files != "" {
		sub, err := fs.Sub(dir, r.Files)
		if err != nil {
			return nil, fmt.Errorf("image recipe %s: files directory %q: %w", source, r.Files, err)
		}
		if _, err := fs.Stat(sub, "."); err != nil {
			return nil, fmt.Errorf("image recipe %s: files directory %q: %w", source, r.Files, err)
		}
		r.files = sub
	}
	return r, nil
}

// parseRecipe decodes and validates a recipe, rejecting unknown fields so a
// misspelt key fails loudly instead of being ignored.
func parseRecipe(data []byte) (*Recipe, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var r Recipe
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	if dec.More() {
		return nil, errors.New("parse: trailing data after the JSON object")
	}
	if err := r.validate(); err != nil {
		return nil, err
	}
	return &r, nil
}

var (
	nameRE    = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)
	suiteRE   = regexp.MustCompile(`^[a-z][a-z0-9.-]*$`)
	packageRE = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?$`)
	unitRE    = regexp.MustCompile(`^[A-Za-z0-9:_.\\@-]+\.(service|socket|timer|target|path|mount)$`)
	sizeRE    = regexp.MustCompile(`^[1-9][0-9]*[KMGT]?$`)
	modeRE    = regexp.MustCompile(`^0?[0-7]{3}$`)
)

// variants are the mmdebstrap variants a bootable image can be built from.
var variants = map[string]bool{"extract": false, "custom": false, "essential": true, "apt": true, "required": true, "minbase": true, "buildd": true, "important": true, "debootstrap": true, "standard": true}

func (r *Recipe) validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if !nameRE.MatchString(r.Name) {
		bad("name %q: want letters, digits, '.', '_' or '-'", r.Name)
	}
	if !suiteRE.MatchString(r.Distribution) {
		bad("distribution %q: want a Debian suite name such as trixie", r.Distribution)
	}
	if !variants[r.Variant] {
		bad("variant %q: want one of minbase, essential, apt, required, important, standard, buildd, debootstrap", r.Variant)
	}
	if len(r.Packages) == 0 {
		bad("packages: empty; a bootable image needs at least systemd and a kernel")
	}
	for _, p := range r.Packages {
		if !packageRE.MatchString(p) {
			bad("package %q: not a Debian package name", p)
		}
	}
	for _, u := range append(append([]string(nil), r.EnableUnits...), r.DisableUnits...) {
		if !unitRE.MatchString(u) {
			bad("unit %q: not a systemd unit name", u)
		}
	}
	if r.Files != "" && (!fs.ValidPath(r.Files) || r.Files == ".") {
		bad("files %q: want a relative path below the recipe's directory", r.Files)
	}
	if len(r.FileModes) > 0 && r.Files == "" {
		bad("file_modes given without a files directory")
	}
	for p, m := range r.FileModes {
		if !fs.ValidPath(p) || p == "." {
			bad("file_modes: path %q: want a relative slash-separated path", p)
		}
		if !modeRE.MatchString(m) {
			bad("file_modes[%q]: mode %q: want octal such as 0755", p, m)
		}
	}
	if !sizeRE.MatchString(r.RootfsSize) {
		bad("rootfs_size %q: want a size such as 2G", r.RootfsSize)
	}
	if !strings.HasPrefix(r.RootDevice, "/dev/") || path.Clean(r.RootDevice) != r.RootDevice {
		bad("root_device %q: want a device path such as /dev/vda", r.RootDevice)
	}
	if !strings.Contains(" "+r.KernelCmdline+" ", " root=") {
		bad("kernel_cmdline %q: must say root=...", r.KernelCmdline)
	}
	return errors.Join(errs...)
}

// fileMode is the mode a file from the recipe's files directory gets in the
// image.
func (r *Recipe) fileMode(rel string) (fs.FileMode, error) {
	m, ok := r.FileModes[rel]
	if !ok {
		return 0o644, nil
	}
	v, err := strconv.ParseUint(m, 8, 32)
	if err != nil {
		return 0, fmt.Errorf("file_modes[%q]: %w", rel, err)
	}
	return fs.FileMode(v) & fs.ModePerm, nil
}
