package hostnet

import (
	"net/netip"
	"strconv"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	mnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ikelb/ikelb/dataplane"
)

// The nat fast path's ingress stage: stateless NAT of handed-over flows
// at netdev ingress, both ways, with the flow's own upstream socket's
// address and port as the source towards the backend (the socket stays
// open in the engine and holds the port). No routing, no netfilter IP
// hooks, no conntrack. Per nat IPv4 service, in table netdev ikelb_fast:
//
//	map np_ID { client . port . vport → upstream port }             counter per element
//	map na_ID { client . upstream port . vport → upstream address . backend }
//	map ra_ID { backend . vport . upstream . port → VIP . client }   counter per element
//	map rp_ID { VIP . vport . client . upstream port → client port }
//	map cnhop { client → next hop }, map codev { client → ifindex }   (shared)
//	chain in_DEV:
//	  ip daddr VIP (host, not a fragment, TTL > 1, length ≤ MTU; a rule each
//	  for datagrams with and without a UDP checksum, see writePort)
//	     udp sport set ip saddr . udp sport . udp dport map @np_ID
//	     @nh,96,64 set ip saddr . udp sport . udp dport map @na_ID counter name nin_ID
//	     fwd ip to ip daddr map @nhop device ip daddr map @odev
//	  udp sport @ports_ID (host, not a fragment, TTL > 1, length ≤ MTU; likewise two)
//	     @nh,96,64 set ip saddr . udp sport . ip daddr . udp dport map @ra_ID
//	     udp dport set ip saddr . udp sport . ip daddr . udp dport map @rp_ID counter name nrep_ID
//	     fwd ip to ip daddr map @cnhop device ip daddr map @codev
//
// Both addresses go in one 8-byte write: each checksum-fixing write costs
// about as much as a map lookup (perf: nft_payload_set_eval and its copies
// were a fifth of the core with three writes a datagram).
// Each statement looks up what the previous ones left, as the nft CLI
// would compile that text (so that it lists the rules): na_ID is keyed by
// the port np_ID wrote, rp_ID by the addresses ra_ID wrote. A flow missing from np_ID or ra_ID
// leaves the datagram as it came, and the IP stack delivers it to the
// listener or to the flow's socket, where the engine forwards it through
// the same flow: what the stage does not take (fragments, oversized
// datagrams, expiring TTLs) keeps the same addresses and ports. The
// other maps hold an element for every flow in np_ID and ra_ID (same
// transaction), and flows go in only towards backends the ingress plan
// routes and clients with a next hop.

// natKeyType: client address . client port . VIP port.
var natKeyType = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService, nftables.TypeInetService)

// natReplyKeyType: backend address . backend port . upstream address . upstream port.
var natReplyKeyType = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService, nftables.TypeIPAddr, nftables.TypeInetService)

func natMap(t *nftables.Table, prefix string, s *fastService, reply bool, data nftables.SetDatatype, counter bool) *nftables.Set {
	key := natKeyType
	if reply {
		key = natReplyKeyType
	}
	return &nftables.Set{Table: t, Name: prefix + strconv.FormatUint(uint64(s.id), 10), IsMap: true,
		KeyType: key, DataType: data, Concatenation: true, Counter: counter}
}

// natMaps are s's flow maps: requests' port (np, a counter per element)
// and addresses (na), replies' addresses (ra, a counter per element) and
// port (rp).
func natMaps(t *nftables.Table, s *fastService) (np, na, ra, rp *nftables.Set) {
	return natMap(t, "np_", s, false, nftables.TypeInetService, true),
		natMap(t, "na_", s, false, addrPairType, false),
		natMap(t, "ra_", s, true, addrPairType, true),
		natMap(t, "rp_", s, true, nftables.TypeInetService, false)
}

// addrPairType: source address . destination address, written to the IPv4
// header in one 8-byte write (nh + 12).
var addrPairType = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeIPAddr)

func cnhopMap(t *nftables.Table) *nftables.Set {
	return &nftables.Set{Table: t, Name: "cnhop", IsMap: true, KeyType: nftables.TypeIPAddr, DataType: nftables.TypeIPAddr}
}

func codevMap(t *nftables.Table) *nftables.Set {
	return &nftables.Set{Table: t, Name: "codev", IsMap: true, KeyType: nftables.TypeIPAddr, DataType: nftables.TypeIFIndex}
}

func natInCounter(s *fastService) string  { return "nin_" + strconv.FormatUint(uint64(s.id), 10) }
func natRepCounter(s *fastService) string { return "nrep_" + strconv.FormatUint(uint64(s.id), 10) }

// concatPort is a port as a concatenation field: big-endian, padded to 4.
func concatPort(p uint16) []byte { return []byte{byte(p >> 8), byte(p), 0, 0} }

// natKey: client address . port . VIP port.
func natKey(client netip.AddrPort, vport uint16) []byte {
	a := client.Addr().Unmap().As4()
	return append(append(a[:], concatPort(client.Port())...), concatPort(vport)...)
}

func port16(p uint16) []byte { return binaryutil.BigEndian.PutUint16(p) }

// natStateless reports whether s is a service the ingress stage carries
// statelessly when it is active: nat mode, IPv4 (the rules rewrite IPv4
// headers only).
func natStateless(s *fastService) bool { return !s.transparent && !s.v6() }

// natIngressObjects adds s's maps and counters to the netdev table.
func natIngressObjects(c *nftables.Conn, t *nftables.Table, s *fastService) error {
	ports := portsSet(t, s)
	var pe []nftables.SetElement
	for _, p := range s.ports {
		pe = append(pe, nftables.SetElement{Key: port16(p)})
	}
	if err := c.AddSet(ports, pe); err != nil {
		return wrap("nft set "+ports.Name, err)
	}
	np, na, ra, rp := natMaps(t, s)
	for _, m := range []*nftables.Set{np, na, ra, rp} {
		if err := c.AddSet(m, nil); err != nil {
			return wrap("nft map "+m.Name, err)
		}
	}
	c.AddObj(&nftables.CounterObj{Table: t, Name: natInCounter(s)})
	c.AddObj(&nftables.CounterObj{Table: t, Name: natRepCounter(s)})
	return nil
}

// hostChecks: addressed to this host at layer 2, not a fragment, TTL
// left after the hop, no longer than mtu; evaluated in register reg.
func hostChecks(mtu, reg uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyPKTTYPE, Register: reg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte{unix.PACKET_HOST}},
		&expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: 6, Len: 2},
		&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 2, Mask: []byte{0x3f, 0xff}, Xor: []byte{0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte{0, 0}},
		&expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: 8, Len: 1},
		&expr.Cmp{Op: expr.CmpOpGt, Register: reg, Data: []byte{1}},
		&expr.Meta{Key: expr.MetaKeyLEN, Register: reg},
		&expr.Byteorder{SourceRegister: reg, DestRegister: reg, Op: expr.ByteorderHton, Len: 4, Size: 4},
		&expr.Cmp{Op: expr.CmpOpLte, Register: reg, Data: binaryutil.BigEndian.PutUint32(mtu)},
	}
}

func ipv4UDP() []expr.Any {
	return concat([]expr.Any{
		&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(unix.ETH_P_IP)},
	}, isUDP())
}

const (
	ipSaddr, ipDaddr = 12, 16
	ipCsum           = 10
	udpSport         = 0
	udpDport         = 2
	udpCsum          = 6
)

// writeAddrs rewrites both IPv4 addresses (source, then destination:
// nh + 12, 8 bytes) from reg, fixing the IP header checksum and the UDP
// checksum's pseudo-header (left alone when the datagram has none, as
// ESP-in-UDP usually does).
// The nft CLI lists it as "@nh,96,64 set …".
func writeAddrs(reg uint32) *expr.Payload {
	return &expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: reg, Base: expr.PayloadBaseNetworkHeader,
		Offset: ipSaddr, Len: 8, CsumType: expr.CsumTypeInet, CsumOffset: ipCsum, CsumFlags: unix.NFT_PAYLOAD_L4CSUM_PSEUDOHDR}
}

// writePort rewrites a UDP port from reg, fixing the UDP checksum; for a
// datagram without one (zero, as ESP-in-UDP senders leave it) csum is
// false: the kernel's checksum update for a transport-header write does
// not spare a zero checksum (it would write a wrong non-zero one, which
// the server's stack drops), while the address writes' pseudo-header
// update does.
func writePort(reg, off uint32, csum bool) *expr.Payload {
	w := &expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: reg, Base: expr.PayloadBaseTransportHeader,
		Offset: off, Len: 2}
	if csum {
		w.CsumType, w.CsumOffset = expr.CsumTypeInet, udpCsum
	}
	return w
}

// udpChecksum: the datagram has a UDP checksum (has) or none (zero).
func udpChecksum(has bool) []expr.Any {
	op := expr.CmpOpEq
	if has {
		op = expr.CmpOpNeq
	}
	return []expr.Any{
		load(1, expr.PayloadBaseTransportHeader, udpCsum, 2),
		&expr.Cmp{Op: op, Register: 1, Data: []byte{0, 0}},
	}
}

func load(reg uint32, base expr.PayloadBase, off, n uint32) *expr.Payload {
	return &expr.Payload{DestRegister: reg, Base: base, Offset: off, Len: n}
}

func lookup(src, dst uint32, set string) *expr.Lookup {
	return &expr.Lookup{SourceRegister: src, DestRegister: dst, IsDestRegSet: true, SetName: set}
}

// loads puts the payload fields in consecutive 32-bit registers from
// register 1, as the nft CLI does for a concatenation.
func loads(fields ...[3]uint32) []expr.Any {
	var out []expr.Any
	for i, f := range fields {
		reg := uint32(1)
		if i > 0 {
			reg = reg32First + uint32(i)
		}
		out = append(out, load(reg, expr.PayloadBase(f[0]), f[1], f[2]))
	}
	return out
}

// reg32First is NFT_REG32_00, the 32-bit register that register 1 starts at.
const reg32First = 8

var (
	fSaddr = [3]uint32{uint32(expr.PayloadBaseNetworkHeader), ipSaddr, 4}
	fDaddr = [3]uint32{uint32(expr.PayloadBaseNetworkHeader), ipDaddr, 4}
	fSport = [3]uint32{uint32(expr.PayloadBaseTransportHeader), udpSport, 2}
	fDport = [3]uint32{uint32(expr.PayloadBaseTransportHeader), udpDport, 2}
)

// setFrom: field set (the concatenation of from) map @set.
func setFrom(set string, write *expr.Payload, from ...[3]uint32) []expr.Any {
	return append(loads(from...), lookup(1, 1, set), write)
}

// fwdByDaddr: the loads and lookups of "fwd ip to ip daddr map @nhop
// device ip daddr map @odev" (registers 1 and 2 for fwdRule).
func fwdByDaddr(nhop, odev string) []expr.Any {
	return []expr.Any{
		load(1, expr.PayloadBaseNetworkHeader, ipDaddr, 4),
		lookup(1, 1, odev),
		load(2, expr.PayloadBaseNetworkHeader, ipDaddr, 4),
		lookup(2, 2, nhop),
	}
}

// natRequestRules are s's request rules in one interface's chain: one
// for datagrams with a UDP checksum, one for those without. The port
// first (keyed by the client's port), then both addresses in one write
// (keyed by the port just written, the flow's own). The flow lookup
// comes before the host checks (in register 2): a datagram of a client
// the stage does not carry (the conntrack path's, beyond the engine's
// flow limit) leaves each rule after a dozen expressions.
func natRequestRules(t *nftables.Table, chain string, s *fastService, mtu uint32) ([]mnl.Message, error) {
	np, na, _, _ := natMaps(t, s)
	return checksumRules(t, chain, func(csum bool) []expr.Any {
		// No port set: the flow map's key holds the VIP port.
		return concat(ipv4UDP(), []expr.Any{
			load(1, expr.PayloadBaseNetworkHeader, ipDaddr, 4),
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: s.vip.AsSlice()},
		}, udpChecksum(csum),
			loads(fSaddr, fSport, fDport), []expr.Any{lookup(1, 1, np.Name)}, // bumps the flow's counter
			hostChecks(mtu, 2),
			[]expr.Any{writePort(1, udpSport, csum)},
			setFrom(na.Name, writeAddrs(1), fSaddr, fSport, fDport),
			[]expr.Any{&expr.Objref{Type: int(nftables.ObjTypeCounter), Name: natInCounter(s)}},
			fwdByDaddr("nhop", "odev"),
		)
	})
}

// natReplyRules are s's reply rules in one interface's chain, with and
// without a UDP checksum: both addresses first (keyed by the flow's
// socket), then the client's port (keyed by the client address just
// written and the socket's port).
func natReplyRules(t *nftables.Table, chain string, s *fastService, mtu uint32) ([]mnl.Message, error) {
	_, _, ra, rp := natMaps(t, s)
	return checksumRules(t, chain, func(csum bool) []expr.Any {
		return concat(ipv4UDP(), []expr.Any{
			load(1, expr.PayloadBaseTransportHeader, udpSport, 2),
			&expr.Lookup{SourceRegister: 1, SetName: portsSet(t, s).Name},
		}, udpChecksum(csum),
			loads(fSaddr, fSport, fDaddr, fDport), []expr.Any{lookup(1, 1, ra.Name)}, // bumps the flow's counter
			hostChecks(mtu, 2),
			[]expr.Any{writeAddrs(1)},
			setFrom(rp.Name, writePort(1, udpDport, csum), fSaddr, fSport, fDaddr, fDport),
			[]expr.Any{&expr.Objref{Type: int(nftables.ObjTypeCounter), Name: natRepCounter(s)}},
			fwdByDaddr("cnhop", "codev"),
		)
	})
}

// checksumRules are the fwd rules build makes for datagrams with a UDP
// checksum and for those without (see writePort), in that order.
func checksumRules(t *nftables.Table, chain string, build func(csum bool) []expr.Any) ([]mnl.Message, error) {
	var out []mnl.Message
	for _, csum := range []bool{true, false} {
		m, err := fwdRule(t, chain, build(csum), 1, 2)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

// natRAKey: backend address . port . upstream address . port.
func natRAKey(kf dataplane.KernelFlow) []byte {
	return natReplyKey(kf.Backend, kf.Upstream.Addr(), kf.Upstream.Port())
}

// natRPKey: VIP . backend port . client address . upstream port (ra_ID
// has written the VIP and the client's address when rp_ID is looked up).
func natRPKey(kf dataplane.KernelFlow) []byte {
	return natReplyKey(netip.AddrPortFrom(kf.Local.Addr(), kf.Backend.Port()), kf.Client.Addr(), kf.Upstream.Port())
}

func natReplyKey(backend netip.AddrPort, a netip.Addr, port uint16) []byte {
	b, u := backend.Addr().Unmap().As4(), a.Unmap().As4()
	k := append(b[:], concatPort(backend.Port())...)
	k = append(k, u[:]...)
	return append(k, concatPort(port)...)
}

// natElems are a service's flow map elements to add or delete (keys only
// for a delete).
type natElems struct {
	np, na, ra, rp []nftables.SetElement
}

func (e *natElems) add(op natFlowOp) {
	kf := op.kf
	pk := natKey(kf.Client, kf.Local.Port())                                                // → upstream port
	ak := natKey(netip.AddrPortFrom(kf.Client.Addr(), kf.Upstream.Port()), kf.Local.Port()) // → addresses
	rk, rpk := natRAKey(kf), natRPKey(kf)
	if !op.add {
		e.np = append(e.np, nftables.SetElement{Key: pk})
		e.na = append(e.na, nftables.SetElement{Key: ak})
		e.ra = append(e.ra, nftables.SetElement{Key: rk})
		e.rp = append(e.rp, nftables.SetElement{Key: rpk})
		return
	}
	pair := func(src, dst netip.Addr) []byte { return append(src.Unmap().AsSlice(), dst.Unmap().AsSlice()...) }
	e.np = append(e.np, nftables.SetElement{Key: pk, Val: port16(kf.Upstream.Port())})
	e.na = append(e.na, nftables.SetElement{Key: ak, Val: pair(kf.Upstream.Addr(), kf.Backend.Addr())})
	e.ra = append(e.ra, nftables.SetElement{Key: rk, Val: pair(kf.Local.Addr(), kf.Client.Addr())})
	e.rp = append(e.rp, nftables.SetElement{Key: rpk, Val: port16(kf.Client.Port())})
}

// updateFlows applies stateless flow and client next-hop changes in one
// transaction per txElems: deletes, then adds.
func (k *nftFast) updateFlows(flows []natFlowOp, routes []clientRouteOp) error {
	if !k.plan.active() {
		return nil
	}
	for len(flows) > 0 || len(routes) > 0 {
		nf := min(len(flows), txElems/4)
		nr := min(len(routes), max(0, txElems-4*nf)/2)
		if err := k.updateFlowsTx(flows[:nf], routes[:nr]); err != nil {
			return err
		}
		flows, routes = flows[nf:], routes[nr:]
	}
	return nil
}

func (k *nftFast) updateFlowsTx(flows []natFlowOp, routes []clientRouteOp) error {
	c, err := nftables.New()
	if err != nil {
		return wrap("nftables", err)
	}
	t := k.netdevTable()
	type svcElems struct {
		s        *fastService
		del, add natElems
	}
	bySvc := map[uint32]*svcElems{}
	for _, op := range flows {
		e := bySvc[op.svc.id]
		if e == nil {
			e = &svcElems{s: op.svc}
			bySvc[op.svc.id] = e
		}
		if op.add {
			e.add.add(op)
		} else {
			e.del.add(op)
		}
	}
	var delNhop, delOdev, addNhop, addOdev []nftables.SetElement
	for _, r := range routes {
		if r.add {
			n, o := routeElems(map[netip.Addr]ingressRoute{r.client: r.route})
			addNhop, addOdev = append(addNhop, n...), append(addOdev, o...)
		} else {
			delNhop = append(delNhop, nftables.SetElement{Key: r.client.AsSlice()})
			delOdev = append(delOdev, nftables.SetElement{Key: r.client.AsSlice()})
		}
	}
	for _, e := range bySvc {
		np, na, ra, rp := natMaps(t, e.s)
		for _, m := range []struct {
			set   *nftables.Set
			elems []nftables.SetElement
		}{{np, e.del.np}, {na, e.del.na}, {ra, e.del.ra}, {rp, e.del.rp}} {
			if err := deleteElements(c, m.set, m.elems); err != nil {
				return err
			}
		}
	}
	if err := deleteElements(c, cnhopMap(t), delNhop); err != nil {
		return err
	}
	if err := deleteElements(c, codevMap(t), delOdev); err != nil {
		return err
	}
	if err := addElements(c, cnhopMap(t), addNhop); err != nil {
		return err
	}
	if err := addElements(c, codevMap(t), addOdev); err != nil {
		return err
	}
	for _, e := range bySvc {
		np, na, ra, rp := natMaps(t, e.s)
		for _, m := range []struct {
			set   *nftables.Set
			elems []nftables.SetElement
		}{{np, e.add.np}, {na, e.add.na}, {ra, e.add.ra}, {rp, e.add.rp}} {
			if err := addElements(c, m.set, m.elems); err != nil {
				return err
			}
		}
	}
	if err := c.Flush(); err != nil {
		return wrap("nft nat flow maps", err)
	}
	return nil
}

// flowCounts reads the packets the ingress stage matched to each of s's
// flows: requests by (client, VIP port), replies by upstream address.
func (k *nftFast) flowCounts(s *fastService) (map[natReqKey]uint64, map[netip.AddrPort]uint64, error) {
	if !k.plan.active() || !k.natIngress[s.id] {
		return nil, nil, nil
	}
	c, err := nftables.New()
	if err != nil {
		return nil, nil, wrap("nftables", err)
	}
	np, _, ra, _ := natMaps(k.netdevTable(), s)
	reqs, err := c.GetSetElements(np)
	if err != nil {
		return nil, nil, wrap("nft map "+np.Name, err)
	}
	reps, err := c.GetSetElements(ra)
	if err != nil {
		return nil, nil, wrap("nft map "+ra.Name, err)
	}
	req := make(map[natReqKey]uint64, len(reqs))
	for _, e := range reqs {
		if len(e.Key) < 12 || e.Counter == nil {
			continue
		}
		a := netip.AddrFrom4([4]byte(e.Key[:4]))
		req[natReqKey{client: netip.AddrPortFrom(a, uint16(e.Key[4])<<8|uint16(e.Key[5])), vport: uint16(e.Key[8])<<8 | uint16(e.Key[9])}] = e.Counter.Packets
	}
	rep := make(map[netip.AddrPort]uint64, len(reps))
	for _, e := range reps {
		if len(e.Key) < 16 || e.Counter == nil {
			continue
		}
		a := netip.AddrFrom4([4]byte(e.Key[8:12]))
		rep[netip.AddrPortFrom(a, uint16(e.Key[12])<<8|uint16(e.Key[13]))] += e.Counter.Packets
	}
	return req, rep, nil
}

// clientRoute is the next hop towards client through an interface the
// ingress stage hooks (false: none; its replies stay with the IP stack).
func (k *nftFast) clientRoute(client netip.Addr) (ingressRoute, bool) {
	if !k.plan.active() || !client.Is4() {
		return ingressRoute{}, false
	}
	rs, err := netlink.RouteGet(client.AsSlice())
	if err != nil || len(rs) != 1 || rs[0].Type != unix.RTN_UNICAST {
		return ingressRoute{}, false
	}
	r := rs[0]
	hooked := false
	for _, d := range k.plan.devs {
		hooked = hooked || d.index == r.LinkIndex
	}
	if !hooked {
		return ingressRoute{}, false
	}
	via := client
	if gw, ok := netip.AddrFromSlice(r.Gw); ok && gw.Unmap().Is4() {
		via = gw.Unmap()
	}
	return ingressRoute{via: via, index: r.LinkIndex}, true
}

// routed reports whether the installed ingress stage has a next hop for
// backend.
func (k *nftFast) routed(backend netip.Addr) bool {
	_, ok := k.plan.routes[backend]
	return ok && k.plan.active()
}

// ingressNAT returns the nat services whose flows the installed ingress
// stage carries.
func (k *nftFast) ingressNAT() map[uint32]bool {
	if !k.plan.active() {
		return nil
	}
	return k.natIngress
}
