// Package layer turns a Meson build directory into a build-tree layer: the
// files `meson install` would put on a system, packed as a newc cpio archive
// that a vmharness guest extracts onto its root file system in the initrd,
// before PID 1 starts (vmharness run --build-dir). That way a test boots the
// project's own init, generators, udev rules, units and libraries, while the
// cached base image stays untouched: the archive is extracted onto the run's
// copy-on-write overlay.
//
// Layers are content-addressed and cached next to the images, as
// <cache>/layers/<sha256 of the archive>.cpio, so an unchanged install tree
// reuses its layer. Builders of one key serialise on <key>.lock and publish
// by an atomic rename; a run holds a shared lock on <key>.lock until it ends,
// and Prune removes only layers whose lock it can take exclusively.
//
// Every archive entry is owned by root and has mtime 0, so the same install
// tree always gives the same bytes, whoever builds it. The archive is made
// in Go, without root and without mounts.
package layer
