package registry_test

import (
	"fmt"
	"os"
	"os/exec"
	"time"

	"github.com/vmharness/vmharness/harness/registry"
)

// The life of a VM entry as `vmharness run` keeps it.
func Example() {
	dir, _ := os.MkdirTemp("", "vmharness-example")
	defer os.RemoveAll(dir)
	reg, err := registry.Open(dir) // normally registry.RuntimeDir(os.Getenv)
	if err != nil {
		panic(err)
	}

	cid, releaseCID, err := reg.ReserveCID()
	if err != nil {
		panic(err)
	}
	defer releaseCID() // after QEMU has exited

	r, err := reg.Register(registry.Entry{
		Name:         "TEST-01-BASIC",
		CID:          cid,
		Transport:    registry.TransportUser,
		HybridSocket: dir + "/vsock.sock",
		JournalPath:  "/build/TEST-01-BASIC.journal",
		WorkDir:      dir + "/run-1",
	})
	if err != nil {
		panic(err)
	}
	defer r.Remove()

	qemu := exec.Command("sleep", "60") // stands in for QEMU
	if err := qemu.Start(); err != nil {
		panic(err)
	}
	defer func() { qemu.Process.Kill(); qemu.Wait() }()
	if err := r.Update(func(e *registry.Entry) { e.QEMUPID = qemu.Process.Pid }); err != nil {
		panic(err)
	}

	// On failure with --keep: record the deadline; `vmharness stop` then
	// removes WorkDir and the entry.
	_ = r.Update(func(e *registry.Entry) { e.KeptUntil = time.Now().Add(30 * time.Minute) })

	e, _ := reg.LookupCID(cid)
	fmt.Println(e.Name, e.Live(), e.Kept())
	// Output: TEST-01-BASIC true true
}
