// Package vhostuser implements the back-end (device) side of QEMU's
// vhost-user protocol (docs/interop/vhost-user.rst) over a Unix socket, for
// one device per connection.
//
// The server handles the front-end's messages (features, protocol features,
// owner, memory table with shared-memory fds, vring setup, config space,
// reset) and hands started virtqueues to a Device. Malformed messages end the
// connection with an error; they never panic the process.
package vhostuser

import "github.com/vmharness/vmharness/harness/virtq"

// Device is a virtio device implemented in the back-end, such as the vsock
// device. The server calls its methods from its own goroutines; the Device
// synchronises its own state.
type Device interface {
	// Features returns the virtio feature bits the device offers (for
	// example VIRTIO_F_VERSION_1). The server adds
	// VHOST_USER_F_PROTOCOL_FEATURES and the ring features its queues
	// implement (virtq.RingFeatures: INDIRECT_DESC and EVENT_IDX).
	Features() uint64
	// Config returns the device configuration space (for vsock: the
	// little-endian 64-bit guest CID).
	Config() []byte
	// NumQueues is the number of virtqueues the back-end serves.
	NumQueues() int
	// Start is called once all NumQueues queues are ready (addresses, kick
	// and call fds set, enabled). features are the negotiated virtio
	// features. queues is indexed by queue number.
	Start(features uint64, queues []virtq.Queue) error
	// Kick is called when the driver kicked queue index (new available
	// buffers). It must not block for long.
	Kick(index int)
	// Stop is called when the front-end stops or resets the queues or
	// disconnects. The device must stop touching the queues (and guest
	// memory) before Stop returns. Start may be called again afterwards.
	Stop()
}
