package hostnet

import (
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ikelb/ikelb/dataplane"
)

// The nat flows the ingress stage carries statelessly (natingress_linux.go).
// The engine hands a flow over (Handover returns true) with its upstream
// socket's address and port, keeps the socket open while the flow is
// active here or there (LastActive), and releases it when it closes it;
// the fast path's goroutine puts the flow's elements in the kernel while
// its client's committed backend is the flow's and takes them out when
// it is not, or when the flow is released.

// heldFlows are the flows the engine handed over, shared with the
// listeners' goroutines.
type heldFlows struct {
	mu       sync.Mutex
	flows    map[dataplane.KernelFlow]*heldFlow
	byClient map[dataplane.ClientKey]map[dataplane.KernelFlow]struct{}
	dirty    map[dataplane.KernelFlow]struct{} // changed since the goroutine last looked
	// overflow: clients of a service the ingress stage carries that the
	// engine could not give a flow (its flow limit), with when it first
	// could not: the conntrack path (the DNAT map) carries them instead,
	// once their binding commits (expireOverflow).
	overflow map[dataplane.ClientKey]int64
	kick     chan struct{} // capacity 1: dirty is not empty
	// live: the services whose flows the installed ingress stage carries
	// (nil: none); the goroutine replaces it.
	live atomic.Pointer[map[uint32]bool]
}

type heldFlow struct {
	lastActive int64 // Unix ns the kernel's counters last moved; guarded by heldFlows.mu
}

func newHeldFlows() *heldFlows {
	return &heldFlows{
		flows:    map[dataplane.KernelFlow]*heldFlow{},
		byClient: map[dataplane.ClientKey]map[dataplane.KernelFlow]struct{}{},
		dirty:    map[dataplane.KernelFlow]struct{}{},
		overflow: map[dataplane.ClientKey]int64{},
		kick:     make(chan struct{}, 1),
	}
}

// canonical unmaps kf's addresses, so that every call names a flow alike.
func canonical(kf dataplane.KernelFlow) dataplane.KernelFlow {
	um := func(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) }
	kf.Client, kf.Local, kf.Upstream, kf.Backend = um(kf.Client), um(kf.Local), um(kf.Upstream), um(kf.Backend)
	return kf
}

func clientKey(kf dataplane.KernelFlow) dataplane.ClientKey {
	return dataplane.ClientKey{Service: kf.Service, Client: dataplane.AddrFrom(kf.Client.Addr())}
}

// take holds kf if the ingress stage carries its service; it reports
// whether it does.
func (h *heldFlows) take(kf dataplane.KernelFlow) bool {
	if !h.carries(kf.Service) {
		return false
	}
	kf = canonical(kf)
	for _, a := range []netip.AddrPort{kf.Client, kf.Local, kf.Upstream, kf.Backend} {
		if !a.IsValid() || !a.Addr().Is4() {
			return false
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.flows[kf]; ok {
		return true
	}
	h.flows[kf] = &heldFlow{}
	ck := clientKey(kf)
	if h.byClient[ck] == nil {
		h.byClient[ck] = map[dataplane.KernelFlow]struct{}{}
	}
	h.byClient[ck][kf] = struct{}{}
	h.markLocked(kf)
	return true
}

func (h *heldFlows) release(kf dataplane.KernelFlow) {
	kf = canonical(kf)
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.flows[kf]; !ok {
		return
	}
	delete(h.flows, kf)
	ck := clientKey(kf)
	delete(h.byClient[ck], kf)
	if len(h.byClient[ck]) == 0 {
		delete(h.byClient, ck)
	}
	h.markLocked(kf)
}

func (h *heldFlows) lastActive(kf dataplane.KernelFlow) int64 {
	kf = canonical(kf)
	h.mu.Lock()
	defer h.mu.Unlock()
	if f := h.flows[kf]; f != nil {
		return f.lastActive
	}
	return 0
}

func (h *heldFlows) markLocked(kf dataplane.KernelFlow) {
	h.dirty[kf] = struct{}{}
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// markClients marks the flows of the clients in keys (their binding
// changed).
func (h *heldFlows) markClients(keys map[dataplane.ClientKey]struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for k := range keys {
		for kf := range h.byClient[k] {
			h.markLocked(kf)
		}
	}
}

// markAll marks every flow (the maps were rebuilt).
func (h *heldFlows) markAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for kf := range h.flows {
		h.markLocked(kf)
	}
}

// takeDirty returns the marked flows and whether each is still held.
func (h *heldFlows) takeDirty() map[dataplane.KernelFlow]bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make(map[dataplane.KernelFlow]bool, len(h.dirty))
	for kf := range h.dirty {
		_, held := h.flows[kf]
		out[kf] = held
	}
	clear(h.dirty)
	return out
}

// touched records that the kernel forwarded the flows in kfs at now.
func (h *heldFlows) touched(kfs []dataplane.KernelFlow, now int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, kf := range kfs {
		if f := h.flows[kf]; f != nil {
			f.lastActive = now
		}
	}
}

// natFlows is the goroutine's view of the flows in the kernel.
type natFlows struct {
	mirror  map[dataplane.KernelFlow]struct{}
	byReq   map[natReqKey]dataplane.KernelFlow
	byReply map[[2]netip.AddrPort]dataplane.KernelFlow // {backend, upstream}
	routes  map[netip.Addr]*clientHop
	// recheck: the client addresses whose next hops the coming polls look
	// up again (recheckPerPoll or recheckBurst at a time), refilled from
	// routes when empty.
	recheck []netip.Addr
	// burst: passes over every client still to go at recheckBurst a poll
	// (the host's routes changed).
	burst   int
	packets map[dataplane.KernelFlow]uint64 // at the last count
	// broken: an update failed, the maps' content is unknown; the next
	// poll rebuilds.
	broken bool
	err    string // the last update error logged
}

type clientHop struct {
	route ingressRoute
	refs  int
}

func newNATFlows() natFlows {
	return natFlows{
		mirror: map[dataplane.KernelFlow]struct{}{}, byReq: map[natReqKey]dataplane.KernelFlow{},
		byReply: map[[2]netip.AddrPort]dataplane.KernelFlow{}, routes: map[netip.Addr]*clientHop{},
		packets: map[dataplane.KernelFlow]uint64{},
	}
}

func reqKey(kf dataplane.KernelFlow) natReqKey {
	return natReqKey{client: kf.Client, vport: kf.Local.Port()}
}

func replyKey(kf dataplane.KernelFlow) [2]netip.AddrPort {
	return [2]netip.AddrPort{kf.Backend, kf.Upstream}
}

// flushFlows puts the marked flows that belong in the kernel there and
// takes the others out, in one update.
func (f *FastPath) flushFlows(st *fastState) {
	dirty := f.held.takeDirty()
	if len(dirty) == 0 {
		return
	}
	nf := &st.nat
	var ops []natFlowOp
	var routes []clientRouteOp
	remove := func(kf dataplane.KernelFlow) {
		if _, ok := nf.mirror[kf]; !ok {
			return
		}
		delete(nf.mirror, kf)
		delete(nf.byReq, reqKey(kf))
		delete(nf.byReply, replyKey(kf))
		delete(nf.packets, kf)
		if s := st.svcs[kf.Service]; s != nil {
			ops = append(ops, natFlowOp{svc: s, kf: kf})
		}
		c := kf.Client.Addr()
		if h := nf.routes[c]; h != nil {
			if h.refs--; h.refs == 0 {
				delete(nf.routes, c)
				routes = append(routes, clientRouteOp{client: c, route: h.route})
			}
		}
	}
	nat := f.kernel.ingressNAT()
	for kf, held := range dirty {
		want := held && st.installed && nat[kf.Service]
		if want {
			b, ok := f.mapEntry(st.svcs, clientKey(kf))
			want = ok && b == kf.Backend.Addr()
		}
		if _, have := nf.mirror[kf]; have == want {
			continue
		}
		if !want {
			remove(kf)
			continue
		}
		// Towards a backend without a next hop at ingress: left to the
		// engine.
		if !f.kernel.routed(kf.Backend.Addr()) {
			continue
		}
		// Another flow with the same request or reply key (one released
		// and replaced since the last flush) leaves first.
		if o, ok := nf.byReq[reqKey(kf)]; ok {
			remove(o)
		}
		if o, ok := nf.byReply[replyKey(kf)]; ok {
			remove(o)
		}
		c := kf.Client.Addr()
		h := nf.routes[c]
		if h == nil {
			r, ok := f.kernel.clientRoute(c)
			if !ok {
				continue // its replies stay with the IP stack and the engine: so do its requests
			}
			h = &clientHop{route: r}
			nf.routes[c] = h
			routes = append(routes, clientRouteOp{client: c, route: r, add: true})
		}
		h.refs++
		nf.mirror[kf] = struct{}{}
		nf.byReq[reqKey(kf)] = kf
		nf.byReply[replyKey(kf)] = kf
		ops = append(ops, natFlowOp{svc: st.svcs[kf.Service], kf: kf, add: true})
	}
	if len(ops) == 0 && len(routes) == 0 {
		return
	}
	if err := f.kernel.updateFlows(ops, routes); err != nil {
		if msg := err.Error(); msg != nf.err {
			f.log.Warn("fast path: updating the nat flow maps failed; rebuilding at the next poll", "error", err, "changes", len(ops))
			nf.err = msg
		}
		nf.broken = true
		return
	}
	nf.err = ""
}

// resetFlows forgets what the kernel held (its tables were replaced or
// removed) and marks every held flow, so that the next flush puts the
// ones that belong back.
func (f *FastPath) resetFlows(st *fastState) {
	st.nat = newNATFlows()
	f.held.markAll()
}

// countFlows reads s's flows' counters: the held flows whose counts moved
// are active now, and it returns the packets per client for touches.
func (f *FastPath) countFlows(st *fastState, s *fastService, now int64) (map[netip.Addr]uint64, error) {
	req, rep, err := f.kernel.flowCounts(s)
	if err != nil {
		return nil, err
	}
	nf := &st.nat
	perClient := map[netip.Addr]uint64{}
	var moved []dataplane.KernelFlow
	for kf := range nf.mirror {
		if kf.Service != s.id {
			continue
		}
		n := req[reqKey(kf)] + rep[kf.Upstream]
		perClient[kf.Client.Addr()] += n
		if last, ok := nf.packets[kf]; !ok || n != last {
			nf.packets[kf] = n
			if n > 0 {
				moved = append(moved, kf)
			}
		}
	}
	f.held.touched(moved, now)
	return perClient, nil
}

// carries reports whether the installed ingress stage carries service
// id's flows.
func (h *heldFlows) carries(id uint32) bool {
	live := h.live.Load()
	return live != nil && (*live)[id]
}

// overflowed records at now that the engine had no flow for a client of
// a service the ingress stage carries; it reports whether the client is
// new to the set.
func (h *heldFlows) overflowed(kf dataplane.KernelFlow, now int64) bool {
	if !h.carries(kf.Service) {
		return false
	}
	ck := clientKey(canonical(kf))
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.overflow[ck]; ok {
		return false
	}
	h.overflow[ck] = now
	return true
}

// overflowLen is the size of the overflow set.
func (h *heldFlows) overflowLen() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.overflow)
}

// inOverflow reports whether k is in the overflow set.
func (h *heldFlows) inOverflow(k dataplane.ClientKey) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.overflow[k]
	return ok
}

// overflowGrace is how long a client stays in the overflow set without a
// committed binding: the engine marks it at its first datagram, before
// the binding that datagram proposed commits.
const overflowGrace = 10 * time.Second

// expireOverflow takes out of the overflow set the clients marked before
// until without a binding (bound reports it): they left the table, or
// their binding never committed. The lookups run without the lock, which
// the listeners' handovers take.
func (h *heldFlows) expireOverflow(until int64, bound func(dataplane.ClientKey) bool) {
	h.mu.Lock()
	var old []dataplane.ClientKey
	for k, at := range h.overflow {
		if at < until {
			old = append(old, k)
		}
	}
	h.mu.Unlock()
	old = slices.DeleteFunc(old, bound)
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, k := range old {
		if at, ok := h.overflow[k]; ok && at < until {
			delete(h.overflow, k)
		}
	}
}

// Handover implements dataplane.KernelPath: a flow of a service the
// ingress stage carries is held and put in the kernel (true). A client of
// such a service the engine has no flow for (its flow limit) goes into
// the DNAT map instead: the conntrack path; its datagrams to the listener
// were untracked (listenerUntracked), so its next one takes the DNAT
// rule. Otherwise the flow's conntrack entry to the listener is deleted
// on the fast path's goroutine, so that its next datagram takes the DNAT
// rule. It never blocks.
func (f *FastPath) Handover(kf dataplane.KernelFlow) bool {
	if kf.Upstream.IsValid() && f.held.take(kf) {
		return true
	}
	if !kf.Upstream.IsValid() {
		if f.held.carries(kf.Service) {
			if f.held.overflowed(kf, f.cfg.Now()) {
				// The goroutine's diff puts it in the DNAT map, now
				// or when its binding commits.
				f.queue.Changed(clientKey(canonical(kf)))
			}
			return false
		}
		if !f.Forwards(clientKey(canonical(kf))) {
			return false // the listener is where it belongs
		}
	}
	f.handoverAsks.Add(1)
	select {
	case f.handovers <- ctFlow{client: kf.Client, local: kf.Local}:
	default:
		// More clients to move than the queue holds (many bound at
		// once): the next poll sweeps them all from one dump.
		f.sweepWanted.Store(true)
	}
	return false
}

// LastActive implements dataplane.KernelPath: when the kernel's counters
// last showed the flow forwarded (read every touch interval).
func (f *FastPath) LastActive(kf dataplane.KernelFlow) int64 { return f.held.lastActive(kf) }

// Release implements dataplane.KernelPath: the flow's elements leave the
// kernel at the next flush.
func (f *FastPath) Release(kf dataplane.KernelFlow) { f.held.release(kf) }

// recheckPerPoll bounds the client next hops each poll looks up again
// while the host's routes are still: a change the route events missed
// reaches 10,000 clients in about 5 minutes at the default poll, without a
// burst of lookups on the forwarding core. recheckBurst is the pace after
// a route event, for the pass under way and one full pass after it:
// 10,000 clients in 20 s.
const (
	recheckPerPoll = 32
	recheckBurst   = 512
)

// recheckRoutes looks up again the next hops of the next client addresses
// and replaces those that changed; a client without one any more keeps
// the last (its flows stay until they close).
func (f *FastPath) recheckRoutes(st *fastState) {
	nf := &st.nat
	if f.kernel.routesChanged() {
		nf.burst = 2
	}
	if len(nf.routes) == 0 {
		nf.recheck, nf.burst = nil, 0
		return
	}
	if len(nf.recheck) == 0 {
		for c := range nf.routes {
			nf.recheck = append(nf.recheck, c)
		}
		if nf.burst > 0 {
			nf.burst--
		}
	}
	pace := recheckPerPoll
	if nf.burst > 0 {
		pace = recheckBurst
	}
	n := min(len(nf.recheck), pace)
	var ops []clientRouteOp
	for _, c := range nf.recheck[:n] {
		h := nf.routes[c]
		if h == nil {
			continue // its flows left since
		}
		r, ok := f.kernel.clientRoute(c)
		if !ok || r == h.route {
			continue
		}
		ops = append(ops, clientRouteOp{client: c, route: h.route}, clientRouteOp{client: c, route: r, add: true})
		h.route = r
	}
	nf.recheck = nf.recheck[n:]
	if len(ops) == 0 {
		return
	}
	if err := f.kernel.updateFlows(nil, ops); err != nil {
		f.log.Warn("fast path: updating client next hops failed; rebuilding at the next poll", "error", err)
		nf.broken = true
		return
	}
	f.log.Info("fast path: client next hops changed", "clients", len(ops)/2)
}
