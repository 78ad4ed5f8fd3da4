package loadgen

import (
	"net"

	"golang.org/x/sys/unix"
)

// maxGSOSegments is the kernel's UDP_MAX_SEGMENTS (64 before Linux 5.x
// raised it; the smaller bound works everywhere).
const maxGSOSegments = 64

// setGSO makes every write on c a UDP GSO send cut into datagrams of size
// bytes.
func setGSO(c *net.UDPConn, size int) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT, size)
	}); err != nil {
		return err
	}
	return serr
}
