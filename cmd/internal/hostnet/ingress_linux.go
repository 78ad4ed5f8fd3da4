package hostnet

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	mnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The transparent fast path's first stage: nftables netdev ingress chains
// on the node's interfaces. A committed client's request is re-addressed
// to its backend and handed to the backend's next hop on the outgoing
// interface (nft "fwd ip to", which resolves the neighbour and decrements
// the TTL) before the IP stack sees it: no routing lookup, no netfilter IP
// hooks, no conntrack. What it cannot take — a fragment, a datagram
// larger than the smallest outgoing MTU, a TTL about to expire, a backend
// without a unicast route through an Ethernet-like interface, an
// interface that appeared since the last check — goes on to the IP stack,
// where the raw-prerouting rewrite forwards it as before.
//
//	table netdev ikelb_fast {
//	    set ports_ID, map aff_ID { client → backend, counter per element }, counter in_ID   (per transparent IPv4 service)
//	    map nhop { backend → next hop }, map odev { backend → ifindex }
//	    chain in_DEV { type filter hook ingress device DEV priority filter;   (per interface)
//	        meta protocol ip ip daddr VIP meta l4proto udp udp dport @ports_ID
//	        meta pkttype host ip frag-off & 0x3fff == 0 ip ttl > 1 meta length <= MTU
//	        ip daddr set ip saddr map @aff_ID counter name in_ID
//	        fwd ip to ip daddr map @nhop device ip daddr map @odev
//	    }
//	}
//
// Interfaces and routes are read again at every poll: a changed route
// updates the nhop and odev maps, a changed interface set or MTU reinstalls.

// ingressPlan is what the ingress stage hooks and where it sends.
type ingressPlan struct {
	devs   []ingressDev                // the interfaces hooked, by index
	routes map[netip.Addr]ingressRoute // usable backend → next hop
	mtu    uint32                      // the smallest MTU of the routes' interfaces
	devMTU uint32                      // the smallest MTU of the hooked interfaces
}

type ingressDev struct {
	index int
	name  string
}

func (p ingressPlan) active() bool { return len(p.devs) > 0 && len(p.routes) > 0 }

// sameHooks: the same chains and rules (routes go into a map).
func (p ingressPlan) sameHooks(o ingressPlan) bool {
	return p.active() == o.active() && slices.Equal(p.devs, o.devs) && p.mtu == o.mtu && p.devMTU == o.devMTU
}

// planIngress reads the interfaces and the usable backends' routes of the
// transparent and the nat IPv4 services in svcs.
func planIngress(svcs map[uint32]*fastService, withNAT bool) (ingressPlan, error) {
	var p ingressPlan
	var backends []netip.Addr
	for _, id := range sortedIDs(svcs) {
		if s := svcs[id]; s.transparent || (withNAT && natStateless(s)) {
			for _, b := range s.backends {
				backends = append(backends, b)
			}
		}
	}
	if len(backends) == 0 {
		return p, nil
	}
	links, err := netlink.LinkList()
	if err != nil {
		return p, wrap("list interfaces", err)
	}
	mtus := map[int]uint32{}
	for _, l := range links {
		a := l.Attrs()
		// A bridge or bond port is left to its master, which is hooked.
		if a.Flags&net.FlagUp == 0 || a.EncapType != "ether" || a.MasterIndex != 0 {
			continue
		}
		mtus[a.Index] = uint32(a.MTU)
		if p.devMTU == 0 || uint32(a.MTU) < p.devMTU {
			p.devMTU = uint32(a.MTU)
		}
		p.devs = append(p.devs, ingressDev{index: a.Index, name: a.Name})
	}
	slices.SortFunc(p.devs, func(a, b ingressDev) int { return a.index - b.index })
	p.routes = map[netip.Addr]ingressRoute{}
	for _, b := range backends {
		if _, done := p.routes[b]; done {
			continue
		}
		rs, err := netlink.RouteGet(b.AsSlice())
		if err != nil || len(rs) != 1 || rs[0].Type != unix.RTN_UNICAST {
			continue // unreachable or local: the IP stack decides
		}
		r := rs[0]
		mtu, ok := mtus[r.LinkIndex]
		if !ok {
			continue
		}
		via := b
		if gw, ok := netip.AddrFromSlice(r.Gw); ok && gw.Unmap().Is4() {
			via = gw.Unmap()
		}
		if r.MTU > 0 {
			mtu = min(mtu, uint32(r.MTU))
		}
		p.routes[b] = ingressRoute{via: via, index: r.LinkIndex}
		if p.mtu == 0 || mtu < p.mtu {
			p.mtu = mtu
		}
	}
	return p, nil
}

func (k *nftFast) netdevTable() *nftables.Table {
	return &nftables.Table{Name: k.name, Family: nftables.TableFamilyNetdev}
}

// The next hop and the outgoing interface of each usable backend, in two
// maps: a single map with concatenated data would make the rule
// unprintable for the nft CLI (it asserts on the split registers).
func nhopMap(t *nftables.Table) *nftables.Set {
	return &nftables.Set{Table: t, Name: "nhop", IsMap: true, KeyType: nftables.TypeIPAddr, DataType: nftables.TypeIPAddr}
}

// odev's values are host-order ifindexes, as fwd reads them; nft lists
// them as big-endian numbers (github.com/google/nftables cannot write the
// set's data-byteorder userdata that would tell it otherwise).
func odevMap(t *nftables.Table) *nftables.Set {
	return &nftables.Set{Table: t, Name: "odev", IsMap: true, KeyType: nftables.TypeIPAddr, DataType: nftables.TypeIFIndex}
}

func inCounter(s *fastService) string { return "in_" + strconv.FormatUint(uint64(s.id), 10) }

// routeElems are the nhop and odev elements of routes.
func routeElems(routes map[netip.Addr]ingressRoute) (nhop, odev []nftables.SetElement) {
	for b, r := range routes {
		nhop = append(nhop, nftables.SetElement{Key: b.AsSlice(), Val: r.via.AsSlice()})
		odev = append(odev, nftables.SetElement{Key: b.AsSlice(), Val: binaryutil.NativeEndian.PutUint32(uint32(r.index))})
	}
	return nhop, odev
}

// ingressObjects adds the netdev table's sets, maps and counters (not its
// chains) to c's transaction.
func (k *nftFast) ingressObjects(c *nftables.Conn, svcs map[uint32]*fastService, p ingressPlan, byService map[uint32][]nftables.SetElement) error {
	t := k.netdevTable()
	c.AddTable(t)
	nhop, odev := routeElems(p.routes)
	for _, m := range []struct {
		set   *nftables.Set
		elems []nftables.SetElement
	}{{nhopMap(t), nhop}, {odevMap(t), odev}, {cnhopMap(t), nil}, {codevMap(t), nil}} {
		if err := c.AddSet(m.set, nil); err != nil {
			return wrap("nft map "+m.set.Name, err)
		}
		if err := addElements(c, m.set, m.elems); err != nil {
			return err
		}
	}
	for _, id := range sortedIDs(svcs) {
		s := svcs[id]
		if k.natIngress[id] {
			if err := natIngressObjects(c, t, s); err != nil {
				return err
			}
			continue
		}
		if !s.transparent {
			continue
		}
		if _, _, err := addServiceSets(c, t, s, byService[id]); err != nil {
			return err
		}
		c.AddObj(&nftables.CounterObj{Table: t, Name: inCounter(s)})
	}
	return nil
}

// ingressHooks adds the chains and their rules, in transactions of their
// own after the objects': github.com/google/nftables v0.3.0 has no "fwd"
// expression, so the rules go in a netlink batch built here.
func (k *nftFast) ingressHooks(svcs map[uint32]*fastService, p ingressPlan) error {
	t := k.netdevTable()
	c, err := nftables.New()
	if err != nil {
		return wrap("nftables", err)
	}
	prio := nftables.ChainPriorityFilter
	for _, d := range p.devs {
		c.AddChain(&nftables.Chain{Name: "in_" + d.name, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookIngress, Priority: prio, Device: d.name})
	}
	if err := c.Flush(); err != nil {
		return wrap("nft ingress chains", err)
	}
	var rules []mnl.Message
	for _, d := range p.devs {
		for _, id := range sortedIDs(svcs) {
			s := svcs[id]
			if k.natIngress[id] {
				req, err := natRequestRules(t, "in_"+d.name, s, p.mtu)
				if err != nil {
					return err
				}
				reply, err := natReplyRules(t, "in_"+d.name, s, p.devMTU)
				if err != nil {
					return err
				}
				rules = append(append(rules, req...), reply...)
				continue
			}
			if !s.transparent {
				continue
			}
			m, err := ingressRule(t, "in_"+d.name, s, p.mtu)
			if err != nil {
				return err
			}
			rules = append(rules, m)
		}
	}
	return sendBatch(rules)
}

// nft_fwd_netdev's attributes (linux/netfilter/nf_tables.h); x/sys has
// only the first.
const (
	nftaFwdSregAddr = 2 // NFTA_FWD_SREG_ADDR
	nftaFwdNFProto  = 3 // NFTA_FWD_NFPROTO
)

// ingressRule is one service's rule in one interface's chain.
func ingressRule(t *nftables.Table, chain string, s *fastService, mtu uint32) (mnl.Message, error) {
	ports, aff := portsSet(t, s), affMap(t, s)
	src, dst, n := addrOffsets(s)
	const ipCsumOffset = 10
	exprs := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(unix.ETH_P_IP)},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: dst, Len: n},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: s.vip.AsSlice()},
	}
	exprs = append(exprs, isUDP()...)
	exprs = append(exprs,
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: ports.Name},
	)
	exprs = append(exprs, hostChecks(mtu, 1)...)
	exprs = append(exprs,
		// ip daddr set ip saddr map @aff counter name in_ID
		// fwd ip to ip daddr map @nhop device ip daddr map @odev: the
		// nft CLI's own bytecode for that statement, so that it lists
		// the rule. A client not in the map leaves the packet as it came;
		// a backend missing from nhop/odev (no route a moment ago)
		// leaves it re-addressed, and the IP stack routes it to the
		// backend.
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: src, Len: n},
		&expr.Lookup{SourceRegister: 1, DestRegister: 1, IsDestRegSet: true, SetName: aff.Name},
		&expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: 1, Base: expr.PayloadBaseNetworkHeader,
			Offset: dst, Len: n, CsumType: expr.CsumTypeInet, CsumOffset: ipCsumOffset, CsumFlags: unix.NFT_PAYLOAD_L4CSUM_PSEUDOHDR},
		&expr.Objref{Type: int(nftables.ObjTypeCounter), Name: inCounter(s)},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: dst, Len: n},
		&expr.Lookup{SourceRegister: 1, DestRegister: 1, IsDestRegSet: true, SetName: "odev"},
		&expr.Payload{DestRegister: 2, Base: expr.PayloadBaseNetworkHeader, Offset: dst, Len: n},
		&expr.Lookup{SourceRegister: 2, DestRegister: 2, IsDestRegSet: true, SetName: "nhop"},
	)
	return fwdRule(t, chain, exprs, 1, 2)
}

// fwdRule is a netdev rule of exprs ending in "fwd ip to" the address in
// register addrReg through the interface in devReg, appended to chain.
func fwdRule(t *nftables.Table, chain string, exprs []expr.Any, devReg, addrReg uint32) (mnl.Message, error) {
	fam := byte(t.Family)
	var list []mnl.Attribute
	for _, e := range exprs {
		b, err := expr.Marshal(fam, e)
		if err != nil {
			return mnl.Message{}, fmt.Errorf("%w: marshal nft expression: %w", ErrSetup, err)
		}
		list = append(list, mnl.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: b})
	}
	fwd, err := mnl.MarshalAttributes([]mnl.Attribute{
		{Type: unix.NFTA_FWD_SREG_DEV, Data: binaryutil.BigEndian.PutUint32(devReg)},
		{Type: nftaFwdSregAddr, Data: binaryutil.BigEndian.PutUint32(addrReg)},
		{Type: nftaFwdNFProto, Data: binaryutil.BigEndian.PutUint32(unix.NFPROTO_IPV4)},
	})
	if err != nil {
		return mnl.Message{}, fmt.Errorf("%w: marshal nft fwd: %w", ErrSetup, err)
	}
	fwdExpr, err := mnl.MarshalAttributes([]mnl.Attribute{
		{Type: unix.NFTA_EXPR_NAME, Data: []byte("fwd\x00")},
		{Type: unix.NLA_F_NESTED | unix.NFTA_EXPR_DATA, Data: fwd},
	})
	if err != nil {
		return mnl.Message{}, fmt.Errorf("%w: marshal nft fwd: %w", ErrSetup, err)
	}
	list = append(list, mnl.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: fwdExpr})
	exprList, err := mnl.MarshalAttributes(list)
	if err != nil {
		return mnl.Message{}, fmt.Errorf("%w: marshal nft rule: %w", ErrSetup, err)
	}
	data, err := mnl.MarshalAttributes([]mnl.Attribute{
		{Type: unix.NFTA_RULE_TABLE, Data: []byte(t.Name + "\x00")},
		{Type: unix.NFTA_RULE_CHAIN, Data: []byte(chain + "\x00")},
		{Type: unix.NLA_F_NESTED | unix.NFTA_RULE_EXPRESSIONS, Data: exprList},
	})
	if err != nil {
		return mnl.Message{}, fmt.Errorf("%w: marshal nft rule: %w", ErrSetup, err)
	}
	return mnl.Message{
		Header: mnl.Header{
			Type:  mnl.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWRULE),
			Flags: mnl.Request | mnl.Acknowledge | mnl.Create | unix.NLM_F_APPEND,
		},
		Data: append(nfgenHeader(unix.NFPROTO_NETDEV, 0), data...),
	}, nil
}

// nfgenHeader is the nfgenmsg that starts every nftables message.
func nfgenHeader(family uint8, resID uint16) []byte {
	return append([]byte{family, unix.NFNETLINK_V0}, binaryutil.BigEndian.PutUint16(resID)...)
}

// sendBatch sends msgs as one nftables transaction and waits for each
// message's answer (the kernel answers every message of a batch, an
// error for the one that failed).
func sendBatch(msgs []mnl.Message) error {
	if len(msgs) == 0 {
		return nil
	}
	conn, err := mnl.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return wrap("nftables netlink", err)
	}
	defer conn.Close()
	batch := []mnl.Message{{
		Header: mnl.Header{Type: mnl.HeaderType(unix.NFNL_MSG_BATCH_BEGIN), Flags: mnl.Request},
		Data:   nfgenHeader(unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES),
	}}
	batch = append(batch, msgs...)
	batch = append(batch, mnl.Message{
		Header: mnl.Header{Type: mnl.HeaderType(unix.NFNL_MSG_BATCH_END), Flags: mnl.Request},
		Data:   nfgenHeader(unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES),
	})
	if _, err := conn.SendMessages(batch); err != nil {
		return wrap("nft ingress rules", err)
	}
	if err := conn.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return wrap("nft ingress rules", err)
	}
	for answered := 0; answered < len(msgs); {
		replies, err := conn.Receive()
		if err != nil {
			return wrap("nft ingress rules", err)
		}
		answered += len(replies)
	}
	return nil
}

// setupIngress installs the netdev table's chains and rules after the
// transaction that created its objects; on failure it takes the table
// away (the raw-prerouting rules still forward those clients).
func (k *nftFast) setupIngress(svcs map[uint32]*fastService, p ingressPlan) error {
	if err := k.ingressHooks(svcs, p); err != nil {
		if rerr := k.removeIngress(); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return err
	}
	return nil
}

func (k *nftFast) removeIngress() error {
	c, err := nftables.New()
	if err != nil {
		return wrap("nftables", err)
	}
	t := k.netdevTable()
	c.AddTable(t)
	c.DelTable(t)
	if err := c.Flush(); err != nil {
		return wrap("delete nft table netdev "+k.name, err)
	}
	return nil
}

// refresh reads the interfaces and routes again: a changed route is
// written to the routes map; a changed interface set or MTU asks for a
// reinstall (true).
func (k *nftFast) refresh(svcs map[uint32]*fastService) (bool, error) {
	p, err := planIngress(svcs, !k.conntrackNAT)
	if err != nil {
		return false, err
	}
	if !p.sameHooks(k.tried) {
		return true, nil
	}
	if len(k.natIngress) > 0 && k.plan.active() {
		// A nat flow towards a backend without a next hop would leave
		// half-rewritten: reinstall, and only routed backends' flows go
		// back in.
		for b := range k.plan.routes {
			if _, ok := p.routes[b]; !ok {
				return true, nil
			}
		}
	}
	if !k.plan.active() || maps.Equal(p.routes, k.plan.routes) {
		return false, nil
	}
	c, err := nftables.New()
	if err != nil {
		return false, wrap("nftables", err)
	}
	t := k.netdevTable()
	changed := func(a, b map[netip.Addr]ingressRoute) map[netip.Addr]ingressRoute {
		out := map[netip.Addr]ingressRoute{}
		for addr, r := range a {
			if o, ok := b[addr]; !ok || o != r {
				out[addr] = r
			}
		}
		return out
	}
	delNhop, delOdev := routeElems(changed(k.plan.routes, p.routes))
	addNhop, addOdev := routeElems(changed(p.routes, k.plan.routes))
	if err := deleteElements(c, nhopMap(t), delNhop); err != nil {
		return false, err
	}
	if err := deleteElements(c, odevMap(t), delOdev); err != nil {
		return false, err
	}
	if err := addElements(c, nhopMap(t), addNhop); err != nil {
		return false, err
	}
	if err := addElements(c, odevMap(t), addOdev); err != nil {
		return false, err
	}
	if err := c.Flush(); err != nil {
		return false, wrap("nft maps nhop/odev", err)
	}
	k.plan.routes, k.tried.routes = p.routes, p.routes
	return false, nil
}
