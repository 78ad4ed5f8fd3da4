package dataplane

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
)

// Transparent mode (see DESIGN.md, "Transparent mode").
//
// Forward path: the listener writes each client datagram to the backend as
// a complete IP packet on a raw IPPROTO_RAW socket (header included), with
// the client's address and port as source and backend:same-port as
// destination. Nothing per flow is opened in the kernel.
//
// Reply path: the backends route their replies through the balancer; the
// host's nft tproxy rule (set up by the daemon, see cmd/internal/hostnet)
// diverts UDP from a backend:port to a non-local address onto the engine's
// IP_TRANSPARENT reply socket, which reports the original destination (the
// client) with IP_RECVORIGDSTADDR. The engine sends the payload to the
// client from the service's VIP:port listener. The reply route is a
// function of the committed services only (backend address and port →
// listener), so any node with the same services carries any reply.

const (
	ipv4HeaderLen = 20
	ipv6HeaderLen = 40
	ipv6FragLen   = 8
	udpHeaderLen  = 8
	// rawHeaderMax is the largest header built in front of a payload:
	// IPv6, a fragment header and UDP.
	rawHeaderMax = ipv6HeaderLen + ipv6FragLen + udpHeaderLen
	// defaultMTU is assumed toward a backend whose route MTU cannot be read.
	defaultMTU = 1280
	minMTU     = 576
	rawTTL     = 64
)

// rawMsg is one IP packet to send: a built header and a payload slice that
// points into the batch the datagram was read into (not copied).
type rawMsg struct {
	hdr     [rawHeaderMax]byte
	hlen    int
	payload []byte
	dst     netip.Addr // for the socket address
	slot    int        // index of the datagram in its read batch
	failed  bool       // set by rawConn.Send when the kernel refused it
}

// rawBatch is a listener's scratch for the transparent forward path,
// allocated once; msgs[:n] are pending.
type rawBatch struct {
	msgs []rawMsg
	n    int
	sys  rawSys
}

func newRawBatch(size int) *rawBatch {
	rb := &rawBatch{msgs: make([]rawMsg, size)}
	rb.sys.init(rb)
	return rb
}

// fragments returns how many IP packets a UDP datagram of payload length
// n becomes at mtu, and the payload bytes each fragment carries (a
// multiple of 8) when it is more than one.
func fragments(v6 bool, n, mtu int) (count, per int) {
	hl := ipv4HeaderLen
	if v6 {
		hl = ipv6HeaderLen
	}
	total := udpHeaderLen + n // the IP payload
	if hl+total <= mtu {
		return 1, total
	}
	if v6 {
		hl += ipv6FragLen
	}
	per = (mtu - hl) &^ 7
	return (total + per - 1) / per, per
}

// add appends the IP packets carrying one UDP datagram src → dst to rb. It
// reports false, adding nothing, when they do not fit in rb's free space.
// ident supplies fragment identifications.
func (rb *rawBatch) add(payload []byte, src, dst netip.AddrPort, mtu, slot int, ident *uint32) bool {
	v6 := !src.Addr().Is4()
	mtu = max(mtu, minMTU)
	count, per := fragments(v6, len(payload), mtu)
	if rb.n+count > len(rb.msgs) {
		return false
	}
	var udp [udpHeaderLen]byte
	binary.BigEndian.PutUint16(udp[0:], src.Port())
	binary.BigEndian.PutUint16(udp[2:], dst.Port())
	binary.BigEndian.PutUint16(udp[4:], uint16(udpHeaderLen+len(payload)))
	ck := udpChecksum(src.Addr(), dst.Addr(), udp[:], payload)
	binary.BigEndian.PutUint16(udp[6:], ck)

	if count == 1 {
		m := &rb.msgs[rb.n]
		rb.n++
		hl := writeIPHeader(m.hdr[:], v6, src.Addr(), dst.Addr(), udpHeaderLen+len(payload), false, 0, 0, false)
		copy(m.hdr[hl:], udp[:])
		m.hlen, m.payload, m.dst, m.slot, m.failed = hl+udpHeaderLen, payload, dst.Addr(), slot, false
		return true
	}
	// Fragment: the first fragment carries the UDP header and per-8 bytes
	// of payload, the others per bytes each (the last what is left).
	*ident++
	id := *ident
	if !v6 {
		id &= 0xffff
		if id == 0 { // the kernel would replace a zero ID, per fragment
			*ident++
			id = *ident & 0xffff
		}
	}
	off := 0 // offset in the IP payload (UDP header included)
	total := udpHeaderLen + len(payload)
	for i := 0; i < count; i++ {
		m := &rb.msgs[rb.n]
		rb.n++
		size := min(per, total-off)
		more := off+size < total
		hl := writeIPHeader(m.hdr[:], v6, src.Addr(), dst.Addr(), size, true, off, id, more)
		if i == 0 {
			copy(m.hdr[hl:], udp[:])
			m.hlen, m.payload = hl+udpHeaderLen, payload[:size-udpHeaderLen]
		} else {
			m.hlen, m.payload = hl, payload[off-udpHeaderLen:off-udpHeaderLen+size]
		}
		m.dst, m.slot, m.failed = dst.Addr(), slot, false
		off += size
	}
	return true
}

// writeIPHeader writes an IPv4 or IPv6 header (with a fragment header when
// frag) for an IP payload of n bytes at fragment offset off, and returns
// its length.
func writeIPHeader(h []byte, v6 bool, src, dst netip.Addr, n int, frag bool, off int, id uint32, more bool) int {
	if !v6 {
		h = h[:ipv4HeaderLen]
		h[0] = 0x45
		h[1] = 0
		binary.BigEndian.PutUint16(h[2:], uint16(ipv4HeaderLen+n))
		var fo uint16
		if frag {
			fo = uint16(off >> 3)
			if more {
				fo |= 0x2000
			}
		}
		binary.BigEndian.PutUint16(h[4:], uint16(id))
		binary.BigEndian.PutUint16(h[6:], fo)
		h[8] = rawTTL
		h[9] = 17 // UDP
		h[10], h[11] = 0, 0
		s, d := src.As4(), dst.As4()
		copy(h[12:16], s[:])
		copy(h[16:20], d[:])
		binary.BigEndian.PutUint16(h[10:], ^fold(sum16(h, 0)))
		return ipv4HeaderLen
	}
	h[0], h[1], h[2], h[3] = 0x60, 0, 0, 0
	plen := n
	if frag {
		plen += ipv6FragLen
	}
	binary.BigEndian.PutUint16(h[4:], uint16(plen))
	h[6] = 17
	h[7] = rawTTL
	s, d := src.As16(), dst.As16()
	copy(h[8:24], s[:])
	copy(h[24:40], d[:])
	if !frag {
		return ipv6HeaderLen
	}
	h[6] = 44 // fragment header
	f := h[ipv6HeaderLen : ipv6HeaderLen+ipv6FragLen]
	f[0], f[1] = 17, 0
	fo := uint16(off)
	if more {
		fo |= 1
	}
	binary.BigEndian.PutUint16(f[2:], fo)
	binary.BigEndian.PutUint32(f[4:], id)
	return ipv6HeaderLen + ipv6FragLen
}

// udpChecksum is the UDP checksum over the pseudo-header, the header (its
// checksum field zero) and the payload; never 0 (RFC 768: 0 means none).
func udpChecksum(src, dst netip.Addr, udp, payload []byte) uint16 {
	var s uint64
	if src.Is4() {
		a, b := src.As4(), dst.As4()
		s = sum16(a[:], s)
		s = sum16(b[:], s)
	} else {
		a, b := src.As16(), dst.As16()
		s = sum16(a[:], s)
		s = sum16(b[:], s)
	}
	s += 17 + uint64(len(udp)+len(payload))
	s = sum16(udp[:6], s)
	s = sum16(payload, s)
	c := ^fold(s)
	if c == 0 {
		c = 0xffff
	}
	return c
}

// sum16 adds b as big-endian 16-bit words (a trailing odd byte padded with
// zero) to s, eight bytes at a time.
func sum16(b []byte, s uint64) uint64 {
	for len(b) >= 8 {
		v := binary.BigEndian.Uint64(b)
		s += v >> 48
		s += (v >> 32) & 0xffff
		s += (v >> 16) & 0xffff
		s += v & 0xffff
		b = b[8:]
	}
	for len(b) >= 2 {
		s += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint64(b[0]) << 8
	}
	return s
}

func fold(s uint64) uint16 {
	for s > 0xffff {
		s = (s >> 16) + (s & 0xffff)
	}
	return uint16(s)
}

// replyKey is where a reply comes from: a backend address and port.
type replyKey struct {
	addr Addr
	port uint16
}

// replyRoute is where a reply from one backend:port goes: out of the
// listener of the service's VIP:port, counted for the backend.
type replyRoute struct {
	l   *listener
	bc  *backendCounters
	svc *serviceCounters
}

// replyState is a reply loop's scratch, allocated once.
type replyState struct {
	orig   []netip.AddrPort // per slot: the original destination (the client)
	routes []*replyRoute    // per slot after compaction
}

// handleReplies sends each intercepted reply in b.pkts[:n] (source
// backend:port, original destination orig[i]) to its client from the
// listener its route names, one batched write per run of one listener.
// Replies without a route (not from a transparent service's backend and
// port) are dropped and counted in unmatched.
func (e *Engine) handleReplies(b *batch, n int, rs *replyState) {
	routes := e.replyRoutes.Load()
	k := 0
	var unmatched uint64
	for i := 0; i < n; i++ {
		p := &b.pkts[i]
		var r *replyRoute
		if routes != nil && !p.trunc && rs.orig[i].IsValid() {
			r = (*routes)[replyKey{addr: AddrFrom(p.addr.Addr()), port: p.addr.Port()}]
		}
		if r == nil {
			unmatched++
			continue
		}
		b.pkts[i], b.pkts[k] = b.pkts[k], b.pkts[i]
		b.pkts[k].addr = rs.orig[i]
		rs.routes[k] = r
		k++
	}
	if unmatched > 0 {
		e.unmatchedReplies.Add(unmatched)
	}
	for i := 0; i < k; {
		r := rs.routes[i]
		j := i + 1
		var bytes uint64 = uint64(b.pkts[i].n)
		for j < k && rs.routes[j].l == r.l && rs.routes[j].bc == r.bc {
			bytes += uint64(b.pkts[j].n)
			j++
		}
		sent, _ := r.l.conn.WriteBatch(b, b.pkts[i:j])
		if sent > 0 {
			r.bc.replyPackets.Add(uint64(sent))
			r.bc.replyBytes.Add(bytes)
		}
		if lost := uint64(j - i - sent); lost > 0 {
			r.bc.drops.Add(lost)
			r.svc.drops[DropSendError].Add(lost)
		}
		i = j
	}
}

// runReplies reads intercepted replies from rc until it is closed.
func (e *Engine) runReplies(rc replyConn) {
	defer e.wg.Done()
	rs := &replyState{
		orig:   make([]netip.AddrPort, e.cfg.BatchSize),
		routes: make([]*replyRoute, e.cfg.BatchSize),
	}
	var errs uint64
	for {
		b, n, err := rc.ReadReplies(e.pool, rs.orig)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			errs++
			if errs&(errs-1) == 0 { // 1, 2, 4, 8, …: aggregated, never per packet
				e.log.Warn("reply socket read errors", "listen_addr", rc.LocalAddr().String(), "count", errs, "last_error", err)
			}
			continue
		}
		e.handleReplies(b, n, rs)
		e.pool.put(b)
	}
}
