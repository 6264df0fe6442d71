package vsock

import "github.com/vmharness/vmharness/harness/registry"

// The VM registry is the CIDAllocator the runner plugs in.
var _ CIDAllocator = (*registry.Registry)(nil)
