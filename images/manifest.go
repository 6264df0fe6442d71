package images

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// File names inside an image directory.
const (
	KernelFile = "vmlinuz"
	// KernelELFFile is the uncompressed kernel taken out of KernelFile
	// (package vmlinux), when the build could.
	KernelELFFile = "vmlinux"
	InitrdFile    = "initrd.img"
	RootfsFile    = "rootfs.img"
	ManifestFile  = "manifest.json"
	BuildLogFile  = "build.log"
)

// Manifest describes a built image; it is stored as manifest.json in the
// image directory.
type Manifest struct {
	Name          string    `json:"name"`
	FormatVersion int       `json:"format_version"`
	Key           string    `json:"key"`
	Recipe        *Recipe   `json:"recipe"`
	RecipeSource  string    `json:"recipe_source"`
	BuiltAt       time.Time `json:"built_at"`
	BuildSeconds  float64   `json:"build_seconds"`
	BuildMode     string    `json:"build_mode"`
	KernelVersion string    `json:"kernel_version"`
	Kernel        string    `json:"kernel"`
	// KernelELF names the uncompressed kernel with a PVH entry point that
	// the build took out of Kernel; empty when it could not (the build
	// log says why). A direct boot starts it instead of Kernel.
	KernelELF string `json:"kernel_elf,omitempty"`
	Initrd    string `json:"initrd"`
	Rootfs    string `json:"rootfs"`
	// RootfsFormat is the QEMU format of Rootfs ("raw"); a per-run overlay
	// names it with -F.
	RootfsFormat string `json:"rootfs_format"`
	RootDevice   string `json:"root_device"`
	// KernelCmdline is what the kernel command line must contain for the
	// image to boot, e.g. "root=/dev/vda rw".
	KernelCmdline string `json:"kernel_cmdline"`
	// BootInitrd is the recipe's initrd setting: nil or true boots through
	// Initrd, false boots the kernel straight into the root file system.
	BootInitrd *bool     `json:"boot_initrd,omitempty"`
	Packages   []Package `json:"packages"`
}

// BootsInitrd reports whether the image boots through its initrd.
func (m Manifest) BootsInitrd() bool { return m.BootInitrd == nil || *m.BootInitrd }

// Package is one installed Debian package.
type Package struct {
	Name    string `json:"name"`
	Version string `json:"version"`
}

// Image is a built image directory. Paths are absolute.
type Image struct {
	Dir    string
	Kernel string
	// KernelELF is the uncompressed PVH kernel, or "" (Manifest.KernelELF).
	KernelELF    string
	Initrd       string
	Rootfs       string
	RootfsFormat string
	Manifest     Manifest
}

// Open loads the image in dir. A directory without manifest.json (one put
// together by hand and named by VMHARNESS_IMAGE_DIR) is accepted if it holds
// vmlinuz, initrd.img and rootfs.img; it is then assumed to boot with
// root=/dev/vda rw.
func Open(dir string) (*Image, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", dir, err)
	}
	m := Manifest{
		Kernel: KernelFile, Initrd: InitrdFile, Rootfs: RootfsFile, RootfsFormat: "raw",
		RootDevice: "/dev/vda", KernelCmdline: "root=/dev/vda rw",
	}
	data, err := os.ReadFile(filepath.Join(dir, ManifestFile))
	switch {
	case err == nil:
		if err := json.Unmarshal(data, &m); err != nil {
			return nil, fmt.Errorf("image %s: %s: %w", dir, ManifestFile, err)
		}
	case !os.IsNotExist(err):
		return nil, fmt.Errorf("image %s: %w", dir, err)
	}
	img := &Image{Dir: dir, RootfsFormat: m.RootfsFormat, Manifest: m}
	files := []struct {
		dst  *string
		name string
	}{{&img.Kernel, m.Kernel}, {&img.Initrd, m.Initrd}, {&img.Rootfs, m.Rootfs}}
	if m.KernelELF != "" {
		files = append(files, struct {
			dst  *string
			name string
		}{&img.KernelELF, m.KernelELF})
	}
	for _, f := range files {
		if f.name == "" || filepath.IsAbs(f.name) || strings.Contains(f.name, "/") {
			return nil, fmt.Errorf("image %s: %s names file %q: want a plain file name", dir, ManifestFile, f.name)
		}
		p := filepath.Join(dir, f.name)
		info, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", dir, err)
		}
		if !info.Mode().IsRegular() {
			return nil, fmt.Errorf("image %s: %s is not a regular file", dir, p)
		}
		*f.dst = p
	}
	return img, nil
}

// parseDpkgStatus lists the installed packages in a dpkg status file
// (var/lib/dpkg/status), sorted by name.
func parseDpkgStatus(r io.Reader) ([]Package, error) {
	var pkgs []Package
	var cur Package
	var installed bool
	flush := func() {
		if cur.Name != "" && installed {
			pkgs = append(pkgs, cur)
		}
		cur, installed = Package{}, false
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			flush()
			continue
		}
		if line[0] == ' ' || line[0] == '\t' {
			continue // continuation of a multi-line field
		}
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		val = strings.TrimSpace(val)
		switch key {
		case "Package":
			cur.Name = val
		case "Version":
			cur.Version = val
		case "Status":
			installed = strings.HasSuffix(val, " installed")
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read dpkg status: %w", err)
	}
	flush()
	sort.Slice(pkgs, func(i, j int) bool { return pkgs[i].Name < pkgs[j].Name })
	return pkgs, nil
}
