//go:build !linux

package hostnet

import "fmt"

func newFastKernel(string) (fastKernel, error) {
	return nil, fmt.Errorf("%w: %w", ErrFastPathUnavailable, ErrUnsupported)
}
