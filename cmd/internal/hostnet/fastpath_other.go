//go:build !linux

package hostnet

import (
	"fmt"
	"log/slog"
)

func newFastKernel(string, *slog.Logger, bool) (fastKernel, error) {
	return nil, fmt.Errorf("%w: %w", ErrFastPathUnavailable, ErrUnsupported)
}
