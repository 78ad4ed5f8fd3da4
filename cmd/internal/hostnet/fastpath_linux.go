package hostnet

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ikelb/ikelb/dataplane"
)

// nftFast is the fast path's nftables and conntrack side.
type nftFast struct {
	name string
	log  *slog.Logger
	// plan is the ingress stage installed (inactive: none); tried is the
	// last one install attempted, so that a failed one is not retried
	// at every poll, only when the interfaces change.
	plan, tried ingressPlan
	// failed is the last plan whose ingress rules could not be set up:
	// install does not plan nat services on it again (they would be
	// left with neither rules) until the interfaces change.
	failed ingressPlan
	// natIngress: the nat services install left to the ingress stage
	// (stateless flows, no DNAT rule), while plan is active.
	natIngress map[uint32]bool
	// conntrackNAT: never leave nat services to the ingress stage.
	conntrackNAT bool
	// dnatClients: per nat service, the clients in its DNAT map; for one
	// the ingress stage carries, those the engine had no flow for, so that
	// conntrack is read for it only while it carries some (ctCarries).
	dnatClients map[uint32]int
	// svcs is the set installed; ct what conntrack showed of its nat
	// services (conntrack_linux.go).
	svcs map[uint32]*fastService
	ct   ctReader
	// ctErr is the last conntrack read error logged.
	ctErr     string
	acctTried bool
	// routeEvents: the kernel announced a route change since
	// routesChanged last looked; routesDone ends the subscription.
	routeEvents atomic.Bool
	routesDone  chan struct{}
}

func newFastKernel(name string, log *slog.Logger, conntrackNAT bool) (fastKernel, error) {
	if !forwards(false) && !forwards(true) {
		return nil, fmt.Errorf("%w: ip forwarding is off (net.ipv4.conf.all.forwarding and net.ipv6.conf.all.forwarding are 0)", ErrFastPathUnavailable)
	}
	k := &nftFast{name: name, log: log, conntrackNAT: conntrackNAT, routesDone: make(chan struct{})}
	if err := k.remove(); err != nil { // a table left by a killed run
		return nil, fmt.Errorf("%w: %w", ErrFastPathUnavailable, err)
	}
	if !conntrackNAT { // client next hops are the nat ingress stage's only
		k.subscribeRoutes()
	}
	return k, nil
}

// subscribeRoutes has the kernel's IPv4 route changes set routeEvents: the
// nat ingress stage's client next hops are then looked up again at a
// faster pace (FastPath.recheckRoutes). Without the subscription they
// are still looked up again, slowly.
func (k *nftFast) subscribeRoutes() {
	ch := make(chan netlink.RouteUpdate, 64)
	var once sync.Once
	err := netlink.RouteSubscribeWithOptions(ch, k.routesDone, netlink.RouteSubscribeOptions{
		ErrorCallback: func(err error) {
			select {
			case <-k.routesDone: // closed by close()
			default:
				once.Do(func() {
					k.log.Warn("fast path: route change events stopped; client next hops are looked up again slowly", "error", err)
				})
			}
		},
	})
	if err != nil {
		k.log.Warn("fast path: no route change events; client next hops are looked up again slowly", "error", err)
		return
	}
	go func() {
		for u := range ch {
			if u.Family == unix.AF_INET { // the ingress stage's clients are IPv4
				k.routeEvents.Store(true)
			}
		}
	}()
}

func (k *nftFast) routesChanged() bool { return k.routeEvents.Swap(false) }

func (k *nftFast) close() { close(k.routesDone) }

// forwards reports whether the kernel forwards the family: the fast path
// forwards DNATed packets, so it needs it (and does not turn it on).
func (k *nftFast) forwards(v6 bool) bool { return forwards(v6) }

func forwards(v6 bool) bool {
	p := "/proc/sys/net/ipv4/conf/all/forwarding"
	if v6 {
		p = "/proc/sys/net/ipv6/conf/all/forwarding"
	}
	b, err := os.ReadFile(p)
	return err == nil && string(bytes.TrimSpace(b)) != "0"
}

// table is the family's table: ip or ip6 (not inet, so that "ct original
// daddr" loads an address of the family's size, which nft can print).
func (k *nftFast) table(v6 bool) *nftables.Table {
	if v6 {
		return &nftables.Table{Name: k.name, Family: nftables.TableFamilyIPv6}
	}
	return &nftables.Table{Name: k.name, Family: nftables.TableFamilyIPv4}
}

// the per-service objects, by name.
func portsSet(t *nftables.Table, s *fastService) *nftables.Set {
	return &nftables.Set{Table: t, Name: "ports_" + strconv.FormatUint(uint64(s.id), 10), KeyType: nftables.TypeInetService}
}

// affMap is the service's client → backend map. Every element carries a
// counter that the kernel bumps on each lookup that finds it: the
// clients' activity (for touches) without a per-packet set update.
func affMap(t *nftables.Table, s *fastService) *nftables.Set {
	typ := nftables.TypeIPAddr
	if s.v6() {
		typ = nftables.TypeIP6Addr
	}
	return &nftables.Set{Table: t, Name: "aff_" + strconv.FormatUint(uint64(s.id), 10), IsMap: true, KeyType: typ, DataType: typ, Counter: true}
}

func fwdCounter(s *fastService) string { return "fwd_" + strconv.FormatUint(uint64(s.id), 10) }
func repCounter(s *fastService) string { return "rep_" + strconv.FormatUint(uint64(s.id), 10) }

// elemChunk is the most set elements per netlink message: the message's
// element list is one attribute, whose 16-bit length overflows at about
// 2,000 IPv4 or 1,250 IPv6 map elements (the kernel then answers ENOENT).
// A transaction holds as many messages as it needs.
const elemChunk = 512

// txElems is the most set elements per transaction: netlink refuses a
// sendmsg larger than the socket's send buffer (EMSGSIZE past the default
// 208 KiB, about 5,000 elements). Raising the buffer past wmem_max needs
// SO_SNDBUFFORCE, i.e. CAP_NET_ADMIN in the initial user namespace, which
// a container may not have; so large changes go in several transactions
// instead.
const txElems = 4096

// addElements adds elems to set in messages of at most elemChunk.
func addElements(c *nftables.Conn, set *nftables.Set, elems []nftables.SetElement) error {
	for i := 0; i < len(elems); i += elemChunk {
		if err := c.SetAddElements(set, elems[i:min(len(elems), i+elemChunk)]); err != nil {
			return wrap("nft map "+set.Name, err)
		}
	}
	return nil
}

// deleteElements deletes elems from set in messages of at most elemChunk.
func deleteElements(c *nftables.Conn, set *nftables.Set, elems []nftables.SetElement) error {
	for i := 0; i < len(elems); i += elemChunk {
		if err := c.SetDeleteElements(set, elems[i:min(len(elems), i+elemChunk)]); err != nil {
			return wrap("nft map "+set.Name, err)
		}
	}
	return nil
}

// install replaces the tables in one transaction that holds the rules and
// the first txElems map elements; the rest follow in further
// transactions (clients not in a map yet meanwhile reach the userspace
// listener, which decides them the same way).
func (k *nftFast) install(svcs map[uint32]*fastService, elems map[dataplane.ClientKey]netip.Addr) error {
	plan, err := planIngress(svcs, !k.conntrackNAT)
	if err != nil {
		k.log.Warn("fast path: no ingress stage for transparent services", "error", err)
	}
	k.tried, k.plan = plan, ingressPlan{}
	k.natIngress = map[uint32]bool{}
	if plan.active() && !plan.sameHooks(k.failed) && !k.conntrackNAT {
		for id, s := range svcs {
			if natStateless(s) {
				k.natIngress[id] = true
			}
		}
	}
	if hasNATFamily(svcs, false) || hasNATFamily(svcs, true) {
		k.enableAccounting()
	}
	c, err := nftables.New()
	if err != nil {
		return wrap("nftables", err)
	}
	byService := map[uint32][]nftables.SetElement{}
	var rest []mapOp
	placed := 0
	k.dnatClients = map[uint32]int{}
	for key, b := range elems {
		s := svcs[key.Service]
		if placed >= txElems {
			rest = append(rest, mapOp{svc: s, client: key.Client.Netip(), backend: b})
			continue
		}
		byService[key.Service] = append(byService[key.Service], nftables.SetElement{Key: key.Client.Netip().AsSlice(), Val: b.AsSlice()})
		k.dnatClients[key.Service]++
		placed += k.weight(s, plan)
	}
	for _, v6 := range []bool{false, true} {
		t := k.table(v6)
		c.AddTable(t) // replaces a table of any content atomically
		c.DelTable(t)
		var ids []uint32
		for _, id := range sortedIDs(svcs) {
			if svcs[id].v6() == v6 {
				ids = append(ids, id)
			}
		}
		if len(ids) == 0 {
			continue
		}
		c.AddTable(t)
		if err := k.installFamily(c, t, svcs, ids, byService); err != nil {
			return err
		}
	}
	nd := k.netdevTable()
	c.AddTable(nd)
	c.DelTable(nd)
	if plan.active() {
		if err := k.ingressObjects(c, svcs, plan, byService); err != nil {
			return err
		}
	}
	if err := c.Flush(); err != nil {
		return wrap("nft table "+k.name, err)
	}
	k.carryCounts()
	k.svcs = svcs
	if err := k.forgetVIPs(svcs); err != nil {
		k.log.Warn("fast path: forgetting conntrack entries failed", "error", err)
	}
	if plan.active() {
		if err := k.setupIngress(svcs, plan); err != nil {
			if len(k.natIngress) > 0 {
				// The nat services have no DNAT rule in these tables:
				// install again with the IP stack's rules for them.
				k.log.Warn("fast path: no ingress stage; nat clients go through conntrack", "error", err)
				k.failed = plan
				return k.install(svcs, elems)
			}
			k.log.Warn("fast path: no ingress stage for transparent services; the IP stack's rules forward their clients", "error", err)
		} else {
			k.plan = plan
		}
	}
	return k.update(rest)
}

// carryCounts reads conntrack afresh for the services installed so far,
// just before an install deletes their entries: the fast path has added
// what counters last reported to its bases and counts from zero after an
// install, so the entries' counts since that report (the last dump may be
// seconds old) carry over. Packets in the milliseconds between this read
// and the deletion are not counted.
func (k *nftFast) carryCounts() {
	if err := k.readConntrack(0); err != nil {
		k.log.Warn("fast path: reading conntrack failed", "error", err)
	}
	carry := map[uint32]FastCounters{}
	for id, t := range k.ct.totals {
		r := k.ct.reported[id]
		carry[id] = FastCounters{Packets: t.Packets - r.Packets, Bytes: t.Bytes - r.Bytes,
			ReplyPackets: t.ReplyPackets - r.ReplyPackets, ReplyBytes: t.ReplyBytes - r.ReplyBytes}
	}
	k.ct.totals, k.ct.reported = carry, map[uint32]FastCounters{}
}

// weight is how many map elements one of s's clients takes: two when the
// ingress stage holds a copy of its map.
func (k *nftFast) weight(s *fastService, p ingressPlan) int {
	if s != nil && s.transparent && p.active() {
		return 2
	}
	return 1
}

func (k *nftFast) installFamily(c *nftables.Conn, t *nftables.Table, svcs map[uint32]*fastService, ids []uint32, byService map[uint32][]nftables.SetElement) error {
	chain := func(name string, typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority) *nftables.Chain {
		return c.AddChain(&nftables.Chain{Name: name, Table: t, Type: typ, Hooknum: hook, Priority: prio})
	}
	// Each chain only when a service needs it: a hook without rules
	// still costs every packet a call.
	var rawPre, rawOut, fwd, natPre, natPost *nftables.Chain
	if slices.ContainsFunc(ids, func(id uint32) bool { return svcs[id].transparent || k.natIngress[id] }) {
		rawPre = chain("raw_prerouting", nftables.ChainTypeFilter, nftables.ChainHookPrerouting, nftables.ChainPriorityRaw)
	}
	if slices.ContainsFunc(ids, func(id uint32) bool { return svcs[id].transparent }) {
		fwd = chain("forward", nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter)
	}
	if slices.ContainsFunc(ids, func(id uint32) bool { return k.natIngress[id] }) {
		rawOut = chain("raw_output", nftables.ChainTypeFilter, nftables.ChainHookOutput, nftables.ChainPriorityRaw)
	}
	if slices.ContainsFunc(ids, func(id uint32) bool { return !svcs[id].transparent }) {
		natPre = chain("nat_prerouting", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest)
		natPost = chain("nat_postrouting", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource)
	}

	for _, id := range ids {
		s := svcs[id]
		ports, aff, err := addServiceSets(c, t, s, byService[id])
		if err != nil {
			return err
		}
		if s.transparent {
			c.AddObj(&nftables.CounterObj{Table: t, Name: fwdCounter(s)})
			c.AddObj(&nftables.CounterObj{Table: t, Name: repCounter(s)})
			if err := k.transparentRules(c, t, s, ports, aff, rawPre, fwd); err != nil {
				return err
			}
			continue
		}

		// (A service whose flows the ingress stage carries
		// (natingress_linux.go) has in its map only the clients the
		// engine had no flow for: its flow limit. Its listener's
		// datagrams are untracked: listenerUntracked.)
		if k.natIngress[id] {
			if err := listenerUntracked(c, t, s, ports, aff, rawPre, rawOut); err != nil {
				return err
			}
		}
		// Tracked: a client's first datagram is decided by the DNAT rule
		// (in the map: to its backend; not: to the userspace listener),
		// the rest follow its conntrack entry with no rule evaluated. A
		// client whose entry predates its binding in the map is handed
		// over by the engine (FastPath.Handover: the entry is deleted).
		// dnat ip to ip saddr map @aff
		c.AddRule(&nftables.Rule{Table: t, Chain: natPre, Exprs: concat(toVIP(s, ports), saddr(s), []expr.Any{
			&expr.Lookup{SourceRegister: 1, DestRegister: 1, IsDestRegSet: true, SetName: aff.Name, SetID: aff.ID},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: nfproto(s), RegAddrMin: 1, RegAddrMax: 1},
		})})
		// The kernel's flows leave from the service's SNAT address, or
		// the outgoing interface's (masquerade); both keep the client's
		// source port when it is free.
		snat := []expr.Any{&expr.Masq{}}
		if s.snat.IsValid() {
			snat = []expr.Any{
				&expr.Immediate{Register: 1, Data: s.snat.AsSlice()},
				&expr.NAT{Type: expr.NATTypeSourceNAT, Family: nfproto(s), RegAddrMin: 1, RegAddrMax: 1},
			}
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: natPost, Exprs: concat(ctOurs(s, ports), snat)})
	}
	return nil
}

// addServiceSets adds s's port set and its affinity map holding elems to
// table t in c's transaction.
func addServiceSets(c *nftables.Conn, t *nftables.Table, s *fastService, elems []nftables.SetElement) (ports, aff *nftables.Set, err error) {
	ports, aff = portsSet(t, s), affMap(t, s)
	var pe []nftables.SetElement
	for _, p := range s.ports {
		pe = append(pe, nftables.SetElement{Key: binaryutil.BigEndian.PutUint16(p)})
	}
	if err := c.AddSet(ports, pe); err != nil {
		return nil, nil, wrap("nft set "+ports.Name, err)
	}
	if err := c.AddSet(aff, nil); err != nil {
		return nil, nil, wrap("nft map "+aff.Name, err)
	}
	if err := addElements(c, aff, elems); err != nil {
		return nil, nil, err
	}
	return ports, aff, nil
}

func concat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func nfproto(s *fastService) uint32 {
	if s.v6() {
		return unix.NFPROTO_IPV6
	}
	return unix.NFPROTO_IPV4
}

// addrOffsets: (saddr, daddr, length) in the network header.
func addrOffsets(s *fastService) (uint32, uint32, uint32) {
	if s.v6() {
		return 8, 24, 16
	}
	return 12, 16, 4
}

func isUDP() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
	}
}

// toVIP: meta l4proto udp ip daddr VIP udp dport @ports.
func toVIP(s *fastService, ports *nftables.Set) []expr.Any {
	_, d, n := addrOffsets(s)
	return concat(isUDP(), []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: d, Len: n},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: s.vip.AsSlice()},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: ports.Name, SetID: ports.ID},
	})
}

// saddr loads the packet's source address into register 1.
func saddr(s *fastService) []expr.Any {
	a, _, n := addrOffsets(s)
	return []expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: a, Len: n}}
}

// ctOurs: meta l4proto udp ct status dnat
// ct original daddr VIP ct original proto-dst @ports — a flow this
// service's DNAT rule decided.
func ctOurs(s *fastService, ports *nftables.Set) []expr.Any {
	return concat(isUDP(), []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATUS},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(ipsDstNAT), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Ct{Register: 1, Key: expr.CtKeyDST, Direction: 0},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: s.vip.AsSlice()},
		&expr.Ct{Register: 1, Key: expr.CtKeyPROTODST, Direction: 0},
		&expr.Lookup{SourceRegister: 1, SetName: ports.Name, SetID: ports.ID},
	})
}

// update applies ops in transactions of at most txElems (see txElems),
// deletes before adds within each; a re-bind's delete and add are
// adjacent in ops, so the delete is never applied after its add.
func (k *nftFast) update(ops []mapOp) error {
	for len(ops) > 0 {
		n, w := 0, 0
		for n < len(ops) && w < txElems {
			w += k.weight(ops[n].svc, k.plan)
			n++
		}
		if err := k.updateTx(ops[:n]); err != nil {
			return err
		}
		ops = ops[n:]
	}
	return nil
}

func (k *nftFast) updateTx(ops []mapOp) error {
	c, err := nftables.New()
	if err != nil {
		return wrap("nftables", err)
	}
	type batch struct {
		set       *nftables.Set
		del, adds []nftables.SetElement
	}
	batches := map[*nftables.Table]map[uint32]*batch{}
	add := func(t *nftables.Table, op mapOp) {
		if batches[t] == nil {
			batches[t] = map[uint32]*batch{}
		}
		b := batches[t][op.svc.id]
		if b == nil {
			b = &batch{set: affMap(t, op.svc)}
			batches[t][op.svc.id] = b
		}
		if op.backend.IsValid() {
			b.adds = append(b.adds, nftables.SetElement{Key: op.client.AsSlice(), Val: op.backend.AsSlice()})
		} else {
			b.del = append(b.del, nftables.SetElement{Key: op.client.AsSlice()})
		}
		if t.Family != nftables.TableFamilyNetdev {
			if op.backend.IsValid() {
				k.dnatClients[op.svc.id]++
			} else {
				k.dnatClients[op.svc.id]--
			}
		}
	}
	ip4, ip6, nd := k.table(false), k.table(true), k.netdevTable()
	for _, op := range ops {
		if op.svc.v6() {
			add(ip6, op)
		} else {
			add(ip4, op)
		}
		if op.svc.transparent && k.plan.active() {
			add(nd, op)
		}
	}
	for _, bs := range batches { // deletes first: a re-bind is a delete and an add
		for _, b := range bs {
			if err := deleteElements(c, b.set, b.del); err != nil {
				return err
			}
		}
	}
	for _, bs := range batches {
		for _, b := range bs {
			if err := addElements(c, b.set, b.adds); err != nil {
				return err
			}
		}
	}
	if err := c.Flush(); err != nil {
		return wrap("nft map update", err)
	}
	return nil
}

// flowFilter matches UDP conntrack flows from a client to its service's
// VIP on one of the service's ports.
type flowFilter map[[2]netip.Addr][]uint16 // {vip, client} → ports

func (m flowFilter) MatchConntrackFlow(f *netlink.ConntrackFlow) bool {
	if f.Forward.Protocol != unix.IPPROTO_UDP {
		return false
	}
	src, ok1 := netip.AddrFromSlice(f.Forward.SrcIP)
	dst, ok2 := netip.AddrFromSlice(f.Forward.DstIP)
	if !ok1 || !ok2 {
		return false
	}
	ports, ok := m[[2]netip.Addr{dst.Unmap(), src.Unmap()}]
	if !ok {
		return false
	}
	for _, p := range ports {
		if p == f.Forward.DstPort {
			return true
		}
	}
	return false
}

func (k *nftFast) forget(ops []mapOp) error {
	return deleteConntrackMatching(func(v6 bool) (netlink.CustomConntrackFilter, bool) {
		m := flowFilter{}
		for _, op := range ops {
			if op.svc.v6() == v6 {
				m[[2]netip.Addr{op.svc.vip, op.client.Unmap()}] = op.svc.ports
			}
		}
		return m, len(m) > 0
	})
}

// deleteConntrackMatching deletes, per family, the conntrack entries that
// filter's answer for the family matches (a dump filtered here: one per
// call and family); false skips the family.
func deleteConntrackMatching(filter func(v6 bool) (netlink.CustomConntrackFilter, bool)) error {
	var errs []error
	for _, v6 := range []bool{false, true} {
		f, ok := filter(v6)
		if !ok {
			continue
		}
		fam := netlink.InetFamily(unix.AF_INET)
		if v6 {
			fam = unix.AF_INET6
		}
		if _, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, fam, f); err != nil {
			errs = append(errs, wrap("delete conntrack entries", err))
		}
	}
	return errors.Join(errs...)
}

func (k *nftFast) counters(svcs map[uint32]*fastService) (map[uint32]FastCounters, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, wrap("nftables", err)
	}
	out := map[uint32]FastCounters{}
	byName := map[string][2]uint64{}
	read := func(t *nftables.Table) error {
		objs, err := c.GetObjects(t)
		if err != nil {
			return wrap("nft counters", err)
		}
		for _, o := range objs {
			switch o := o.(type) {
			case *nftables.CounterObj:
				byName[o.Name] = [2]uint64{o.Packets, o.Bytes}
			case *nftables.NamedObj:
				if ctr, ok := o.Obj.(*expr.Counter); ok {
					byName[o.Name] = [2]uint64{ctr.Packets, ctr.Bytes}
				}
			}
		}
		return nil
	}
	for _, v6 := range []bool{false, true} {
		if hasTransparentFamily(svcs, v6) {
			if err := read(k.table(v6)); err != nil {
				return nil, err
			}
		}
	}
	if err := k.readConntrack(k.ct.countersAge()); err != nil {
		if msg := err.Error(); msg != k.ctErr {
			k.log.Warn("fast path: reading conntrack failed", "error", err)
			k.ctErr = msg
		}
	} else {
		k.ctErr = ""
	}
	ingress := map[string][2]uint64{}
	if k.plan.active() {
		ip := byName
		byName = ingress
		if err := read(k.netdevTable()); err != nil {
			return nil, err
		}
		byName = ip
	}
	for id, s := range svcs {
		if !s.transparent {
			out[id] = k.ct.totals[id]
			k.ct.reported[id] = out[id]
			in, rep := ingress[natInCounter(s)], ingress[natRepCounter(s)]
			c := out[id]
			c.Packets, c.Bytes, c.ReplyPackets, c.ReplyBytes = c.Packets+in[0], c.Bytes+in[1], c.ReplyPackets+rep[0], c.ReplyBytes+rep[1]
			out[id] = c
			continue
		}
		f, r, in := byName[fwdCounter(s)], byName[repCounter(s)], ingress[inCounter(s)]
		out[id] = FastCounters{Packets: f[0] + in[0], Bytes: f[1] + in[1], ReplyPackets: r[0], ReplyBytes: r[1]}
	}
	return out, nil
}

func (k *nftFast) activity(s *fastService) (map[netip.Addr]uint64, error) {
	if !s.transparent {
		return k.natActivity(s)
	}
	c, err := nftables.New()
	if err != nil {
		return nil, wrap("nftables", err)
	}
	tables := []*nftables.Table{k.table(s.v6())}
	if s.transparent && k.plan.active() {
		tables = append(tables, k.netdevTable())
	}
	var out map[netip.Addr]uint64
	for _, t := range tables {
		set := affMap(t, s)
		elems, err := c.GetSetElements(set)
		if err != nil {
			return nil, wrap("nft map "+set.Name, err)
		}
		if out == nil {
			out = make(map[netip.Addr]uint64, len(elems))
		}
		for _, e := range elems {
			a, ok := netip.AddrFromSlice(e.Key)
			if !ok || e.Counter == nil {
				continue
			}
			out[a] += e.Counter.Packets
		}
	}
	return out, nil
}

func (k *nftFast) remove() error {
	c, err := nftables.New()
	if err != nil {
		return wrap("nftables", err)
	}
	for _, t := range []*nftables.Table{k.table(false), k.table(true), k.netdevTable()} {
		c.AddTable(t) // so that the delete succeeds when there is none
		c.DelTable(t)
	}
	if err := c.Flush(); err != nil {
		return wrap("delete nft tables "+k.name, err)
	}
	k.plan, k.tried, k.svcs, k.natIngress = ingressPlan{}, ingressPlan{}, nil, nil
	k.ct.reset()
	return nil
}

func hasTransparentFamily(svcs map[uint32]*fastService, v6 bool) bool {
	for _, s := range svcs {
		if s.transparent && s.v6() == v6 {
			return true
		}
	}
	return false
}

// ipsDstNAT is conntrack's IPS_DST_NAT status bit.
const ipsDstNAT = 1 << 5

func replySet(t *nftables.Table, s *fastService) *nftables.Set {
	return &nftables.Set{Table: t, Name: "bk_" + strconv.FormatUint(uint64(s.id), 10), KeyType: nftables.TypeIPAddr}
}

// replies implements fastKernel: a nat service's backend set (in its
// listener rules, listenerUntracked) is flushed and refilled in one
// transaction.
func (k *nftFast) replies(s *fastService) error {
	if !k.natIngress[s.id] {
		return nil
	}
	c, err := nftables.New()
	if err != nil {
		return wrap("nftables", err)
	}
	bk := replySet(k.table(s.v6()), s)
	c.FlushSet(bk)
	var be []nftables.SetElement
	for _, a := range s.replyFrom {
		be = append(be, nftables.SetElement{Key: a.AsSlice()})
	}
	if err := addElements(c, bk, be); err != nil {
		return err
	}
	if err := c.Flush(); err != nil {
		return wrap("nft set "+bk.Name, err)
	}
	return nil
}

// addReplySet adds s's backend set holding s.replyFrom to table t.
func addReplySet(c *nftables.Conn, t *nftables.Table, s *fastService) (*nftables.Set, error) {
	bk := replySet(t, s)
	var be []nftables.SetElement
	for _, a := range s.replyFrom {
		be = append(be, nftables.SetElement{Key: a.AsSlice()})
	}
	if err := c.AddSet(bk, be); err != nil {
		return nil, wrap("nft set "+bk.Name, err)
	}
	return bk, nil
}

// transparentRules are a transparent service's stateless rules (IPv4
// only: fastEligible):
//
//	raw prerouting: ip daddr VIP udp dport @ports ip daddr set ip saddr map @aff notrack counter fwd accept
//	raw prerouting: ip saddr @bk udp sport @ports fib daddr type != local notrack
//	forward:        ip saddr @bk udp sport @ports ct state untracked counter rep ip saddr set VIP
//
// The request is rewritten before routing (so it is forwarded to the
// backend); the reply's source only after routing, in forward: a packet
// arriving with a local source address (the VIP) is a martian to the
// input route lookup. The rewrites fix the IP header checksum and the
// UDP checksum's pseudo-header (as the nft CLI's "ip daddr set" does).
// "ct state untracked" also makes the kernel load conntrack's defrag
// hook for the table, so fragmented datagrams are reassembled before the
// raw rules (a non-first fragment has no UDP header to match).
func (k *nftFast) transparentRules(c *nftables.Conn, t *nftables.Table, s *fastService, ports, aff *nftables.Set, rawPre, fwd *nftables.Chain) error {
	bk, err := addReplySet(c, t, s)
	if err != nil {
		return err
	}
	src, dst, n := addrOffsets(s)
	const ipCsumOffset = 10
	rewrite := func(off uint32) *expr.Payload {
		return &expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: 1, Base: expr.PayloadBaseNetworkHeader,
			Offset: off, Len: n, CsumType: expr.CsumTypeInet, CsumOffset: ipCsumOffset, CsumFlags: unix.NFT_PAYLOAD_L4CSUM_PSEUDOHDR}
	}
	fromBackend := concat(isUDP(), []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: src, Len: n},
		&expr.Lookup{SourceRegister: 1, SetName: bk.Name, SetID: bk.ID},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: ports.Name, SetID: ports.ID},
	})
	// Requests of clients in the map (a miss ends the rule: userspace
	// decides the client): one map lookup straight into the rewrite (it
	// also bumps the element's counter), then untracked and counted.
	// notrack after the rewrite is the same: both happen in raw
	// prerouting, before conntrack.
	c.AddRule(&nftables.Rule{Table: t, Chain: rawPre, Exprs: concat(toVIP(s, ports), saddr(s), []expr.Any{
		&expr.Lookup{SourceRegister: 1, DestRegister: 1, IsDestRegSet: true, SetName: aff.Name, SetID: aff.ID},
		rewrite(dst),
		&expr.Notrack{},
		&expr.Objref{Type: int(nftables.ObjTypeCounter), Name: fwdCounter(s)},
		// Done with this chain: the reply rules below need not look
		// the request up again.
		&expr.Verdict{Kind: expr.VerdictAccept},
	})})
	// Replies: untracked when routed through (never the balancer's own
	// traffic with the backend, e.g. health checks).
	c.AddRule(&nftables.Rule{Table: t, Chain: rawPre, Exprs: concat(fromBackend, []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
		&expr.Notrack{},
	})})
	c.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: concat(fromBackend, []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(ctStateUntracked), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Objref{Type: int(nftables.ObjTypeCounter), Name: repCounter(s)},
		&expr.Immediate{Register: 1, Data: s.vip.AsSlice()},
		rewrite(src),
	})})
	return nil
}

// listenerUntracked adds the rules that keep the datagrams between the
// clients a nat service's listener serves and the listener out of
// conntrack, for a service whose flows the ingress stage carries:
//
//	raw prerouting: ip daddr VIP udp dport @ports ip saddr != @aff ip saddr != @bk notrack
//	raw output:     ip saddr VIP udp sport @ports notrack
//
// A client the engine has no flow for (its flow limit) goes into the DNAT
// map: with no listener entry in conntrack, its next datagram is tracked
// and DNATed, with no entry to delete first. (With tracked listener
// datagrams each such client needed a conntrack delete while it kept
// sending: at 100,000 clients beyond the limit those deletes failed for
// lack of socket buffer and the clients stayed on the listener.) The
// listener's own datagrams to the client are untracked too: tracked, they
// would make an entry whose reply direction is the client's next
// datagram. Datagrams from a backend (replies of DNATed flows, to a SNAT
// address that may be the VIP) stay tracked.
func listenerUntracked(c *nftables.Conn, t *nftables.Table, s *fastService, ports, aff *nftables.Set, rawPre, rawOut *nftables.Chain) error {
	bk, err := addReplySet(c, t, s)
	if err != nil {
		return err
	}
	c.AddRule(&nftables.Rule{Table: t, Chain: rawPre, Exprs: concat(toVIP(s, ports), saddr(s), []expr.Any{
		&expr.Lookup{SourceRegister: 1, SetName: aff.Name, SetID: aff.ID, Invert: true},
		&expr.Lookup{SourceRegister: 1, SetName: bk.Name, SetID: bk.ID, Invert: true},
		&expr.Notrack{},
	})})
	src, _, n := addrOffsets(s)
	c.AddRule(&nftables.Rule{Table: t, Chain: rawOut, Exprs: concat(isUDP(), []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: src, Len: n},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: s.vip.AsSlice()},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: ports.Name, SetID: ports.ID},
		&expr.Notrack{},
	})})
	return nil
}

// ctStateUntracked is nft's "ct state untracked" bit.
const ctStateUntracked = 1 << 6

// vipFilter matches UDP conntrack flows to a VIP on one of its ports.
type vipFilter map[netip.Addr][]uint16

func (m vipFilter) MatchConntrackFlow(f *netlink.ConntrackFlow) bool {
	if f.Forward.Protocol != unix.IPPROTO_UDP {
		return false
	}
	dst, ok := netip.AddrFromSlice(f.Forward.DstIP)
	return ok && slices.Contains(m[dst.Unmap()], f.Forward.DstPort)
}

// forgetVIPs deletes every conntrack entry to the nat services' VIP:ports.
func (k *nftFast) forgetVIPs(svcs map[uint32]*fastService) error {
	return deleteConntrackMatching(func(v6 bool) (netlink.CustomConntrackFilter, bool) {
		m := vipFilter{}
		for _, s := range svcs {
			if !s.transparent && s.v6() == v6 {
				m[s.vip] = append(m[s.vip], s.ports...)
			}
		}
		return m, len(m) > 0
	})
}

// ctCarries reports whether conntrack may carry clients of nat service
// id: always, unless the ingress stage carries its flows and its DNAT map
// is empty. Reading conntrack (a dump of the whole table) on the
// forwarding core delayed datagrams by hundreds of microseconds in the
// benchmark's latency runs; it is skipped when it can count nothing.
func (k *nftFast) ctCarries(id uint32) bool {
	return !k.natIngress[id] || k.dnatClients[id] > 0
}
