package layer

import (
	"fmt"
	"path"
	"strings"
)

// baseDirs is what the base image has along the layer's paths: for each
// directory of the base that the layer writes into or below ("" is the
// root), its entries' names and modes (type bits included). A directory
// missing from the map is not a directory of the base.
type baseDirs map[string]map[string]uint32

// parentDirs returns every directory that holds an entry of entries, and
// their ancestors, parents first: what the script needs to know of the
// base.
func parentDirs(entries []entry) []string {
	seen := map[string]bool{}
	var dirs []string
	for _, e := range entries {
		var chain []string
		for d := path.Dir(e.name); ; d = path.Dir(d) {
			if d == "." {
				d = ""
			}
			if seen[d] {
				break
			}
			seen[d] = true
			chain = append(chain, d)
			if d == "" {
				break
			}
		}
		for i := len(chain) - 1; i >= 0; i-- {
			dirs = append(dirs, chain[i])
		}
	}
	return dirs
}

// debugfsScript returns the debugfs commands that write entries into a
// copy of the base image whose directories are base, as extracting the
// layer onto the base would: files and symlinks replace the base's,
// directories the tree lacks are made root's and 0755, directories it
// lists keep the tree's mode, and everything written is root's. entries
// are in depth-first order (scan's), with hard links sharing an ino and
// one of them holding the data (src).
func debugfsScript(entries []entry, base baseDirs) ([]string, error) {
	s := scriptWriter{base: base, created: map[string]bool{}}
	holder := map[uint32]string{} // ino -> the install tree's file of a hard-link group
	for _, e := range entries {
		if e.nlink > 1 && e.mode&modeType == modeRegular && e.src != "" {
			holder[e.ino] = e.src
		}
	}
	firstLink := map[uint32]string{} // ino -> guest path written first
	var linkOrder []uint32
	for _, e := range entries {
		if strings.ContainsAny(e.name, "\n\r") {
			return nil, fmt.Errorf("the install tree has a file name with a line break (%q); a layer cannot hold it", "/"+e.name)
		}
		p := "/" + e.name
		if err := s.ensureParents(e.name); err != nil {
			return nil, err
		}
		mode, exists := s.lookup(e.name)
		isDir := exists && mode&modeType == modeDir
		switch e.mode & modeType {
		case modeDir:
			if exists && !isDir {
				return nil, fmt.Errorf("the install tree has the directory %s, but the base image has a %s there; a layer cannot replace it", p, typeName(mode))
			}
			if !exists {
				s.add("mkdir %s", quote(p))
				s.created[e.name] = true
			}
			s.own(p, e.mode)
		case modeRegular, modeSymlink:
			if isDir {
				return nil, fmt.Errorf("the install tree has %s as a %s, but the base image has a directory there; a layer cannot replace it", p, typeName(e.mode))
			}
			if exists {
				s.add("rm %s", quote(p))
			}
			switch {
			case e.mode&modeType == modeSymlink:
				s.add("symlink %s %s", quote(p), quote(e.target))
				s.own(p, 0)
			case e.nlink > 1 && firstLink[e.ino] != "":
				s.add("ln %s %s", quote(firstLink[e.ino]), quote(p))
			default:
				src := e.src
				if e.nlink > 1 {
					src = holder[e.ino]
					firstLink[e.ino] = p
					linkOrder = append(linkOrder, e.ino)
				}
				if src == "" {
					return nil, fmt.Errorf("the install tree's %s has no data in the layer (a hard link whose file is missing)", p)
				}
				s.add("write %s %s", quote(src), quote(p))
				s.own(p, e.mode)
			}
		default:
			return nil, fmt.Errorf("the install tree has %s, a %s; a layer holds only regular files, directories and symlinks", p, typeName(e.mode))
		}
		// What the script made is what later entries find there.
		s.record(e.name, e.mode)
	}
	// debugfs's ln adds a name without counting it.
	for _, ino := range linkOrder {
		n := 0
		for _, e := range entries {
			if e.ino == ino && e.mode&modeType == modeRegular {
				n++
			}
		}
		s.add("sif %s links_count %d", quote(firstLink[ino]), n)
	}
	return s.cmds, nil
}

type scriptWriter struct {
	base    baseDirs
	created map[string]bool // directories the script makes
	cmds    []string
}

func (s *scriptWriter) add(format string, args ...any) {
	s.cmds = append(s.cmds, fmt.Sprintf(format, args...))
}

// own makes p root's, and gives it mode (type bits included) unless mode
// is 0 (symlinks keep 0777).
func (s *scriptWriter) own(p string, mode uint32) {
	if mode != 0 {
		s.add("sif %s mode 0%o", quote(p), mode)
	}
	s.add("sif %s uid 0", quote(p))
	s.add("sif %s gid 0", quote(p))
}

// lookup says whether name (relative to the root) exists in the image as
// the script leaves it so far, and with which mode.
func (s *scriptWriter) lookup(name string) (mode uint32, exists bool) {
	dir, file := path.Split(name)
	dir = strings.TrimSuffix(dir, "/")
	if s.created[dir] {
		return 0, false
	}
	children, ok := s.base[dir]
	if !ok {
		return 0, false
	}
	mode, exists = children[file]
	return mode, exists
}

// record notes that name now exists with mode, for entries below it.
func (s *scriptWriter) record(name string, mode uint32) {
	dir, file := path.Split(name)
	dir = strings.TrimSuffix(dir, "/")
	if s.created[dir] {
		return
	}
	if s.base[dir] == nil {
		s.base[dir] = map[string]uint32{}
	}
	s.base[dir][file] = mode
}

// ensureParents makes the directories above name that neither the base
// nor the script has made yet, root's and 0755, as cpio or meson install
// would.
func (s *scriptWriter) ensureParents(name string) error {
	parts := strings.Split(name, "/")
	for i := 1; i < len(parts); i++ {
		dir := strings.Join(parts[:i], "/")
		if s.created[dir] {
			continue
		}
		mode, exists := s.lookup(dir)
		switch {
		case !exists:
			p := "/" + dir
			s.add("mkdir %s", quote(p))
			s.own(p, modeDir|0o755)
			s.created[dir] = true
		case mode&modeType == modeDir:
		case mode&modeType == modeSymlink:
			return fmt.Errorf("the install tree has /%s, but /%s is a symlink in the base image; a layer cannot install below it (install to where it points)", name, dir)
		default:
			return fmt.Errorf("the install tree has /%s, but /%s is a %s in the base image", name, dir, typeName(mode))
		}
	}
	return nil
}

// quote quotes a debugfs argument: its command parser (libss) takes a
// double-quoted string literally, with "" for a quote.
func quote(s string) string {
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}
