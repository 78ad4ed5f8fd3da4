//go:build !linux

package dataplane

import (
	"errors"
	"net/netip"
	"testing"
)

// TestTransparentUnsupported: outside Linux a transparent service is
// refused with a clear error and nothing changes.
func TestTransparentUnsupported(t *testing.T) {
	e, _, _, _ := fakeEngine(t)
	s := Service{ID: 2, VIP: netip.MustParseAddr("192.0.2.9"), Ports: []uint16{4500}, Mode: ModeTransparent}
	err := e.SetServices([]Service{s})
	if !errors.Is(err, ErrTransparent) || !errors.Is(err, ErrInvalidService) {
		t.Fatalf("SetServices = %v, want ErrTransparent", err)
	}
}
