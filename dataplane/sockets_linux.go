package dataplane

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Batched UDP I/O with recvmmsg(2) and sendmmsg(2). The syscalls run inside
// syscall.RawConn callbacks, so a socket that would block parks its
// goroutine in the Go netpoller like any net.Conn. Every callback and every
// syscall structure is allocated once (per conn or per batch), so a warm
// read or write does not allocate.

// mmsghdr is struct mmsghdr; Go's padding matches C's on 32- and 64-bit.
type mmsghdr struct {
	hdr unix.Msghdr
	len uint32
}

// sysBatch is a batch's syscall scratch: one header, iovec and socket
// address per slot, and the write callback with its state.
type sysBatch struct {
	hdrs  []mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // large enough for IPv4 too

	wn, wsent, wdropped int
	werr                error
	wfn                 func(fd uintptr) bool
	refusedFn           func(i int) // counts a datagram the kernel refused
}

func (s *sysBatch) init(b *batch) {
	n := len(b.pkts)
	s.hdrs = make([]mmsghdr, n)
	s.iovs = make([]unix.Iovec, n)
	s.names = make([]unix.RawSockaddrInet6, n)
	for i := range s.hdrs {
		s.hdrs[i].hdr.Iov = &s.iovs[i]
		s.hdrs[i].hdr.SetIovlen(1)
	}
	s.wfn = s.write
	s.refusedFn = func(int) { s.wdropped++ }
}

// udpConn is a UDP socket doing batched I/O.
type udpConn struct {
	uc        *net.UDPConn
	rc        syscall.RawConn
	local     netip.AddrPort
	v6        bool // AF_INET6 socket
	connected bool

	// Reader state: ReadBatch is called by one goroutine at a time.
	rpool *batchPool
	rb    *batch
	rn    int
	rerr  error
	rfn   func(fd uintptr) bool
}

func newUDPConn(uc *net.UDPConn, connected bool) (conn, error) {
	rc, err := uc.SyscallConn()
	if err != nil {
		return nil, err
	}
	local := localAddrPort(uc)
	c := &udpConn{uc: uc, rc: rc, local: local, v6: !local.Addr().Is4(), connected: connected}
	c.rfn = c.read
	return c, nil
}

func (c *udpConn) LocalAddr() netip.AddrPort         { return c.local }
func (c *udpConn) Close() error                      { return c.uc.Close() }
func (c *udpConn) SetReadDeadline(t time.Time) error { return c.uc.SetReadDeadline(t) }

func (c *udpConn) ReadBatch(pool *batchPool) (*batch, int, error) {
	c.rpool, c.rb, c.rn, c.rerr = pool, nil, 0, nil
	err := c.rc.Read(c.rfn)
	if err == nil {
		err = c.rerr
	}
	b := c.rb
	c.rb, c.rpool = nil, nil
	if err != nil {
		if b != nil {
			pool.put(b)
		}
		return nil, 0, err
	}
	return b, c.rn, nil
}

// read is the RawConn.Read callback. It takes a batch only while the socket
// has data, so a parked reader holds no buffers.
func (c *udpConn) read(fd uintptr) bool {
	if c.rb == nil {
		c.rb = c.rpool.get()
	}
	b := c.rb
	s := &b.sys
	for i := range b.pkts {
		p := &b.pkts[i]
		s.iovs[i].Base = &p.buf[0]
		s.iovs[i].SetLen(len(p.buf))
		h := &s.hdrs[i].hdr
		h.Name = (*byte)(unsafe.Pointer(&s.names[i]))
		h.Namelen = unix.SizeofSockaddrInet6
		h.Flags = 0
	}
	for {
		r, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&s.hdrs[0])),
			uintptr(len(s.hdrs)), 0, 0, 0)
		switch errno {
		case 0:
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			c.rpool.put(b)
			c.rb = nil
			return false // park until readable
		default:
			c.rerr = errno
			return true
		}
		n := int(r)
		for i := 0; i < n; i++ {
			p := &b.pkts[i]
			h := &s.hdrs[i]
			p.n = int(h.len)
			p.trunc = h.hdr.Flags&unix.MSG_TRUNC != 0
			p.addr = decodeSockaddr(&s.names[i], h.hdr.Namelen)
		}
		c.rn = n
		return true
	}
}

func (c *udpConn) WriteBatch(b *batch, pkts []packet) (int, error) {
	if len(pkts) == 0 {
		return 0, nil
	}
	s := &b.sys
	for i := range pkts {
		p := &pkts[i]
		s.iovs[i].Base = &p.buf[0]
		s.iovs[i].SetLen(p.n)
		h := &s.hdrs[i].hdr
		h.Flags = 0
		if c.connected {
			h.Name, h.Namelen = nil, 0
		} else {
			h.Name = (*byte)(unsafe.Pointer(&s.names[i]))
			h.Namelen = encodeSockaddr(&s.names[i], p.addr, c.v6)
		}
	}
	s.wn, s.wsent, s.wdropped, s.werr = len(pkts), 0, 0, nil
	err := c.rc.Write(s.wfn)
	sent := s.wsent - s.wdropped
	if err == nil {
		err = s.werr
	}
	return sent, err
}

// write is the RawConn.Write callback: send until done or the socket is
// full; a datagram the kernel refuses is skipped.
func (s *sysBatch) write(fd uintptr) bool {
	return sendmmsg(fd, s.hdrs, s.wn, &s.wsent, &s.werr, s.refusedFn)
}

// sendmmsg sends hdrs[*sent:n] on fd until all are sent or the socket is
// full (it then returns false: the caller parks until writable). A datagram
// the kernel refuses is passed to refused with its index and skipped; the
// first such error is kept in *firstErr.
func sendmmsg(fd uintptr, hdrs []mmsghdr, n int, sent *int, firstErr *error, refused func(i int)) bool {
	for *sent < n {
		r, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&hdrs[*sent])),
			uintptr(n-*sent), 0, 0, 0)
		switch errno {
		case 0:
			*sent += int(r)
		case unix.EINTR:
		case unix.EAGAIN:
			return false
		default:
			if *firstErr == nil {
				*firstErr = errno
			}
			refused(*sent)
			*sent++
		}
	}
	return true
}

func decodeSockaddr(sa *unix.RawSockaddrInet6, namelen uint32) netip.AddrPort {
	if namelen < 2 {
		return netip.AddrPort{}
	}
	port := (*[2]byte)(unsafe.Pointer(&sa.Port))
	p := uint16(port[0])<<8 | uint16(port[1])
	switch sa.Family {
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), p)
	case unix.AF_INET6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), p)
	}
	return netip.AddrPort{}
}

func encodeSockaddr(sa *unix.RawSockaddrInet6, ap netip.AddrPort, v6 bool) uint32 {
	a, p := ap.Addr().Unmap(), ap.Port()
	if !v6 {
		if !a.Is4() {
			return 0 // no IPv6 destination on an IPv4 socket: the send fails
		}
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		*sa4 = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: a.As4()}
		port := (*[2]byte)(unsafe.Pointer(&sa4.Port))
		port[0], port[1] = byte(p>>8), byte(p)
		return unix.SizeofSockaddrInet4
	}
	*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: a.As16()}
	port := (*[2]byte)(unsafe.Pointer(&sa.Port))
	port[0], port[1] = byte(p>>8), byte(p)
	return unix.SizeofSockaddrInet6
}

// isConnRefused reports an ICMP port-unreachable surfaced on a connected
// socket: the backend is not listening (yet); the flow stays.
func isConnRefused(err error) bool { return errors.Is(err, unix.ECONNREFUSED) }
