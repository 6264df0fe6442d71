package vsock

import (
	"fmt"
	"strings"
)

// EnvMode is the environment variable that selects the backend; its value is
// parsed by ParseMode.
const EnvMode = "VMHARNESS_VSOCK"

// Mode says which backend New may choose.
type Mode string

const (
	// ModeAuto uses the kernel's vhost-vsock when /dev/vhost-vsock opens and
	// accepts a guest CID, and the userspace backend otherwise.
	ModeAuto Mode = "auto"
	// ModeKernel requires the kernel's vhost-vsock and fails without it.
	ModeKernel Mode = "kernel"
	// ModeUser always uses the in-process vhost-user-vsock backend.
	ModeUser Mode = "user"
)

// ParseMode parses a VMHARNESS_VSOCK value. The empty string means ModeAuto,
// so an unset variable selects automatically.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(strings.ToLower(strings.TrimSpace(s))); m {
	case "":
		return ModeAuto, nil
	case ModeAuto, ModeKernel, ModeUser:
		return m, nil
	default:
		return "", fmt.Errorf("%s=%q: want %q, %q or %q", EnvMode, s, ModeAuto, ModeKernel, ModeUser)
	}
}
