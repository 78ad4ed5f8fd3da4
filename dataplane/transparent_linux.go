package dataplane

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// transparentSupported: this platform has IP_TRANSPARENT, TPROXY and raw
// sockets with headers included.
const transparentSupported = true

// freebind is the listeners' socket Control: IP_FREEBIND (IPV6_FREEBIND)
// lets a socket bind a VIP the node does not hold yet, so a VRRP backup
// listens before the address moves to it.
func freebind(network, _ string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		if network == "udp6" {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, 1)
			if serr == nil {
				return
			}
			// Kernels before 4.15: IP_FREEBIND covers IPv6 sockets too.
		}
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_FREEBIND, 1)
	})
	if err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("ip_freebind: %w", serr)
	}
	return nil
}

// rawSys is a rawBatch's syscall scratch: per message one header, two
// iovecs (built header, payload) and a destination address.
type rawSys struct {
	hdrs  []mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6

	wn, wsent int
	werr      error
	rb        *rawBatch
	v6        bool
	wfn       func(fd uintptr) bool
	refusedFn func(i int) // marks a packet the kernel refused
}

func (s *rawSys) init(rb *rawBatch) {
	n := len(rb.msgs)
	s.hdrs = make([]mmsghdr, n)
	s.iovs = make([]unix.Iovec, 2*n)
	s.names = make([]unix.RawSockaddrInet6, n)
	for i := range s.hdrs {
		s.hdrs[i].hdr.Iov = &s.iovs[2*i]
		s.hdrs[i].hdr.Name = (*byte)(unsafe.Pointer(&s.names[i]))
	}
	s.rb = rb
	s.wfn = s.write
	s.refusedFn = func(i int) { s.rb.msgs[i].failed = true }
}

// rawSocket is an IPPROTO_RAW socket: every write is a whole IP packet.
type rawSocket struct {
	f  *os.File
	rc syscall.RawConn
	v6 bool
}

func (kernelSockets) raw(v6 bool) (rawConn, error) {
	fam := unix.AF_INET
	if v6 {
		fam = unix.AF_INET6
	}
	// IPPROTO_RAW implies IP_HDRINCL (IPv6 too since Linux 4.5) and never
	// receives anything, so the socket costs nothing on the input path.
	fd, err := unix.Socket(fam, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return nil, fmt.Errorf("%w: raw socket needs CAP_NET_RAW: %w", ErrTransparent, err)
	}
	if !v6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_HDRINCL, 1); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("%w: ip_hdrincl: %w", ErrTransparent, err)
		}
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4<<20)
	f := os.NewFile(uintptr(fd), "raw")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%w: %w", ErrTransparent, err)
	}
	return &rawSocket{f: f, rc: rc, v6: v6}, nil
}

func (r *rawSocket) Close() error { return r.f.Close() }

func (r *rawSocket) Send(rb *rawBatch) (int, error) {
	if rb.n == 0 {
		return 0, nil
	}
	s := &rb.sys
	for i := 0; i < rb.n; i++ {
		m := &rb.msgs[i]
		s.iovs[2*i].Base = &m.hdr[0]
		s.iovs[2*i].SetLen(m.hlen)
		h := &s.hdrs[i].hdr
		if len(m.payload) > 0 {
			s.iovs[2*i+1].Base = &m.payload[0]
			s.iovs[2*i+1].SetLen(len(m.payload))
			h.SetIovlen(2)
		} else {
			h.SetIovlen(1)
		}
		h.Flags = 0
		// Port 0: a raw socket's "port" is its protocol.
		h.Namelen = encodeSockaddr(&s.names[i], netip.AddrPortFrom(m.dst, 0), r.v6)
	}
	s.wn, s.wsent, s.werr, s.v6 = rb.n, 0, nil, r.v6
	err := r.rc.Write(s.wfn)
	sent := 0
	for i := 0; i < rb.n; i++ {
		if !rb.msgs[i].failed {
			sent++
		}
	}
	if err == nil {
		err = s.werr
	}
	return sent, err
}

// write is the RawConn.Write callback: send until done or the socket is
// full; a packet the kernel refuses is marked failed and skipped.
func (s *rawSys) write(fd uintptr) bool {
	return sendmmsg(fd, s.hdrs, s.wn, &s.wsent, &s.werr, s.refusedFn)
}

func (kernelSockets) mtu(dst netip.Addr) int {
	c, err := net.DialUDP(udpNetwork(dst), nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, 9)))
	if err != nil {
		return 0
	}
	defer c.Close()
	rc, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	mtu := 0
	_ = rc.Control(func(fd uintptr) {
		var v int
		var err error
		if dst.Is4() {
			v, err = unix.GetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU)
		} else {
			v, err = unix.GetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_MTU)
		}
		if err == nil {
			mtu = v
		}
	})
	return mtu
}

// cmsgSpace fits one IP(V6)_ORIGDSTADDR control message.
var cmsgSpace = unix.CmsgSpace(unix.SizeofSockaddrInet6)

// tproxySocket is the IP_TRANSPARENT reply socket with batched reads that
// also return each datagram's original destination.
type tproxySocket struct {
	uc    *net.UDPConn
	rc    syscall.RawConn
	local netip.AddrPort

	// reader state (one reader)
	hdrs    []mmsghdr
	iovs    []unix.Iovec
	names   []unix.RawSockaddrInet6
	control []byte
	rpool   *batchPool
	rb      *batch
	rn      int
	rerr    error
	orig    []netip.AddrPort
	rfn     func(fd uintptr) bool
}

func (k kernelSockets) tproxy(v6 bool, port uint16) (replyConn, error) {
	network, addr := "udp4", netip.AddrPortFrom(netip.IPv4Unspecified(), port)
	if v6 {
		network, addr = "udp6", netip.AddrPortFrom(netip.IPv6Unspecified(), port)
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			set := func(level, opt int) {
				if serr == nil {
					serr = unix.SetsockoptInt(int(fd), level, opt, 1)
				}
			}
			if v6 {
				set(unix.IPPROTO_IPV6, unix.IPV6_V6ONLY)
				set(unix.IPPROTO_IPV6, unix.IPV6_TRANSPARENT)
				set(unix.IPPROTO_IPV6, unix.IPV6_RECVORIGDSTADDR)
			} else {
				set(unix.IPPROTO_IP, unix.IP_TRANSPARENT)
				set(unix.IPPROTO_IP, unix.IP_RECVORIGDSTADDR)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(context.Background(), network, addr.String())
	if err != nil {
		if errors.Is(err, unix.EPERM) {
			return nil, fmt.Errorf("%w: ip_transparent needs CAP_NET_ADMIN: %w", ErrTransparent, err)
		}
		return nil, fmt.Errorf("%w: reply socket %s: %w", ErrTransparent, addr, err)
	}
	uc := pc.(*net.UDPConn)
	if k.bufBytes > 0 {
		_ = uc.SetReadBuffer(k.bufBytes)
		_ = uc.SetWriteBuffer(k.bufBytes)
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		uc.Close()
		return nil, fmt.Errorf("%w: %w", ErrTransparent, err)
	}
	t := &tproxySocket{uc: uc, rc: rc, local: localAddrPort(uc)}
	t.rfn = t.read
	return t, nil
}

func (t *tproxySocket) LocalAddr() netip.AddrPort         { return t.local }
func (t *tproxySocket) Close() error                      { return t.uc.Close() }
func (t *tproxySocket) SetReadDeadline(d time.Time) error { return t.uc.SetReadDeadline(d) }

func (t *tproxySocket) ReadReplies(pool *batchPool, orig []netip.AddrPort) (*batch, int, error) {
	if len(t.hdrs) != pool.size {
		n := pool.size
		t.hdrs = make([]mmsghdr, n)
		t.iovs = make([]unix.Iovec, n)
		t.names = make([]unix.RawSockaddrInet6, n)
		t.control = make([]byte, n*cmsgSpace)
		for i := range t.hdrs {
			t.hdrs[i].hdr.Iov = &t.iovs[i]
			t.hdrs[i].hdr.SetIovlen(1)
		}
	}
	t.rpool, t.rb, t.rn, t.rerr, t.orig = pool, nil, 0, nil, orig
	err := t.rc.Read(t.rfn)
	if err == nil {
		err = t.rerr
	}
	b := t.rb
	t.rb, t.rpool, t.orig = nil, nil, nil
	if err != nil {
		if b != nil {
			pool.put(b)
		}
		return nil, 0, err
	}
	return b, t.rn, nil
}

func (t *tproxySocket) read(fd uintptr) bool {
	if t.rb == nil {
		t.rb = t.rpool.get()
	}
	b := t.rb
	n := min(len(t.hdrs), len(b.pkts), len(t.orig))
	for i := 0; i < n; i++ {
		p := &b.pkts[i]
		t.iovs[i].Base = &p.buf[0]
		t.iovs[i].SetLen(len(p.buf))
		h := &t.hdrs[i].hdr
		h.Name = (*byte)(unsafe.Pointer(&t.names[i]))
		h.Namelen = unix.SizeofSockaddrInet6
		h.Control = &t.control[i*cmsgSpace]
		h.SetControllen(cmsgSpace)
		h.Flags = 0
	}
	for {
		r, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&t.hdrs[0])), uintptr(n), 0, 0, 0)
		switch errno {
		case 0:
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			t.rpool.put(b)
			t.rb = nil
			return false
		default:
			t.rerr = errno
			return true
		}
		got := int(r)
		for i := 0; i < got; i++ {
			p := &b.pkts[i]
			h := &t.hdrs[i]
			p.n = int(h.len)
			p.trunc = h.hdr.Flags&unix.MSG_TRUNC != 0
			p.addr = decodeSockaddr(&t.names[i], h.hdr.Namelen)
			t.orig[i] = origDst(t.control[i*cmsgSpace : i*cmsgSpace+int(h.hdr.Controllen)])
		}
		t.rn = got
		return true
	}
}

// origDst finds IP_ORIGDSTADDR or IPV6_ORIGDSTADDR in a control buffer
// without allocating; the zero AddrPort if there is none.
func origDst(b []byte) netip.AddrPort {
	for len(b) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
		l := int(h.Len)
		if l < unix.SizeofCmsghdr || l > len(b) {
			return netip.AddrPort{}
		}
		data := b[unix.CmsgLen(0):l]
		switch {
		case h.Level == unix.IPPROTO_IP && h.Type == unix.IP_ORIGDSTADDR && len(data) >= unix.SizeofSockaddrInet4:
			port := binary.BigEndian.Uint16(data[2:4])
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte(data[4:8])), port)
		case h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_ORIGDSTADDR && len(data) >= unix.SizeofSockaddrInet6:
			port := binary.BigEndian.Uint16(data[2:4])
			return netip.AddrPortFrom(netip.AddrFrom16([16]byte(data[8:24])).Unmap(), port)
		}
		sp := unix.CmsgSpace(l - unix.CmsgLen(0))
		if sp > len(b) {
			break
		}
		b = b[sp:]
	}
	return netip.AddrPort{}
}

// reusePort sets SO_REUSEPORT (Config.ReusePort).
func reusePort(rc syscall.RawConn) error {
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("so_reuseport: %w", serr)
	}
	return nil
}

// listenControl sets a listener's options before bind: IP_FREEBIND always,
// SO_REUSEPORT when asked.
func listenControl(reuse bool) func(network, address string, rc syscall.RawConn) error {
	if !reuse {
		return freebind
	}
	return func(network, address string, rc syscall.RawConn) error {
		if err := freebind(network, address, rc); err != nil {
			return err
		}
		return reusePort(rc)
	}
}
