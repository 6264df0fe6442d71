// Package harness owns the lifecycle of one test VM: it validates the test
// unit and credentials, lays out a private work directory with a
// copy-on-write overlay of the cached image and the VM's devices (extra
// disks, UEFI variable store, a swtpm TPM; devices.go), builds the QEMU
// command line, runs QEMU under a context, listens for the guest's sd_notify messages over
// vsock and turns what it saw into a test outcome.
//
// Subpackages hold the pieces with a job of their own: vsock (the per-VM
// transport), vhostuser, virtq and vsockdev (the userspace vsock device),
// registry (running VMs), admission (how many VMs run at once on a host),
// sshkey, and unitfile (reading and writing systemd unit files).
package harness
