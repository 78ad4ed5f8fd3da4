//go:build !linux

package dataplane

import (
	"fmt"
	"net/netip"
	"runtime"
	"syscall"
)

// transparentSupported: transparent mode needs Linux (IP_TRANSPARENT,
// TPROXY, raw sockets with headers included).
const transparentSupported = false

// freebind is nil here: listeners bind only local addresses.
var freebind func(network, address string, c syscall.RawConn) error

type rawSys struct{}

func (*rawSys) init(*rawBatch) {}

func (kernelSockets) raw(bool) (rawConn, error) {
	return nil, fmt.Errorf("%w: not on %s", ErrTransparent, runtime.GOOS)
}

func (kernelSockets) tproxy(bool, uint16) (replyConn, error) {
	return nil, fmt.Errorf("%w: not on %s", ErrTransparent, runtime.GOOS)
}

func (kernelSockets) mtu(netip.Addr) int { return 0 }

// listenControl: no IP_FREEBIND here, and SO_REUSEPORT is not supported.
func listenControl(reuse bool) func(network, address string, rc syscall.RawConn) error {
	if !reuse {
		return freebind
	}
	return func(string, string, syscall.RawConn) error {
		return fmt.Errorf("%w: so_reuseport on this platform", ErrInvalidConfig)
	}
}
