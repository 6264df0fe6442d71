//go:build !linux

package journalremote

import "syscall"

func ownProcessGroup() *syscall.SysProcAttr { return nil }
