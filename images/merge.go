package images

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"slices"
	"strings"
)

// treeEntry is one path of the merged files directories.
type treeEntry struct {
	dir bool
	// fsys is the files directory of the layer that provides a file; a
	// later layer's file of the same path replaces it.
	fsys fs.FS
	// layer names that recipe file, for messages.
	layer string
}

// fileTree maps slash-separated paths relative to the tree's root to the
// directory or file that goes there.
type fileTree map[string]treeEntry

// resolve merges the recipe file f (with its files directory, nil if none)
// over base, the resolved recipe it extends (nil for a root recipe).
//
// Scalars a child may change: distribution, variant, rootfs_size and
// initrd (a child whose tests need an initrd boots through it). The
// name is each file's own. root_device and kernel_cmdline say how the
// harness boots the image and what the base's initrd is made for, so a
// child may only repeat the base's values. Lists are appended without
// duplicates; maps and files are merged by path, the child's entry
// winning.
func resolve(base *Recipe, f *recipeFile, files fs.FS, layer string) (*Recipe, error) {
	r := &Recipe{tree: fileTree{}}
	if base != nil {
		r = base.clone()
	}
	var errs []error
	r.Name = f.Name
	override(&r.Distribution, f.Distribution)
	override(&r.Variant, f.Variant)
	override(&r.RootfsSize, f.RootfsSize)
	if f.Initrd != nil {
		v := *f.Initrd
		r.Initrd = &v
	}
	for _, fixed := range []struct {
		field       string
		have, child string
	}{{"root_device", r.RootDevice, f.RootDevice}, {"kernel_cmdline", r.KernelCmdline, f.KernelCmdline}} {
		if base != nil && fixed.child != "" && fixed.child != fixed.have {
			errs = append(errs, fmt.Errorf("%s %q: differs from the base's %q; the harness boots every image alike, so only a root recipe sets it (leave it out)", fixed.field, fixed.child, fixed.have))
		}
	}
	if base == nil {
		r.RootDevice, r.KernelCmdline = f.RootDevice, f.KernelCmdline
	}
	if !r.BootsInitrd() {
		if bus, err := RootDiskBus(r.RootDevice); err == nil && bus != BusNVMe {
			errs = append(errs, fmt.Errorf("initrd false: the root device %s needs a driver Debian's kernel has only as a module (virtio-blk), so only the initrd can mount it; use root_device /dev/nvme0n1 or boot through the initrd", r.RootDevice))
		}
	}
	r.Packages = appendNew(r.Packages, f.Packages...)
	// A child may turn a unit the base disables back on, and the reverse.
	r.DisableUnits = slices.DeleteFunc(r.DisableUnits, func(u string) bool { return slices.Contains(f.EnableUnits, u) })
	r.EnableUnits = slices.DeleteFunc(r.EnableUnits, func(u string) bool { return slices.Contains(f.DisableUnits, u) })
	r.EnableUnits = appendNew(r.EnableUnits, f.EnableUnits...)
	r.DisableUnits = appendNew(r.DisableUnits, f.DisableUnits...)
	if err := r.addSysusers(f.Sysusers); err != nil {
		errs = append(errs, err)
	}
	if err := r.addLayerFiles(files, layer); err != nil {
		errs = append(errs, err)
	}
	if err := r.addSymlinks(f.Symlinks, layer); err != nil {
		errs = append(errs, err)
	}
	for p, m := range f.FileModes {
		if r.FileModes == nil {
			r.FileModes = map[string]string{}
		}
		r.FileModes[p] = m
	}
	if len(errs) == 0 {
		errs = append(errs, r.checkMerged())
	}
	return r, errors.Join(errs...)
}

func (r *Recipe) clone() *Recipe {
	c := *r
	c.Packages = slices.Clone(r.Packages)
	c.EnableUnits = slices.Clone(r.EnableUnits)
	c.DisableUnits = slices.Clone(r.DisableUnits)
	c.Sysusers = slices.Clone(r.Sysusers)
	c.FileModes = maps.Clone(r.FileModes)
	c.Symlinks = maps.Clone(r.Symlinks)
	c.tree = maps.Clone(r.tree)
	if c.tree == nil {
		c.tree = fileTree{}
	}
	return &c
}

func override(field *string, child string) {
	if child != "" {
		*field = child
	}
}

// appendNew appends the items not in list yet, keeping first occurrences.
func appendNew(list []string, items ...string) []string {
	for _, it := range items {
		if !slices.Contains(list, it) {
			list = append(list, it)
		}
	}
	return list
}

// addLayerFiles merges one layer's files directory over the tree. A file
// replaces the base's file or symlink of the same path; a path that is a
// directory in one layer and not in another is an error, as is anything but
// a regular file or directory: the embedded recipe cannot hold symlinks and
// a checkout may not either, so links are declared in "symlinks" instead.
func (r *Recipe) addLayerFiles(files fs.FS, layer string) error {
	if files == nil {
		return nil
	}
	return fs.WalkDir(files, ".", func(rel string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("files: %w", err)
		}
		if rel == "." {
			return nil
		}
		old, exists := r.tree[rel]
		switch {
		case d.IsDir():
			if exists && !old.dir {
				return fmt.Errorf("files: %s is a directory here but a file in %s", rel, old.layer)
			}
			if _, isLink := r.Symlinks[rel]; isLink {
				return fmt.Errorf("files: %s is a directory here but a symlink in a base's symlinks", rel)
			}
			r.tree[rel] = treeEntry{dir: true, layer: layer}
		case d.Type().IsRegular():
			if exists && old.dir {
				return fmt.Errorf("files: %s is a file here but a directory in %s", rel, old.layer)
			}
			delete(r.Symlinks, rel)
			r.tree[rel] = treeEntry{fsys: files, layer: layer}
		case d.Type()&fs.ModeSymlink != 0:
			return fmt.Errorf("files: %s is a symlink; symlinks in the files directory are not followed or copied: declare it in the recipe's \"symlinks\" instead", rel)
		default:
			return fmt.Errorf("files: %s is a special file (%v); only regular files and directories are copied", rel, d.Type())
		}
		return nil
	})
}

// addSymlinks merges one layer's symlinks over the tree: a symlink replaces
// the base's file or symlink of the same path.
func (r *Recipe) addSymlinks(links map[string]string, layer string) error {
	var errs []error
	for _, p := range sortedKeys(links) {
		if old, ok := r.tree[p]; ok {
			if old.dir || old.layer == layer {
				errs = append(errs, fmt.Errorf("symlinks: %s is also in the files directory of %s; give it one way only", p, old.layer))
				continue
			}
			delete(r.tree, p)
			delete(r.FileModes, p)
		}
		if r.Symlinks == nil {
			r.Symlinks = map[string]string{}
		}
		r.Symlinks[p] = links[p]
	}
	return errors.Join(errs...)
}

// checkMerged checks what only the merged chain can show.
func (r *Recipe) checkMerged() error {
	var errs []error
	for _, p := range sortedKeys(r.FileModes) {
		if e, ok := r.tree[p]; !ok || e.dir {
			errs = append(errs, fmt.Errorf("file_modes[%q]: no such file in the files directory of the recipe or its bases", p))
		}
	}
	// Nothing may be placed through a symlink: in the tree it would land
	// wherever the link points.
	for _, link := range sortedKeys(r.Symlinks) {
		for _, p := range slices.Concat(sortedKeys(r.tree), sortedKeys(r.Symlinks)) {
			if strings.HasPrefix(p, link+"/") {
				errs = append(errs, fmt.Errorf("symlinks: %s is below the symlink %s; a path cannot be both", p, link))
			}
		}
	}
	if _, ok := r.tree[SysusersConf]; ok {
		errs = append(errs, fmt.Errorf("files: %s is written from the recipe's \"sysusers\"; rename the file", SysusersConf))
	}
	if _, ok := r.Symlinks[SysusersConf]; ok {
		errs = append(errs, fmt.Errorf("symlinks: %s is written from the recipe's \"sysusers\"", SysusersConf))
	}
	return errors.Join(errs...)
}
