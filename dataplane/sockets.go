package dataplane

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"time"
)

// The kernel-facing side of the packet path: UDP sockets that read and write
// batches of datagrams. Production uses kernelSockets (recvmmsg/sendmmsg on
// Linux, see sockets_linux.go; one datagram per call elsewhere); tests can
// substitute socketOps.

// packet is one datagram slot of a batch.
type packet struct {
	buf   []byte         // the slot's whole buffer; the datagram is buf[:n]
	n     int            // datagram length
	addr  netip.AddrPort // source on read; destination on write (ignored by connected conns)
	trunc bool           // the datagram did not fit in buf and was cut
}

// batch is a set of datagram slots plus the platform's syscall scratch. A
// batch is used by one goroutine at a time.
type batch struct {
	pkts []packet
	sys  sysBatch
}

func newBatch(size, bufLen int) *batch {
	b := &batch{pkts: make([]packet, size)}
	mem := make([]byte, size*bufLen)
	for i := range b.pkts {
		b.pkts[i].buf = mem[i*bufLen : (i+1)*bufLen : (i+1)*bufLen]
	}
	b.sys.init(b)
	return b
}

// batchPool is a bounded free list of batches. Unlike sync.Pool it keeps its
// batches across garbage collections, so a warm packet path never allocates.
type batchPool struct {
	free         chan *batch
	size, bufLen int
}

func newBatchPool(keep, size, bufLen int) *batchPool {
	return &batchPool{free: make(chan *batch, keep), size: size, bufLen: bufLen}
}

func (p *batchPool) get() *batch {
	select {
	case b := <-p.free:
		return b
	default:
		return newBatch(p.size, p.bufLen)
	}
}

func (p *batchPool) put(b *batch) {
	select {
	case p.free <- b:
	default: // enough kept; let the GC have it
	}
}

// conn is a UDP socket as the packet path uses it.
type conn interface {
	// ReadBatch waits for at least one datagram and returns a batch taken
	// from pool holding n ≥ 1 of them in pkts[:n]; the caller puts the batch
	// back. Implementations may hold no batch while waiting, so idle sockets
	// cost no buffer. Only one goroutine may call ReadBatch at a time.
	ReadBatch(pool *batchPool) (b *batch, n int, err error)
	// WriteBatch sends pkts, a subslice of b.pkts, each to its addr (or to
	// the peer of a connected conn). It returns how many were sent and the
	// first error; a datagram the kernel refuses is skipped, not retried.
	WriteBatch(b *batch, pkts []packet) (sent int, err error)
	// SetReadDeadline makes a waiting or later ReadBatch fail with
	// os.ErrDeadlineExceeded at t.
	SetReadDeadline(t time.Time) error
	LocalAddr() netip.AddrPort
	Close() error
}

// rawConn is the transparent forward path's raw IP socket (header
// included).
type rawConn interface {
	// Send sends rb.msgs[:rb.n] and marks the ones the kernel refused
	// (failed); it returns how many were sent and the first error.
	Send(rb *rawBatch) (sent int, err error)
	Close() error
}

// replyConn is the transparent reply path's interception socket.
type replyConn interface {
	// ReadReplies is like conn.ReadBatch and also stores each datagram's
	// original destination (the client) in orig[i]; an invalid orig[i]
	// means the datagram was not intercepted (sent to the socket itself).
	ReadReplies(pool *batchPool, orig []netip.AddrPort) (b *batch, n int, err error)
	LocalAddr() netip.AddrPort
	Close() error
}

// socketOps opens sockets.
type socketOps interface {
	// listen opens an unconnected socket bound to addr. The address need
	// not be local yet (IP_FREEBIND): a backup node binds a VIP it does
	// not hold.
	listen(addr netip.AddrPort) (conn, error)
	// dial opens a socket connected to dst, bound to src when its address
	// is valid (port 0: the kernel's choice; the address need not be local
	// yet, IP_FREEBIND), else to the kernel's choice of both.
	dial(src netip.AddrPort, dst netip.AddrPort) (conn, error)
	// raw opens a raw IPv4 (or IPv6) socket that sends packets with
	// headers included (transparent mode).
	raw(v6 bool) (rawConn, error)
	// tproxy opens the IP_TRANSPARENT reply socket of a family on the
	// wildcard address and port (0: the kernel's choice).
	tproxy(v6 bool, port uint16) (replyConn, error)
	// mtu returns the MTU of the route to dst, or 0 if unknown.
	mtu(dst netip.Addr) int
}

// kernelSockets opens real UDP sockets.
type kernelSockets struct {
	bufBytes  int  // SO_RCVBUF/SO_SNDBUF for listeners; ≤ 0 leaves the default
	reusePort bool // SO_REUSEPORT on listeners (Config.ReusePort)
}

func udpNetwork(a netip.Addr) string {
	if a.Is4() {
		return "udp4"
	}
	return "udp6"
}

func (k kernelSockets) listen(addr netip.AddrPort) (conn, error) {
	lc := net.ListenConfig{Control: listenControl(k.reusePort)}
	pc, err := lc.ListenPacket(context.Background(), udpNetwork(addr.Addr()), addr.String())
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrListen, addr, err)
	}
	uc := pc.(*net.UDPConn)
	if k.bufBytes > 0 {
		// Best effort: the kernel caps them at net.core.[rw]mem_max.
		_ = uc.SetReadBuffer(k.bufBytes)
		_ = uc.SetWriteBuffer(k.bufBytes)
	}
	c, err := newUDPConn(uc, false)
	if err != nil {
		uc.Close()
		return nil, fmt.Errorf("%w: %s: %w", ErrListen, addr, err)
	}
	return c, nil
}

func (k kernelSockets) dial(src netip.AddrPort, dst netip.AddrPort) (conn, error) {
	d := net.Dialer{Control: listenControl(false)}
	if src.Addr().IsValid() {
		d.LocalAddr = net.UDPAddrFromAddrPort(src)
	}
	nc, err := d.Dial(udpNetwork(dst.Addr()), dst.String())
	if err != nil {
		return nil, fmt.Errorf("dial %s from %s: %w", dst, src, err)
	}
	uc := nc.(*net.UDPConn)
	c, err := newUDPConn(uc, true)
	if err != nil {
		uc.Close()
		return nil, fmt.Errorf("dial %s: %w", dst, err)
	}
	return c, nil
}

func localAddrPort(uc *net.UDPConn) netip.AddrPort {
	if a, ok := uc.LocalAddr().(*net.UDPAddr); ok {
		return a.AddrPort()
	}
	return netip.AddrPort{}
}

// addrOnHost reports whether a is an address of one of the host's
// interfaces (in a loopback interface's prefix counts: 127.0.0.0/8).
func addrOnHost(a netip.Addr) (bool, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return false, err
	}
	for _, ifc := range ifs {
		addrs, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, x := range addrs {
			n, ok := x.(*net.IPNet)
			if !ok {
				continue
			}
			p, err := netip.ParsePrefix(n.String())
			if err != nil {
				continue
			}
			if p.Addr().Unmap() == a || (ifc.Flags&net.FlagLoopback != 0 && p.Contains(a)) {
				return true, nil
			}
		}
	}
	return false, nil
}
