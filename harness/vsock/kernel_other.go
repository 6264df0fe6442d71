//go:build !linux

package vsock

import (
	"context"
	"errors"
)

func newKernel(context.Context, Config) (Transport, error) {
	return nil, errors.New("the kernel vhost-vsock backend needs Linux")
}
