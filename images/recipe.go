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
	"slices"
	"strconv"
	"strings"
)

// Recipe declares what goes into an image: one recipe file, or a chain of
// them merged into one (see recipeFile.Base). The files the chain names are
// copied over the tree, owned by root, with mode 0644 (0755 for directories)
// unless FileModes says otherwise. Modes are declared rather than taken from
// the checkout so the image, and its cache key, do not depend on a user's
// umask.
//
// Its JSON encoding is the merged recipe; it goes into the cache key and the
// manifest, so it holds no paths of the machine the recipe was read on.
type Recipe struct {
	// Name names the image in the cache (letters, digits, '-', '_', '.').
	Name string `json:"name"`
	// Distribution is the Debian suite given to mmdebstrap, e.g. "trixie".
	Distribution string `json:"distribution"`
	// Variant is mmdebstrap's --variant, e.g. "minbase".
	Variant string `json:"variant"`
	// Packages are installed on top of the variant (mmdebstrap --include).
	Packages []string `json:"packages"`
	// FileModes overrides the mode of files from the files directories,
	// keyed by their slash-separated path in the tree, e.g.
	// {"usr/local/bin/x": "0755"}.
	FileModes map[string]string `json:"file_modes,omitempty"`
	// EnableUnits and DisableUnits are passed to systemctl enable/disable in
	// the tree after the files are copied in.
	EnableUnits  []string `json:"enable_units,omitempty"`
	DisableUnits []string `json:"disable_units,omitempty"`
	// Symlinks maps a path in the tree to a symlink target, created after
	// the files are copied in.
	Symlinks map[string]string `json:"symlinks,omitempty"`
	// Sysusers are sysusers.d(5) lines, written to SysusersConf and applied
	// in the tree at build time.
	Sysusers []string `json:"sysusers,omitempty"`
	// RootfsSize is the size of the ext4 root file system, as mke2fs takes it
	// (e.g. "2G"). The raw image is sparse, so unused space costs nothing.
	RootfsSize string `json:"rootfs_size"`
	// RootDevice is the block device the root file system appears as in the
	// guest, and KernelCmdline the command line fragment that mounts it.
	RootDevice    string `json:"root_device"`
	KernelCmdline string `json:"kernel_cmdline"`
	// Initrd says whether the harness boots the image through the initrd
	// its kernel package made (nil: yes). Without one the kernel mounts
	// the root itself, so its driver must be built in: Debian's cloud
	// kernel has NVMe built in, virtio-blk only as a module.
	Initrd *bool `json:"initrd,omitempty"`

	// source describes where the recipe came from, for messages.
	source string
	// tree is the merged files directories of the chain.
	tree fileTree
}

// recipeFile is one recipe file as written. A file without Base is a root
// recipe and must set every field a build needs; a file with Base sets only
// what it adds or changes (see resolve).
type recipeFile struct {
	// Base is "default" (the built-in recipe) or the path of another recipe
	// file, relative to this file's directory.
	Base          string            `json:"base,omitempty"`
	Name          string            `json:"name"`
	Distribution  string            `json:"distribution,omitempty"`
	Variant       string            `json:"variant,omitempty"`
	Packages      []string          `json:"packages,omitempty"`
	Files         string            `json:"files,omitempty"`
	FileModes     map[string]string `json:"file_modes,omitempty"`
	EnableUnits   []string          `json:"enable_units,omitempty"`
	DisableUnits  []string          `json:"disable_units,omitempty"`
	Symlinks      map[string]string `json:"symlinks,omitempty"`
	Sysusers      []string          `json:"sysusers,omitempty"`
	RootfsSize    string            `json:"rootfs_size,omitempty"`
	RootDevice    string            `json:"root_device,omitempty"`
	KernelCmdline string            `json:"kernel_cmdline,omitempty"`
	Initrd        *bool             `json:"initrd,omitempty"`
}

// Source says where the recipe was loaded from ("built-in default recipe",
// a path, or a path and the bases it extends).
func (r *Recipe) Source() string { return r.source }

// BuiltinBase is the Base value that names the built-in recipe.
const BuiltinBase = "default"

//go:embed default
var builtin embed.FS

// Default returns the built-in recipe, embedded in the binary so vmharness
// works from any directory.
func Default() (*Recipe, error) {
	const where = "image recipe built-in default recipe"
	dir, err := fs.Sub(builtin, "default")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	f, files, err := readRecipeFile(dir, "recipe.json")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	if f.Base != "" {
		return nil, fmt.Errorf("%s: a built-in recipe cannot have a base", where)
	}
	r, err := resolve(nil, f, files, "built-in default recipe")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	r.source = "built-in default recipe"
	return r, nil
}

// LoadRecipe reads a recipe file and the chain of bases it extends. Its
// files directory and a base given as a relative path are resolved relative
// to the file's directory.
func LoadRecipe(file string) (*Recipe, error) {
	return loadChain(file, nil)
}

// maxChain bounds a chain of bases; no sensible project needs more.
const maxChain = 16

// loadChain loads file and its bases; children are the files that named it
// as their base, outermost first, for cycle detection and messages.
func loadChain(file string, children []string) (*Recipe, error) {
	abs, err := filepath.Abs(file)
	if err != nil {
		return nil, fmt.Errorf("image recipe %s: %w", file, err)
	}
	where := "image recipe " + abs
	for i := len(children) - 1; i >= 0; i-- {
		where += ", base of " + children[i]
	}
	// Symlinks resolved, so a cycle through a link to a recipe is found too.
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	for _, c := range children {
		if c == real {
			return nil, fmt.Errorf("image recipe %s: bases form a cycle: %s -> %s", children[0], strings.Join(children, " -> "), real)
		}
	}
	if len(children) >= maxChain {
		return nil, fmt.Errorf("%s: more than %d bases in a chain", where, maxChain)
	}
	f, files, err := readRecipeFile(os.DirFS(filepath.Dir(abs)), filepath.Base(abs))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	var base *Recipe
	switch {
	case f.Base == "":
	case f.Base == BuiltinBase:
		if base, err = Default(); err != nil {
			return nil, err
		}
	default:
		p := f.Base
		if !filepath.IsAbs(p) {
			p = filepath.Join(filepath.Dir(abs), p)
		}
		// The errors of a base's chain name the base and this file already.
		if base, err = loadChain(p, append(slices.Clip(children), real)); err != nil {
			return nil, err
		}
	}
	source := abs
	if base != nil {
		source += ", based on " + base.source
	}
	r, err := resolve(base, f, files, abs)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	r.source = source
	return r, nil
}

// readRecipeFile reads and checks one recipe file in dir and opens its files
// directory (nil if it has none).
func readRecipeFile(dir fs.FS, name string) (*recipeFile, fs.FS, error) {
	data, err := fs.ReadFile(dir, name)
	if err != nil {
		return nil, nil, err
	}
	f, err := parseRecipeFile(data)
	if err != nil {
		return nil, nil, err
	}
	if f.Files == "" {
		return f, nil, nil
	}
	files, err := fs.Sub(dir, f.Files)
	if err == nil {
		_, err = fs.Stat(files, ".")
	}
	if err != nil {
		return nil, nil, fmt.Errorf("files directory %q: %w", f.Files, err)
	}
	return f, files, nil
}

// parseRecipeFile decodes and checks one recipe file, rejecting unknown
// fields so a misspelt key fails loudly instead of being ignored.
func parseRecipeFile(data []byte) (*recipeFile, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var f recipeFile
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	if dec.More() {
		return nil, errors.New("parse: trailing data after the JSON object")
	}
	if err := f.validate(); err != nil {
		return nil, err
	}
	return &f, nil
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

// validate checks the fields one file sets. A root recipe (no base) must
// set every field a build needs; a file with a base may leave them to it.
func (f *recipeFile) validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	root := f.Base == ""
	if f.Base == "." || strings.ContainsRune(f.Base, 0) {
		bad("base %q: want %q or the path of a recipe file", f.Base, BuiltinBase)
	}
	if !nameRE.MatchString(f.Name) {
		bad("name %q: want letters, digits, '.', '_' or '-'", f.Name)
	}
	if (root || f.Distribution != "") && !suiteRE.MatchString(f.Distribution) {
		bad("distribution %q: want a Debian suite name such as trixie", f.Distribution)
	}
	if (root || f.Variant != "") && !variants[f.Variant] {
		bad("variant %q: want one of minbase, essential, apt, required, important, standard, buildd, debootstrap", f.Variant)
	}
	if root && len(f.Packages) == 0 {
		bad("packages: empty; a bootable image needs at least systemd and a kernel")
	}
	for _, p := range f.Packages {
		if !packageRE.MatchString(p) {
			bad("package %q: not a Debian package name", p)
		}
	}
	for _, u := range slices.Concat(f.EnableUnits, f.DisableUnits) {
		if !unitRE.MatchString(u) {
			bad("unit %q: not a systemd unit name", u)
		}
	}
	for _, u := range f.EnableUnits {
		if slices.Contains(f.DisableUnits, u) {
			bad("unit %q: both in enable_units and disable_units", u)
		}
	}
	if f.Files != "" && (!fs.ValidPath(f.Files) || f.Files == ".") {
		bad("files %q: want a relative path below the recipe's directory", f.Files)
	}
	for _, p := range sortedKeys(f.FileModes) {
		if !fs.ValidPath(p) || p == "." {
			bad("file_modes: path %q: want a relative slash-separated path", p)
		}
		if m := f.FileModes[p]; !modeRE.MatchString(m) {
			bad("file_modes[%q]: mode %q: want octal such as 0755", p, m)
		}
	}
	for _, p := range sortedKeys(f.Symlinks) {
		if err := checkSymlink(p, f.Symlinks[p]); err != nil {
			errs = append(errs, err)
		}
	}
	if err := checkSysusers(f.Sysusers); err != nil {
		errs = append(errs, err)
	}
	if (root || f.RootfsSize != "") && !sizeRE.MatchString(f.RootfsSize) {
		bad("rootfs_size %q: want a size such as 2G", f.RootfsSize)
	}
	if (root || f.RootDevice != "") && (!strings.HasPrefix(f.RootDevice, "/dev/") || path.Clean(f.RootDevice) != f.RootDevice) {
		bad("root_device %q: want a device path such as /dev/vda", f.RootDevice)
	}
	if (root || f.KernelCmdline != "") && !strings.Contains(" "+f.KernelCmdline+" ", " root=") {
		bad("kernel_cmdline %q: must say root=...", f.KernelCmdline)
	}
	if f.RootDevice != "" {
		if _, err := RootDiskBus(f.RootDevice); err != nil {
			bad("root_device %q: %v", f.RootDevice, err)
		}
	}
	return errors.Join(errs...)
}

// BootsInitrd reports whether the harness boots the image through its
// initrd.
func (r *Recipe) BootsInitrd() bool { return r.Initrd == nil || *r.Initrd }

// Root disk buses the harness can attach the root file system on.
const (
	BusVirtioBlk = "virtio-blk"
	BusNVMe      = "nvme"
)

// RootDiskBus returns the bus the harness attaches the root disk on so
// that it appears as dev in the guest: /dev/vda on virtio-blk (the only
// virtio disk at boot) or /dev/nvme0n1 on NVMe (the only NVMe controller).
func RootDiskBus(dev string) (string, error) {
	switch dev {
	case "/dev/vda":
		return BusVirtioBlk, nil
	case "/dev/nvme0n1":
		return BusNVMe, nil
	}
	return "", fmt.Errorf("vmharness attaches the root disk as /dev/vda (virtio-blk) or /dev/nvme0n1 (NVMe)")
}

// fileMode is the mode a file from the files directories gets in the image.
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

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
