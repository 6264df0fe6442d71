// Package images builds and caches the base VM image that every vmharness test
// boots: a Debian tree made by mmdebstrap from a declarative recipe, turned
// into a kernel, an initrd and a raw ext4 root file system.
//
// Images are content-addressed: the cache key is a SHA-256 over the recipe,
// the files it drops into the tree and the build procedure's format version,
// so changing any of them yields a new image directory and an unchanged recipe
// is never rebuilt. Concurrent processes that miss the cache serialise on a
// per-key file lock; exactly one builds, the others wait and reuse the result.
// An image becomes visible only by an atomic rename of its finished directory.
//
// The root file system is a raw ext4 image. Runs must not write to it: they
// boot from a per-run qcow2 overlay created with
//
//	qemu-img create -f qcow2 -b ROOTFS -F raw OVERLAY.qcow2
//
// and the kernel command line fragment recorded in the manifest
// (root=/dev/vda rw for the default recipe).
package images
