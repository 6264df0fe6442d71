// Package vhostusertest drives a vhost-user back-end the way QEMU and a
// guest's virtio driver together would, for tests of the back-end and of the
// devices behind it.
//
// A Driver connects to the back-end's Unix socket, negotiates features,
// hands over guest memory (a memfd, shared over SCM_RIGHTS exactly like
// QEMU's memory-backend-memfd) and sets up split virtqueues in it with real
// kick and call eventfds. Its DriverQueues then play the guest driver: Add
// places buffers in guest memory and publishes them on the available ring,
// Kick signals the kick eventfd, Used waits on the call eventfd for the
// device to return a chain and yields the bytes the device wrote. By
// default the driver is lenient (it always kicks, and looks at the used
// ring every 100 ms even without an interrupt); Options.StrictNotify makes
// it follow the device's notification suppression exactly, as Linux does,
// so that a lost kick or interrupt stalls the test.
//
// Typical use:
//
//	srv, _ := vhostuser.Listen(sock)
//	go srv.Serve(ctx, dev)
//	d := vhostusertest.NewDriver(t, sock, vhostusertest.Options{})
//	q := d.Queue(1)
//	head, _ := q.Add([][]byte{packet}, nil)
//	q.Kick()
//	got, written, _ := q.Used(ctx) // got == head
//
// The guest memory is two regions, like a q35 guest's low and high RAM:
// rings (and indirect tables) at guest physical address 0, data buffers at
// 4 GiB, both at front-end "user" addresses that differ from the guest
// physical ones, so a back-end that confuses the two address spaces fails.
//
// For negative tests the Driver exposes the raw message channel (Send,
// Request, SendRaw) and the rings (SetDescriptor, Publish, Memory).
package vhostusertest
