// Package layer turns a Meson build directory into a build-tree layer: the
// files `meson install` would put on a system, written into a cached
// image's root file system, so that a VM booted over the layer has the
// project's own init, generators, udev rules, units and libraries in its
// root before PID 1 starts (vmharness run --build-dir).
//
// A layer is a qcow2 image backed by the image's raw rootfs.img that holds
// only the clusters writing the tree changed. It is made without root and
// without mounts: debugfs writes the tree into a scratch copy of
// rootfs.img, e2fsck checks the result, and the clusters in which the copy
// differs from rootfs.img go into the qcow2 (package qcow2). The cached
// image is only ever read.
//
// Layers are content-addressed and cached next to the images, as
// <cache>/layers/<key>.qcow2, where the key hashes the install tree in a
// canonical form (a newc cpio archive with every entry owned by root and
// mtime 0, never written out) and the identity of the rootfs.img it goes
// over, so an unchanged install tree reuses its layer. A run holds a
// shared lock on <key>.lock until it ends, and Prune removes only layers
// whose lock it can take exclusively; builders of one key serialise on
// <key>.build.lock and publish by an atomic rename (internal/flock's
// Entry).
package layer
