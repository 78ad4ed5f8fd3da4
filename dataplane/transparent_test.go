//go:build linux

package dataplane

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// checkUDP verifies a UDP header+payload's checksum against the pseudo
// header and returns the ports and payload.
func checkUDP(t *testing.T, src, dst netip.Addr, udp []byte) (sport, dport uint16, payload []byte) {
	t.Helper()
	if len(udp) < udpHeaderLen || int(binary.BigEndian.Uint16(udp[4:])) != len(udp) {
		t.Fatalf("udp length field %d, datagram %d bytes", binary.BigEndian.Uint16(udp[4:]), len(udp))
	}
	var s uint64
	a, b := src.As16(), dst.As16()
	if src.Is4() {
		s = sum16(a[12:], sum16(b[12:], 0))
	} else {
		s = sum16(a[:], sum16(b[:], 0))
	}
	s += 17 + uint64(len(udp))
	s = sum16(udp, s) // checksum field included: the total folds to 0xffff
	if fold(s) != 0xffff {
		t.Fatalf("udp checksum %#04x does not verify (sum %#04x)", binary.BigEndian.Uint16(udp[6:]), fold(s))
	}
	return binary.BigEndian.Uint16(udp[0:]), binary.BigEndian.Uint16(udp[2:]), udp[8:]
}

// reassemble parses the packets one datagram became and returns the IP
// payload (UDP header and data), checking every header on the way.
func reassemble(t *testing.T, pkts [][]byte, src, dst netip.Addr, mtu int) []byte {
	t.Helper()
	var out []byte
	var id uint32
	for i, p := range pkts {
		if len(p) > mtu {
			t.Fatalf("packet %d: %d bytes > mtu %d", i, len(p), mtu)
		}
		var off int
		var more bool
		var body []byte
		if src.Is4() {
			h, err := ipv4.ParseHeader(p)
			if err != nil {
				t.Fatal(err)
			}
			if h.TotalLen != len(p) || h.Protocol != 17 || !h.Src.Equal(src.AsSlice()) || !h.Dst.Equal(dst.AsSlice()) || h.TTL != rawTTL {
				t.Fatalf("packet %d: header %+v", i, h)
			}
			if fold(sum16(p[:ipv4HeaderLen], 0)) != 0xffff {
				t.Fatalf("packet %d: ipv4 header checksum does not verify", i)
			}
			off, more, body = h.FragOff*8, h.Flags&ipv4.MoreFragments != 0, p[h.Len:]
			if len(pkts) > 1 && (i == 0 && h.ID == 0 || i > 0 && uint32(h.ID) != id) {
				t.Fatalf("packet %d: fragment id %d (first %d)", i, h.ID, id)
			}
			id = uint32(h.ID)
		} else {
			h, err := ipv6.ParseHeader(p)
			if err != nil {
				t.Fatal(err)
			}
			if h.PayloadLen != len(p)-ipv6HeaderLen || !h.Src.Equal(src.AsSlice()) || !h.Dst.Equal(dst.AsSlice()) {
				t.Fatalf("packet %d: header %+v", i, h)
			}
			body = p[ipv6HeaderLen:]
			switch h.NextHeader {
			case 17:
			case 44:
				f := body[:ipv6FragLen]
				if f[0] != 17 {
					t.Fatalf("packet %d: fragment next header %d", i, f[0])
				}
				fo := binary.BigEndian.Uint16(f[2:])
				off, more = int(fo&^7), fo&1 != 0
				fid := binary.BigEndian.Uint32(f[4:])
				if i > 0 && fid != id {
					t.Fatalf("packet %d: fragment id %d, first %d", i, fid, id)
				}
				id, body = fid, body[ipv6FragLen:]
			default:
				t.Fatalf("packet %d: next header %d", i, h.NextHeader)
			}
		}
		if off != len(out) {
			t.Fatalf("packet %d at offset %d, want %d", i, off, len(out))
		}
		if more != (i < len(pkts)-1) {
			t.Fatalf("packet %d of %d: more fragments %v", i, len(pkts), more)
		}
		if more && len(body)%8 != 0 {
			t.Fatalf("packet %d: non-final fragment of %d bytes", i, len(body))
		}
		out = append(out, body...)
	}
	return out
}

// TestRawPackets builds the IP packets of UDP datagrams client → backend
// for both families, small and fragmented, and checks them with
// golang.org/x/net's parsers and the checksums' definitions.
func TestRawPackets(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src, dst string
		size     int
		mtu      int
		frags    int
	}{
		{"v4 esp", "198.51.100.2:40001", "10.0.0.11:4500", 120, 1500, 1},
		{"v4 empty", "198.51.100.2:40001", "10.0.0.11:4500", 0, 1500, 1},
		{"v4 keepalive", "198.51.100.2:40001", "10.0.0.11:4500", 1, 1500, 1},
		{"v4 exact mtu", "198.51.100.2:40001", "10.0.0.11:4500", 1500 - 28, 1500, 1},
		{"v4 one over", "198.51.100.2:40001", "10.0.0.11:4500", 1500 - 27, 1500, 2},
		{"v4 ike_auth 3000", "198.51.100.2:500", "10.0.0.11:500", 3000, 1280, 3},
		{"v4 max", "198.51.100.2:500", "10.0.0.11:500", 65507, 1500, 45},
		{"v6 esp", "[2001:db8::2]:40001", "[fd00::11]:4500", 120, 1500, 1},
		{"v6 ike_auth 3000", "[2001:db8::2]:500", "[fd00::11]:500", 3000, 1280, 3},
		{"v6 mtu floor", "[2001:db8::2]:500", "[fd00::11]:500", 2000, 100, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, dst := netip.MustParseAddrPort(tc.src), netip.MustParseAddrPort(tc.dst)
			payload := make([]byte, tc.size)
			for i := range payload {
				payload[i] = byte(i*7 + 3)
			}
			rb := newRawBatch(64)
			var ident uint32
			if !rb.add(payload, src, dst, tc.mtu, 5, &ident) {
				t.Fatal("add refused")
			}
			if rb.n != tc.frags {
				t.Fatalf("%d packets, want %d", rb.n, tc.frags)
			}
			var pkts [][]byte
			for i := 0; i < rb.n; i++ {
				m := &rb.msgs[i]
				if m.slot != 5 || m.dst != dst.Addr() || m.failed {
					t.Fatalf("msg %d: slot %d dst %v failed %v", i, m.slot, m.dst, m.failed)
				}
				pkts = append(pkts, append(append([]byte{}, m.hdr[:m.hlen]...), m.payload...))
			}
			mtu := max(tc.mtu, minMTU)
			udp := reassemble(t, pkts, src.Addr(), dst.Addr(), mtu)
			sp, dp, got := checkUDP(t, src.Addr(), dst.Addr(), udp)
			if sp != src.Port() || dp != dst.Port() || !bytes.Equal(got, payload) {
				t.Fatalf("ports %d→%d, payload %d bytes equal=%v", sp, dp, len(got), bytes.Equal(got, payload))
			}
		})
	}
}

// TestRawBatchFull: a datagram whose packets do not fit is refused whole.
func TestRawBatchFull(t *testing.T) {
	rb := newRawBatch(4)
	var ident uint32
	src, dst := netip.MustParseAddrPort("198.51.100.2:500"), netip.MustParseAddrPort("10.0.0.11:500")
	if !rb.add(make([]byte, 100), src, dst, 1500, 0, &ident) || rb.n != 1 {
		t.Fatal("first")
	}
	if rb.add(make([]byte, 5000), src, dst, 1500, 1, &ident) || rb.n != 1 {
		t.Fatalf("4 fragments fit in 3 free slots: n=%d", rb.n)
	}
}

// TestUDPChecksumZero: a datagram whose checksum computes to 0 carries
// 0xffff, since 0 means "no checksum" (RFC 768).
func TestUDPChecksumZero(t *testing.T) {
	src, dst := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	udp := []byte{0x01, 0xf4, 0x11, 0x94, 0, 10, 0, 0}
	s := fold(sum16(udp[:6], 17+10+uint64(fold(sum16(src.AsSlice(), sum16(dst.AsSlice(), 0))))))
	w := 0xffff - s // makes the one's-complement sum 0xffff
	payload := []byte{byte(w >> 8), byte(w)}
	if c := udpChecksum(src, dst, udp, payload); c != 0xffff {
		t.Fatalf("checksum %#04x, want 0xffff", c)
	}
}

// transparentEngine is fakeEngine with one transparent service.
func transparentEngine(t testing.TB) (*Engine, *listener, *fakeSockets, *countingProposer) {
	fs := &fakeSockets{mtuValue: 1500}
	prop := &countingProposer{}
	e, err := New(Config{Logger: discardLogger(), Table: NewTable(), Proposer: prop, BatchSize: 32, sockets: fs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	s := Service{ID: 1, Name: "vpn", VIP: netip.MustParseAddr("192.0.2.1"), Ports: []uint16{500, 4500},
		Timeout: time.Hour, Mode: ModeTransparent, Key: KeySourceIP, Backends: testBackends(3)}
	if err := e.SetServices([]Service{s}); err != nil {
		t.Fatal(err)
	}
	return e, e.listeners[netip.MustParseAddrPort("192.0.2.1:4500")], fs, prop
}

// TestTransparentBatch: a batch goes out on the listener's raw socket in
// one Send, sourced from each client's address and port, to the backend
// Pick chose on the same port; nothing is dialled; once the flows exist no
// allocation.
func TestTransparentBatch(t *testing.T) {
	e, l, fs, prop := transparentEngine(t)
	if l == nil || l.raw == nil || l.mode != ModeTransparent {
		t.Fatalf("listener %+v", l)
	}
	raw := l.raw.(*fakeRaw)
	raw.keep = true
	b := clientBatch(e, 32)
	l.handleBatch(b, 32, e.now.Load())
	if len(fs.dialled) != 0 || e.Flows() != 16 || prop.n.Load() != 16 {
		t.Fatalf("%d dials, %d flows, %d proposals; want 0, 16, 16", len(fs.dialled), e.Flows(), prop.n.Load())
	}
	if len(raw.last) != 32 {
		t.Fatalf("%d packets sent, want 32", len(raw.last))
	}
	sv := l.svc.Load()
	for i, p := range raw.last {
		h, err := ipv4.ParseHeader(p)
		if err != nil {
			t.Fatal(err)
		}
		client := b.pkts[i].addr
		want, _ := Pick(sv.backends, ClientKey{Service: 1, Client: AddrFrom(client.Addr())})
		src, _ := netip.AddrFromSlice(h.Src.To4())
		dst, _ := netip.AddrFromSlice(h.Dst.To4())
		if src != client.Addr() || dst != want.Addr {
			t.Fatalf("packet %d: %v → %v, want %v → %v", i, src, dst, client.Addr(), want.Addr)
		}
		sp, dp, payload := checkUDP(t, src, dst, p[h.Len:])
		if sp != client.Port() || dp != 4500 || !bytes.Equal(payload, b.pkts[i].buf[:b.pkts[i].n]) {
			t.Fatalf("packet %d: ports %d→%d", i, sp, dp)
		}
	}
	raw.keep = false
	allocs := testing.AllocsPerRun(200, func() { l.handleBatch(b, 32, e.now.Load()) })
	if allocs != 0 {
		t.Fatalf("transparent handleBatch allocates %v per batch", allocs)
	}
	cs := e.Counters()[0]
	if cs.Packets != 32*202 || raw.sent.Load() != 32*202 || cs.Drops != 0 {
		t.Fatalf("counters %+v, raw sent %d", cs, raw.sent.Load())
	}
	raw.failAt = 3
	l.handleBatch(b, 32, e.now.Load())
	if cs := e.Counters()[0]; cs.DropsByReason["send_error"] != 1 {
		t.Fatalf("refused packet not counted: %+v", cs.DropsByReason)
	}
}

// TestTransparentFlowsNotSocketBounded: MaxFlows bounds upstream sockets;
// transparent flows have none, so a busy transparent service is not
// dropped at it (nor at the open-file cap that lowers it).
func TestTransparentFlowsNotSocketBounded(t *testing.T) {
	e, l, _, _ := transparentEngine(t)
	e.cfg.MaxFlows = 4
	l.handleBatch(clientBatch(e, 32), 32, e.now.Load())
	cs := e.Counters()[0]
	if e.Flows() != 16 || cs.DropsByReason["flow_limit"] != 0 || cs.Packets != 32 {
		t.Fatalf("flows %d, counters %+v", e.Flows(), cs)
	}
}

// TestTransparentReplies: replies intercepted from a backend:port go to
// the original destination (the client) out of that port's VIP listener;
// others are counted unmatched; no allocation.
func TestTransparentReplies(t *testing.T) {
	e, l4500, _, _ := transparentEngine(t)
	l500 := e.listeners[netip.MustParseAddrPort("192.0.2.1:500")]
	c4500, c500 := l4500.conn.(*fakeConn), l500.conn.(*fakeConn)
	c4500.keep, c500.keep = true, true
	v4, v6 := e.ReplyPorts()
	if v4 == 0 || v6 != 0 {
		t.Fatalf("reply ports %d, %d; want an IPv4 one only", v4, v6)
	}
	be := testBackends(3)
	b := newBatch(32, 256)
	rs := &replyState{orig: make([]netip.AddrPort, 32), routes: make([]*replyRoute, 32)}
	fill := func() {
		for i := 0; i < 6; i++ {
			p := &b.pkts[i]
			p.n, p.trunc = 10, false
			rs.orig[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}), uint16(40000+i))
			switch i {
			case 0, 1, 2:
				p.addr = netip.AddrPortFrom(be[i].Addr, 4500)
			case 3:
				p.addr = netip.AddrPortFrom(be[0].Addr, 500)
			case 4:
				p.addr = netip.AddrPortFrom(be[0].Addr, 9999) // no such service port
			case 5:
				p.addr = netip.AddrPortFrom(be[1].Addr, 4500)
				rs.orig[i] = netip.AddrPort{} // not intercepted
			}
		}
	}
	fill()
	e.handleReplies(b, 6, rs)
	want4500 := []netip.AddrPort{rs.orig[0], rs.orig[1], rs.orig[2]}
	if !slices.Equal(c4500.dsts, want4500) || !slices.Equal(c500.dsts, []netip.AddrPort{rs.orig[3]}) {
		t.Fatalf("4500 got %v want %v; 500 got %v", c4500.dsts, want4500, c500.dsts)
	}
	if e.UnmatchedReplies() != 2 {
		t.Fatalf("unmatched %d, want 2", e.UnmatchedReplies())
	}
	cs := e.Counters()[0]
	if cs.ReplyPackets != 4 || cs.ReplyBytes != 40 || cs.Backends[0].ReplyPackets != 2 {
		t.Fatalf("counters %+v", cs)
	}
	c4500.keep, c500.keep = false, false
	allocs := testing.AllocsPerRun(200, func() { fill(); e.handleReplies(b, 6, rs) })
	if allocs != 0 {
		t.Fatalf("handleReplies allocates %v", allocs)
	}
}

func TestTransparentModeSwitch(t *testing.T) {
	e, l, fs, _ := fakeEngine(t) // nat
	if l.raw != nil {
		t.Fatal("nat listener has a raw socket")
	}
	s := Service{ID: 1, Name: "vpn", VIP: netip.MustParseAddr("192.0.2.1"), Ports: []uint16{4500},
		Mode: ModeTransparent, Backends: testBackends(3)}
	if err := e.SetServices([]Service{s}); err != nil {
		t.Fatal(err)
	}
	l2 := e.listeners[netip.MustParseAddrPort("192.0.2.1:4500")]
	if l2 == l || l2.raw == nil || len(fs.raws) != 1 {
		t.Fatal("mode change did not reopen the listener in transparent mode")
	}
	s.Mode = ModeNAT
	if err := e.SetServices([]Service{s}); err != nil {
		t.Fatal(err)
	}
	if l3 := e.listeners[netip.MustParseAddrPort("192.0.2.1:4500")]; l3 == l2 || l3.raw != nil {
		t.Fatal("back to nat kept the transparent listener")
	}
	if p := *e.replyRoutes.Load(); len(p) != 0 {
		t.Fatalf("nat service has reply routes %v", p)
	}
}

func TestTransparentValidation(t *testing.T) {
	e, _, _, _ := transparentEngine(t)
	ok := Service{ID: 1, VIP: netip.MustParseAddr("192.0.2.1"), Ports: []uint16{4500}, Mode: ModeTransparent,
		Backends: []Backend{{ID: 1, Addr: netip.MustParseAddr("10.0.0.11"), Weight: 1, State: StateActive}}}
	other := ok
	other.ID, other.VIP = 2, netip.MustParseAddr("192.0.2.2")
	for name, set := range map[string][]Service{
		"family": {func() Service {
			s := ok
			s.Backends = []Backend{{ID: 1, Addr: netip.MustParseAddr("fd00::1"), Weight: 1, State: StateActive}}
			return s
		}()},
		"snat":           {func() Service { s := ok; s.SNAT = netip.MustParseAddr("10.0.0.1"); return s }()},
		"shared backend": {ok, other},
		"shared v4-mapped": {ok, func() Service {
			s := other
			s.Backends = []Backend{{ID: 1, Addr: netip.MustParseAddr("::ffff:10.0.0.11")}}
			return s
		}()},
	} {
		if err := e.SetServices(set); !errors.Is(err, ErrInvalidService) {
			t.Errorf("%s: %v, want ErrInvalidService", name, err)
		}
	}
	// The same backend on other ports, or in a nat service, is fine.
	other.Ports = []uint16{500}
	nat := ok
	nat.ID, nat.VIP, nat.Mode = 3, netip.MustParseAddr("192.0.2.3"), ModeNAT
	if err := e.SetServices([]Service{ok, other, nat}); err != nil {
		t.Fatal(err)
	}
}

func TestOrigDst(t *testing.T) {
	for _, want := range []netip.AddrPort{
		netip.MustParseAddrPort("198.51.100.2:40001"),
		netip.MustParseAddrPort("[2001:db8::2]:4500"),
	} {
		b := origDstCmsg(want)
		if got := origDst(b); got != want {
			t.Fatalf("origDst = %v, want %v", got, want)
		}
		if got := origDst(b[:len(b)-1]); got.IsValid() && got != want {
			t.Fatalf("truncated cmsg gave %v", got)
		}
	}
	if got := origDst(nil); got.IsValid() {
		t.Fatal("empty control")
	}
}

func BenchmarkTransparentBatch(b *testing.B) {
	e, l, _, _ := transparentEngine(b)
	bt := clientBatch(e, 32)
	for i := 0; i < 32; i += 2 {
		k := ClientKey{Service: 1, Client: AddrFrom(bt.pkts[i].addr.Addr())}
		be, _ := Pick(l.svc.Load().backends, k)
		e.table.Put(k, Entry{Backend: be.ID, LastSeen: e.now.Load()})
	}
	l.handleBatch(bt, 32, e.now.Load())
	b.ReportAllocs()
	for b.Loop() {
		l.handleBatch(bt, 32, e.now.Load())
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/32, "ns/datagram")
}

func BenchmarkTransparentReplies(b *testing.B) {
	e, _, _, _ := transparentEngine(b)
	be := testBackends(3)
	bt := newBatch(32, 256)
	rs := &replyState{orig: make([]netip.AddrPort, 32), routes: make([]*replyRoute, 32)}
	b.ReportAllocs()
	for b.Loop() {
		for i := 0; i < 32; i++ {
			bt.pkts[i].n, bt.pkts[i].addr = 120, netip.AddrPortFrom(be[i%3].Addr, 4500)
			rs.orig[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}), 4500)
		}
		e.handleReplies(bt, 32, rs)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/32, "ns/datagram")
}
