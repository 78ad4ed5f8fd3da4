package hostnet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ikelb/ikelb/dataplane"
)

// Fast path defaults for FastPathConfig's zero fields.
const (
	DefaultFastNFTTable   = "ikelb_fast"
	DefaultFastBatchDelay = 5 * time.Millisecond
	DefaultFastBatchMax   = 4096
	DefaultFastQueueSize  = 1 << 16
	DefaultFastPoll       = time.Second
)

// ErrFastPathUnavailable: the host cannot run the kernel fast path (no
// privilege, no nftables, or forwarding off); the message says which.
var ErrFastPathUnavailable = errors.New("kernel fast path unavailable")

// FastPathConfig configures a FastPath. Zero fields take the defaults.
type FastPathConfig struct {
	Logger *slog.Logger     // required
	Table  *dataplane.Table // required: the committed affinity table
	// Proposer receives touches for the clients the kernel forwards (the
	// userspace path, which proposes them otherwise, no longer sees their
	// packets). Nil: none, and their affinities expire while in use.
	Proposer dataplane.Proposer
	// NFTTable is the inet nftables table the fast path owns. It is not
	// Config.NFTTable: Manager replaces that one atomically on every Apply.
	NFTTable string
	// BatchDelay is how long committed changes are gathered into one nft
	// transaction; BatchMax flushes earlier.
	BatchDelay time.Duration
	BatchMax   int
	// QueueSize bounds the table changes waiting for the fast path's
	// goroutine; beyond it the map is resynced from the whole table.
	QueueSize int
	// Poll is how often the kernel counters are read (and the active-client
	// sets checked for touches due).
	Poll time.Duration
	// Now returns Unix nanoseconds (touch times); default time.Now.
	Now func() int64
	// ConntrackNAT keeps nat clients on the conntrack path (DNAT and
	// SNAT rules) even where the ingress stage could carry their flows
	// statelessly.
	ConntrackNAT bool
}

func (c *FastPathConfig) setDefaults() {
	if c.NFTTable == "" {
		c.NFTTable = DefaultFastNFTTable
	}
	if c.BatchDelay <= 0 {
		c.BatchDelay = DefaultFastBatchDelay
	}
	if c.BatchMax <= 0 {
		c.BatchMax = DefaultFastBatchMax
	}
	if c.QueueSize <= 0 {
		c.QueueSize = DefaultFastQueueSize
	}
	if c.Poll <= 0 {
		c.Poll = DefaultFastPoll
	}
	if c.Now == nil {
		c.Now = func() int64 { return time.Now().UnixNano() }
	}
}

// FastCounters are one service's packets through the kernel fast path:
// client → backend (Packets, Bytes) and backend → client (Reply*), as the
// nft counters count them (IP length), since the FastPath started.
type FastCounters struct {
	Packets, Bytes           uint64
	ReplyPackets, ReplyBytes uint64
}

// fastService is the part of a committed nat-mode service the fast path
// needs.
type fastService struct {
	id    uint32
	vip   netip.Addr // unmapped
	ports []uint16   // sorted
	snat  netip.Addr // invalid: masquerade
	// backends that may keep their clients (Usable) and have the VIP's
	// family: ID → address. The kernel cannot translate between families.
	backends   map[uint32]netip.Addr
	touchEvery time.Duration
	// transparent: stateless rules (daddr rewrite for requests, saddr
	// rewrite for replies) instead of DNAT/SNAT; replyFrom holds every
	// backend of the VIP's family, whatever its state (sorted): for
	// transparent the replies the kernel re-addresses from the VIP, for
	// an IPv4 nat service the ingress stage may carry the sources whose
	// datagrams to the VIP stay tracked (replies of DNATed flows, whose
	// SNAT address may be the VIP's).
	transparent bool
	replyFrom   []netip.Addr
}

func (s *fastService) v6() bool { return !s.vip.Is4() }

// sameRules reports whether a and b need the same nft rules (backends go
// into the map, not the rules; a nat service's replyFrom goes into a set
// that fastKernel.replies updates in place).
func (s *fastService) sameRules(o *fastService) bool {
	return s.id == o.id && s.vip == o.vip && s.snat == o.snat && slices.Equal(s.ports, o.ports) &&
		s.transparent == o.transparent && (!s.transparent || slices.Equal(s.replyFrom, o.replyFrom))
}

// fastEligible reports whether the fast path serves s (given that the
// kernel forwards its family): nat mode, and transparent mode with an
// IPv4 VIP. A loopback VIP or backend would be rewritten to local
// delivery, not forwarded: those stay on the userspace path. Transparent
// IPv6 stays in userspace: rewriting an IPv6 address needs the payload
// expression's L4 pseudo-header checksum flag without an inet checksum
// type (what the nft CLI emits), which github.com/google/nftables v0.3.0
// does not marshal (it sends the flags only with a checksum type).
func fastEligible(s dataplane.Service) bool {
	if !s.VIP.IsValid() || len(s.Ports) == 0 || s.VIP.Unmap().IsLoopback() {
		return false
	}
	switch s.Mode {
	case dataplane.ModeNAT:
		return !s.SNAT.IsValid() || s.SNAT.Unmap().Is4() == s.VIP.Unmap().Is4()
	case dataplane.ModeTransparent:
		return s.VIP.Unmap().Is4()
	}
	return false
}

// fastServices selects the services the fast path serves (fastEligible);
// natIngress fills replyFrom for IPv4 nat services too (the ingress stage
// may carry them). Why transparent mode is stateless: dataplane/DESIGN.md
// "Kernel fast path".
func fastServices(set []dataplane.Service, natIngress bool) map[uint32]*fastService {
	out := map[uint32]*fastService{}
	for _, s := range set {
		if !fastEligible(s) {
			continue
		}
		fs := &fastService{
			id: s.ID, vip: s.VIP.Unmap(), ports: slices.Clone(s.Ports),
			backends: map[uint32]netip.Addr{}, touchEvery: dataplane.MaxTouchInterval,
			transparent: s.Mode == dataplane.ModeTransparent,
		}
		slices.Sort(fs.ports)
		fs.ports = slices.Compact(fs.ports)
		if s.SNAT.IsValid() && !fs.transparent {
			fs.snat = s.SNAT.Unmap()
		}
		if s.Timeout > 0 {
			fs.touchEvery = min(s.Timeout/4, dataplane.MaxTouchInterval)
		}
		for _, b := range s.Backends {
			a := b.Addr.Unmap()
			if a.Is4() != fs.vip.Is4() || a.IsLoopback() {
				continue
			}
			if b.Usable() {
				fs.backends[b.ID] = a
			}
			if fs.transparent || (natIngress && fs.vip.Is4()) {
				fs.replyFrom = append(fs.replyFrom, a)
			}
		}
		slices.SortFunc(fs.replyFrom, netip.Addr.Compare)
		fs.replyFrom = slices.Compact(fs.replyFrom)
		out[s.ID] = fs
	}
	return out
}

// mapOp is one change to a service's affinity map.
type mapOp struct {
	svc     *fastService
	client  netip.Addr
	backend netip.Addr // invalid: delete
	// forget: delete the client's conntrack entries to the VIP (it was in
	// the map with another backend, or leaves the map).
	forget bool
}

// ctFlow is a conntrack entry's original direction: client → local
// (a listener's VIP:port).
type ctFlow struct{ client, local netip.AddrPort }

// natFlowOp is a handed-over nat flow entering (add) or leaving the
// ingress stage's flow maps (natingress_linux.go).
type natFlowOp struct {
	svc *fastService
	kf  dataplane.KernelFlow
	add bool
}

// clientRouteOp is a client's next hop entering (add) or leaving the
// ingress stage's client next-hop maps.
type clientRouteOp struct {
	client netip.Addr
	route  ingressRoute
	add    bool
}

// natReqKey is what the ingress stage keys a flow's requests by.
type natReqKey struct {
	client netip.AddrPort
	vport  uint16
}

// ingressRoute is a next hop: the neighbour and the interface.
type ingressRoute struct {
	via   netip.Addr
	index int
}

// fastKernel is the nftables and conntrack side (fastpath_linux.go).
type fastKernel interface {
	// install replaces the whole table with the rules of svcs and the
	// given map contents, in one transaction.
	install(svcs map[uint32]*fastService, elems map[dataplane.ClientKey]netip.Addr) error
	// update applies map changes in one transaction (deletes before adds).
	update(ops []mapOp) error
	// forget deletes the conntrack entries of the ops' clients to their
	// service's VIP:ports, so that their next packet is decided afresh.
	forget(ops []mapOp) error
	// counters reads every service's counters.
	counters(svcs map[uint32]*fastService) (map[uint32]FastCounters, error)
	// activity returns, per client in s's map, the packets the kernel
	// has matched to its element since the element was added.
	activity(s *fastService) (map[netip.Addr]uint64, error)
	// remove deletes the table.
	remove() error
	// handover deletes the conntrack entries of flows (by exact tuple).
	handover(flows []ctFlow) error
	// sweep deletes every conntrack entry to a nat service's listener
	// (VIP:port delivered locally, not DNATed) of a client forwards says
	// the kernel forwards, from one dump, and returns how many.
	sweep(svcs map[uint32]*fastService, forwards func(dataplane.ClientKey) bool) (int, error)
	// refresh reads the host's interfaces and routes again for the
	// installed rules: routes it updates itself; true asks for a
	// reinstall (the rules depend on what changed).
	refresh(svcs map[uint32]*fastService) (bool, error)
	// forwards reports whether the kernel forwards the family (the fast
	// path needs it and does not turn it on).
	forwards(v6 bool) bool
	// ingressNAT reports the nat services whose handed-over flows the
	// installed ingress stage carries statelessly (they have no DNAT
	// rule).
	ingressNAT() map[uint32]bool
	// routed reports whether the ingress stage has a next hop for a
	// backend.
	routed(backend netip.Addr) bool
	// clientRoute is the next hop towards a client through an interface
	// the ingress stage hooks (false: none).
	clientRoute(client netip.Addr) (ingressRoute, bool)
	// updateFlows applies flow and client next-hop changes, deletes
	// before adds.
	updateFlows(flows []natFlowOp, routes []clientRouteOp) error
	// flowCounts reads the packets the ingress stage matched to s's
	// flows: requests by client and VIP port, replies by upstream.
	flowCounts(s *fastService) (map[natReqKey]uint64, map[netip.AddrPort]uint64, error)
	// replies makes the installed backend set of nat service s hold
	// s.replyFrom (its backends changed; no-op where s has none).
	replies(s *fastService) error
	// routesChanged reports whether the host's routes changed since the
	// last call (false where it cannot tell).
	routesChanged() bool
	// close releases what the kernel side holds besides its tables (after
	// remove; once).
	close()
}

// FastPath keeps the kernel forwarding established clients of nat-mode
// and (IPv4) transparent-mode services: per service an nft map client →
// backend holding exactly the committed affinities whose backend is
// usable; for nat a DNAT rule that uses it and SNAT for those flows, for
// transparent stateless address rewrites of untracked requests and
// replies (a client not in the map falls through to the userspace
// listener); counters, and an active-client set from which it proposes
// touches. See the package doc and dataplane/DESIGN.md.
type FastPath struct {
	// set once
	cfg    FastPathConfig
	log    *slog.Logger
	table  *dataplane.Table
	queue  *dataplane.ChangeQueue
	kernel fastKernel
	cancel context.CancelFunc
	done   chan struct{}
	wake   chan struct{} // capacity 1: a new service set is pending
	// clientsReq asks the goroutine for KernelClients' counts.
	clientsReq chan chan map[uint32]dataplane.KernelClients
	// handovers: flows whose conntrack entries the goroutine deletes
	// (Handover; full: dropped, the listener asks again at the flow's
	// next datagram after 100 ms).
	handovers chan ctFlow
	// held: the nat flows the engine handed over to the ingress stage
	// (fastpath_nat.go).
	held *heldFlows
	// sweepWanted: Handover's queue overflowed since the last poll;
	// handoverAsks: Handover calls since then.
	sweepWanted  atomic.Bool
	handoverAsks atomic.Int64
	// live is the service set whose rules are installed (nil: none), for
	// Forwards; the goroutine replaces it, never changes it.
	live atomic.Pointer[map[uint32]*fastService]

	mu      sync.Mutex // guards the following
	pending []dataplane.Service
	hasSet  bool
	gen     uint64 // of the latest SetServices
	// the goroutine's answer to the set of generation applied: the
	// transparent services whose stateless rules are installed;
	// appliedCh is closed (and replaced) when it changes.
	applied   uint64
	covered   map[uint32]bool
	appliedCh chan struct{}
	// notify is called (on the goroutine) when the covered set changes
	// outside a SetServices, e.g. a failed rebuild took the rules away.
	notify   func()
	notifyWG sync.WaitGroup          // notify calls under way; Close waits
	counters map[uint32]FastCounters // latest read, cumulative
	base     map[uint32]FastCounters // counts of objects replaced by a rebuild
	closed   bool
}

// NewFastPath checks that the host can run the fast path, removes a stale
// table, subscribes to the table's changes and starts the fast path's
// goroutine. It installs nothing until SetServices names a nat service.
func NewFastPath(cfg FastPathConfig) (*FastPath, error) {
	cfg.setDefaults()
	if cfg.Logger == nil || cfg.Table == nil {
		return nil, fmt.Errorf("%w: fast path needs a logger and a table", ErrInvalidConfig)
	}
	k, err := newFastKernel(cfg.NFTTable, cfg.Logger, cfg.ConntrackNAT)
	if err != nil {
		return nil, err
	}
	return startFastPath(cfg, k), nil
}

func startFastPath(cfg FastPathConfig, k fastKernel) *FastPath {
	cfg.setDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	f := &FastPath{
		cfg: cfg, log: cfg.Logger, table: cfg.Table, kernel: k,
		queue:      dataplane.NewChangeQueue(cfg.QueueSize),
		cancel:     cancel,
		done:       make(chan struct{}),
		wake:       make(chan struct{}, 1),
		clientsReq: make(chan chan map[uint32]dataplane.KernelClients),
		handovers:  make(chan ctFlow, handoverQueue),
		held:       newHeldFlows(),
		counters:   map[uint32]FastCounters{},
		base:       map[uint32]FastCounters{},
		covered:    map[uint32]bool{},
		appliedCh:  make(chan struct{}),
	}
	f.table.SetObserver(f.queue)
	go f.run(ctx)
	return f
}

// SetServices hands the committed service set to the fast path; it returns
// at once (the fast path's goroutine reconciles the kernel, a backend that
// is no longer usable leaving the map first).
func (f *FastPath) SetServices(set []dataplane.Service) { f.setServices(set) }

func (f *FastPath) setServices(set []dataplane.Service) uint64 {
	f.mu.Lock()
	f.gen++
	gen := f.gen
	f.pending, f.hasSet = set, true
	f.mu.Unlock()
	select {
	case f.wake <- struct{}{}:
	default:
	}
	return gen
}

// Transparent returns the IDs of the transparent services whose stateless
// kernel rules are installed (their replies are re-addressed by the
// kernel, so hostnet's TPROXY rule must not divert them), once the fast
// path has applied SetServices generation gen or timeout passed
// (then: as of the last set applied).
func (f *FastPath) transparent(gen uint64, timeout time.Duration) map[uint32]bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		f.mu.Lock()
		done, ch := f.applied >= gen || f.closed, f.appliedCh
		if done {
			out := maps.Clone(f.covered)
			f.mu.Unlock()
			return out
		}
		f.mu.Unlock()
		select {
		case <-ch:
		case <-deadline.C:
			f.mu.Lock()
			defer f.mu.Unlock()
			return maps.Clone(f.covered)
		}
	}
}

// publish records which transparent services st has installed, for the
// set of generation gen (0: keep the generation).
func (f *FastPath) publish(st *fastState, gen uint64) {
	if st.installed {
		svcs := st.svcs
		f.live.Store(&svcs)
		nat := maps.Clone(f.kernel.ingressNAT())
		f.held.live.Store(&nat)
	} else {
		f.live.Store(nil)
		f.held.live.Store(nil)
	}
	covered := map[uint32]bool{}
	if st.installed {
		for id, s := range st.svcs {
			if s.transparent {
				covered[id] = true
			}
		}
	}
	f.mu.Lock()
	if gen > f.applied {
		f.applied = gen
	}
	changed := !maps.Equal(f.covered, covered)
	f.covered = covered
	close(f.appliedCh)
	f.appliedCh = make(chan struct{})
	notify := f.notify
	call := changed && gen == 0 && notify != nil && !f.closed
	if call {
		f.notifyWG.Add(1) // Close waits: a late notify would re-apply host rules after their owner removed them
	}
	f.mu.Unlock()
	if call {
		go func() { // never block the goroutine
			defer f.notifyWG.Done()
			notify()
		}()
	}
}

// Counters returns the kernel's counts per service ID, as of the last poll
// (FastPathConfig.Poll).
func (f *FastPath) Counters() map[uint32]FastCounters {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[uint32]FastCounters, len(f.counters))
	for id, c := range f.counters {
		out[id] = c
	}
	return out
}

// Close stops the goroutine, unsubscribes from the table and removes the
// nft table; the kernel stops forwarding (established kernel flows then
// reach the userspace listener, which re-picks them).
func (f *FastPath) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	f.mu.Unlock()
	f.live.Store(nil)
	f.held.live.Store(nil)
	f.table.SetObserver(nil)
	f.cancel()
	<-f.done
	// Wake transparent() waiters (a SetServices holding the Dataplane's
	// lock that a notify call may be waiting for), then wait for notify.
	f.mu.Lock()
	close(f.appliedCh)
	f.appliedCh = make(chan struct{})
	f.mu.Unlock()
	f.notifyWG.Wait()
	defer f.kernel.close()
	return f.kernel.remove()
}

// state is what the fast path's goroutine owns.
type fastState struct {
	svcs      map[uint32]*fastService
	installed bool                               // the table exists with svcs' rules
	mirror    map[dataplane.ClientKey]netip.Addr // what the maps hold
	dirty     map[dataplane.ClientKey]struct{}   // changed since the last flush
	lastTouch map[uint32]int64                   // per service, Unix ns
	// packets per map element at the last activity read: a client
	// whose count moved was forwarded since.
	packets map[dataplane.ClientKey]uint64
	keys    []dataplane.ClientKey // Take's buffer
	// refreshErr is the last refresh error logged (logged again only
	// when it changes).
	refreshErr string
	// handoverErr likewise for handovers.
	handoverErr string
	// nat: the handed-over nat flows in the kernel (fastpath_nat.go).
	nat natFlows
	// overflowSwept: when the overflow set was last expired (Unix ns);
	// overflowing: the set was not empty at the last poll (logged).
	overflowSwept int64
	overflowing   bool
}

func (f *FastPath) run(ctx context.Context) {
	defer close(f.done)
	st := &fastState{
		mirror: map[dataplane.ClientKey]netip.Addr{}, dirty: map[dataplane.ClientKey]struct{}{},
		lastTouch: map[uint32]int64{}, packets: map[dataplane.ClientKey]uint64{},
		nat: newNATFlows(),
	}
	poll := time.NewTicker(f.cfg.Poll)
	defer poll.Stop()
	flush := time.NewTimer(time.Hour)
	flush.Stop()
	flushArmed := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-f.wake:
			f.mu.Lock()
			set, ok, gen := f.pending, f.hasSet, f.gen
			f.pending, f.hasSet = nil, false
			f.mu.Unlock()
			if ok {
				f.applyServices(st, set)
				f.publish(st, gen)
			}
		case <-f.queue.Ready():
			if f.take(st) && !flushArmed {
				flush.Reset(f.cfg.BatchDelay)
				flushArmed = true
			}
			if len(st.dirty) >= f.cfg.BatchMax {
				f.flush(st)
			}
		case <-f.held.kick:
			if !flushArmed {
				flush.Reset(f.cfg.BatchDelay)
				flushArmed = true
			}
		case <-flush.C:
			flushArmed = false
			f.flush(st)
		case <-poll.C:
			f.poll(st)
			f.sweep(st)
		case fl := <-f.handovers:
			f.handover(st, fl)
		case reply := <-f.clientsReq:
			reply <- kernelClients(st)
		}
	}
}

// take moves queued changes into st.dirty (or resyncs) and reports
// whether a flush is due.
func (f *FastPath) take(st *fastState) bool {
	var resync bool
	st.keys, resync = f.queue.Take(st.keys[:0], f.cfg.BatchMax)
	if resync {
		f.resync(st)
		return false
	}
	for _, k := range st.keys {
		if _, ok := st.svcs[k.Service]; ok {
			st.dirty[k] = struct{}{}
		}
	}
	return len(st.dirty) > 0
}

// handoverQueue bounds the flows waiting for Handover's deletes.
const handoverQueue = 4096

// sweepAfter is how many Handover calls between two polls make the poll
// sweep instead of leaving them to the queue.
const sweepAfter = handoverQueue / 4

// sweep deletes, when Handover's queue overflowed or was asked sweepAfter
// times since the last poll, the listener entries of every client the
// kernel forwards. One by one, at the rate the listener asks for them
// while it shares a saturated core with the traffic, 100,000 clients
// bound at once took over a minute to move (test/bench scale suite); a
// sweep is one dump and batched deletes (90,634 clients in 1.6 s there).
// A trickle of new clients stays with the queue: a dump reads the whole
// conntrack table.
func (f *FastPath) sweep(st *fastState) {
	asks := f.handoverAsks.Swap(0)
	if !st.installed || !(f.sweepWanted.Swap(false) || asks >= sweepAfter) {
		return
	}
	// The listeners of services the ingress stage carries have no
	// conntrack entries (listenerUntracked).
	nat := f.kernel.ingressNAT()
	svcs := maps.Clone(st.svcs)
	maps.DeleteFunc(svcs, func(id uint32, _ *fastService) bool { return nat[id] })
	start := time.Now()
	n, err := f.kernel.sweep(svcs, func(k dataplane.ClientKey) bool {
		_, ok := f.mapEntry(st.svcs, k)
		return ok
	})
	if err != nil {
		if msg := err.Error(); msg != st.handoverErr {
			f.log.Warn("fast path: sweeping handed-over clients' conntrack entries failed; they stay on the userspace path until asked for one by one", "error", err)
			st.handoverErr = msg
		}
		return
	}
	if n > 0 {
		f.log.Info("fast path: moved clients still reaching the listener to the kernel", "clients", n, "took", time.Since(start).Round(time.Millisecond))
	}
}

// handover deletes first's and the other queued flows' entries.
func (f *FastPath) handover(st *fastState, first ctFlow) {
	flows := map[ctFlow]bool{first: true}
drain:
	for len(flows) < handoverQueue {
		select {
		case fl := <-f.handovers:
			flows[fl] = true
		default:
			break drain
		}
	}
	if err := f.kernel.handover(slices.Collect(maps.Keys(flows))); err != nil {
		if msg := err.Error(); msg != st.handoverErr {
			f.log.Warn("fast path: deleting handed-over flows' conntrack entries failed; those datagrams stay on the userspace path", "error", err)
			st.handoverErr = msg
		}
		return
	}
	st.handoverErr = ""
}

// clientsWait bounds how long KernelClients waits for the goroutine (busy
// with a large install, say).
const clientsWait = time.Second

// KernelClients returns, per nat service the fast path serves, the flows
// and clients the kernel carries, as the fast path's goroutine last put
// them there; nil if the goroutine does not answer within clientsWait or
// the fast path is closed.
func (f *FastPath) KernelClients() map[uint32]dataplane.KernelClients {
	reply := make(chan map[uint32]dataplane.KernelClients, 1)
	t := time.NewTimer(clientsWait)
	defer t.Stop()
	select {
	case f.clientsReq <- reply:
	case <-f.done:
		return nil
	case <-t.C:
		return nil
	}
	select {
	case m := <-reply:
		return m
	case <-f.done:
		return nil
	}
}

func kernelClients(st *fastState) map[uint32]dataplane.KernelClients {
	out := map[uint32]dataplane.KernelClients{}
	if !st.installed {
		return out
	}
	for id, s := range st.svcs {
		if !s.transparent {
			out[id] = dataplane.KernelClients{}
		}
	}
	for kf := range st.nat.mirror {
		if c, ok := out[kf.Service]; ok {
			c.Flows++
			out[kf.Service] = c
		}
	}
	for k := range st.mirror {
		if c, ok := out[k.Service]; ok {
			c.DNAT++
			out[k.Service] = c
		}
	}
	return out
}

// Forwards reports whether the kernel forwards k: its service's rules
// are installed and its committed binding belongs in the map (the map
// itself follows within BatchDelay). It implements dataplane.KernelPath.
func (f *FastPath) Forwards(k dataplane.ClientKey) bool {
	svcs := f.live.Load()
	if svcs == nil {
		return false
	}
	_, ok := f.mapEntry(*svcs, k)
	return ok
}

// want is k's DNAT map entry as the committed state says. For a service
// whose flows the ingress stage carries, only the clients the engine had
// no flow for (Handover) are in it.
func (f *FastPath) want(st *fastState, k dataplane.ClientKey) (netip.Addr, bool) {
	a, ok := f.mapEntry(st.svcs, k)
	if f.kernel.ingressNAT()[k.Service] && !f.held.inOverflow(k) {
		return netip.Addr{}, false
	}
	return a, ok
}

func (f *FastPath) mapEntry(svcs map[uint32]*fastService, k dataplane.ClientKey) (netip.Addr, bool) {
	s := svcs[k.Service]
	if s == nil {
		return netip.Addr{}, false
	}
	if c := k.Client.Netip(); c.Is4() == s.v6() {
		return netip.Addr{}, false
	}
	e, ok := f.table.Lookup(k)
	if !ok {
		return netip.Addr{}, false
	}
	a, ok := s.backends[e.Backend]
	return a, ok
}

// flush applies st.dirty to the maps in one transaction, then forgets the
// conntrack entries of the clients that left a map or changed backend.
func (f *FastPath) flush(st *fastState) {
	if len(st.dirty) > 0 && st.installed {
		// A client whose binding changed may have flows in the
		// ingress stage that no longer belong there.
		f.held.markClients(st.dirty)
		var ops []mapOp
		for k := range st.dirty {
			ops = f.diff(st, k, ops)
		}
		f.apply(st, ops)
	}
	clear(st.dirty)
	f.flushFlows(st)
}

// diff appends the ops that make k's map entry what the table says.
func (f *FastPath) diff(st *fastState, k dataplane.ClientKey, ops []mapOp) []mapOp {
	want, ok := f.want(st, k)
	have, had := st.mirror[k]
	s := st.svcs[k.Service]
	c := k.Client.Netip()
	switch {
	case ok && !had:
		ops = append(ops, mapOp{svc: s, client: c, backend: want})
	case ok && had && want != have:
		ops = append(ops, mapOp{svc: s, client: c}, mapOp{svc: s, client: c, backend: want, forget: !s.transparent})
	case !ok && had:
		if s == nil {
			break // its service is gone with its map
		}
		ops = append(ops, mapOp{svc: s, client: c, forget: !s.transparent})
	}
	return ops
}

func (f *FastPath) apply(st *fastState, ops []mapOp) {
	if len(ops) == 0 {
		return
	}
	if err := f.kernel.update(ops); err != nil {
		// The maps' content is unknown now: rebuild everything.
		f.log.Warn("fast path map update failed; rebuilding", "error", err, "changes", len(ops))
		st.installed = false
		f.resync(st)
		return
	}
	var forget []mapOp
	for _, op := range ops {
		k := dataplane.ClientKey{Service: op.svc.id, Client: dataplane.AddrFrom(op.client)}
		if op.backend.IsValid() {
			st.mirror[k] = op.backend
		} else {
			delete(st.mirror, k)
		}
		if op.forget {
			forget = append(forget, op)
		}
	}
	f.forget(forget)
}

func (f *FastPath) forget(ops []mapOp) {
	if len(ops) == 0 {
		return
	}
	if err := f.kernel.forget(ops); err != nil {
		f.log.Warn("fast path: deleting conntrack entries failed; those clients stay on their old backend until their entries expire",
			"error", err, "clients", len(ops))
	}
}

// applyServices reconciles the rules with a new service set and resyncs
// the maps.
func (f *FastPath) applyServices(st *fastState, set []dataplane.Service) {
	next := fastServices(set, !f.cfg.ConntrackNAT)
	for id, s := range next {
		if !f.kernel.forwards(s.v6()) {
			f.log.Warn("fast path off for a service: the kernel does not forward its family", "service_id", id, "vip", s.vip.String())
			delete(next, id)
		}
	}
	same := len(next) == len(st.svcs)
	for id, s := range next {
		if o := st.svcs[id]; o == nil || !o.sameRules(s) {
			same = false
		}
	}
	old := st.svcs
	st.svcs = next
	maps.DeleteFunc(st.packets, func(k dataplane.ClientKey, _ uint64) bool { return next[k.Service] == nil })
	if !same || !st.installed {
		f.rebuild(st, old)
		return
	}
	for id, s := range next {
		if !s.transparent && !slices.Equal(s.replyFrom, old[id].replyFrom) {
			if err := f.kernel.replies(s); err != nil {
				f.log.Warn("fast path: updating a nat service's backend set failed; rebuilding", "error", err, "service_id", id)
				f.rebuild(st, old)
				return
			}
		}
	}
	f.resync(st)
}

// resync recomputes every map from the whole table and applies the
// difference (or rebuilds if the table is not installed).
func (f *FastPath) resync(st *fastState) {
	if !st.installed {
		f.rebuild(st, st.svcs)
		return
	}
	clear(st.dirty)
	var ops []mapOp
	seen := map[dataplane.ClientKey]bool{}
	f.table.Range(func(k dataplane.ClientKey, _ dataplane.Entry) bool {
		if _, ok := st.svcs[k.Service]; ok {
			seen[k] = true
			ops = f.diff(st, k, ops)
		}
		return true
	})
	for k := range st.mirror {
		if !seen[k] {
			ops = f.diff(st, k, ops)
		}
	}
	f.apply(st, ops)
}

// rebuild replaces the nft table with the rules of st.svcs and maps filled
// from the whole table; old is the previous set (its clients' DNAT entries
// are forgotten where the new maps differ).
func (f *FastPath) rebuild(st *fastState, old map[uint32]*fastService) {
	clear(st.dirty)
	if st.installed {
		f.readCounters(old) // keep the counts of the objects about to be replaced
	}
	f.mu.Lock()
	for id, c := range f.counters {
		f.base[id] = c
	}
	f.mu.Unlock()

	elems := map[dataplane.ClientKey]netip.Addr{}
	f.table.Range(func(k dataplane.ClientKey, _ dataplane.Entry) bool {
		if a, ok := f.want(st, k); ok {
			elems[k] = a
		}
		return true
	})
	if len(st.svcs) == 0 {
		if st.installed || len(st.mirror) > 0 {
			if err := f.kernel.remove(); err != nil {
				f.log.Warn("fast path: removing the nft table failed", "error", err)
				return
			}
		}
	} else if err := f.kernel.install(st.svcs, elems); err != nil {
		f.log.Error("fast path: installing the nft table failed; clients stay on the userspace path", "error", err)
		// The failed transaction left the previous table in place: it
		// would keep forwarding with a map nothing maintains any more
		// (flushes and polls stop while not installed). Take it away and
		// forget its nat clients' DNAT entries, so that the userspace path
		// decides them.
		if err := f.kernel.remove(); err != nil {
			f.log.Warn("fast path: removing the previous nft table failed", "error", err)
		} else {
			var forget []mapOp
			for k := range st.mirror {
				if s := old[k.Service]; s != nil && !s.transparent {
					forget = append(forget, mapOp{svc: s, client: k.Client.Netip(), forget: true})
				}
			}
			st.mirror = map[dataplane.ClientKey]netip.Addr{}
			f.forget(forget)
		}
		st.installed = false
		st.nat = newNATFlows()
		f.publish(st, 0)
		return
	}
	var forget []mapOp
	for k, a := range st.mirror {
		if elems[k] == a {
			continue
		}
		if s := old[k.Service]; s != nil && !s.transparent { // transparent clients have no conntrack entry to forget
			forget = append(forget, mapOp{svc: s, client: k.Client.Netip(), forget: true})
		}
	}
	if len(st.svcs) > 0 {
		f.log.Info("fast path rules installed", "nft_table", "inet "+f.cfg.NFTTable,
			"services", len(st.svcs), "clients", len(elems))
	} else if st.installed {
		f.log.Info("fast path rules removed", "nft_table", "inet "+f.cfg.NFTTable)
	}
	st.mirror = elems
	st.installed = len(st.svcs) > 0
	f.forget(forget)
	f.publish(st, 0)
	if st.installed && len(f.kernel.ingressNAT()) > 0 {
		// The maps were filled before the install decided which nat
		// services the ingress stage carries: their DNAT maps keep only
		// the overflow clients.
		f.resync(st)
	}
	f.resetFlows(st)
	f.flushFlows(st)
}

// poll reads the counters and proposes touches for the clients the kernel
// forwarded, per service every touchEvery.
func (f *FastPath) poll(st *fastState) {
	if !st.installed {
		return
	}
	if st.nat.broken {
		f.log.Info("fast path: rebuilding after a failed nat flow update")
		f.rebuild(st, st.svcs)
		if !st.installed {
			return
		}
	}
	if again, err := f.kernel.refresh(st.svcs); err != nil {
		if msg := err.Error(); msg != st.refreshErr {
			f.log.Warn("fast path: reading interfaces and routes failed", "error", err)
			st.refreshErr = msg
		}
	} else if st.refreshErr = ""; again {
		f.log.Info("fast path: interfaces changed; reinstalling the rules")
		f.rebuild(st, st.svcs)
		if !st.installed {
			return
		}
	}
	f.recheckRoutes(st)
	f.readCounters(st.svcs)
	now := f.cfg.Now()
	if now-st.overflowSwept >= int64(overflowGrace) {
		st.overflowSwept = now
		f.held.expireOverflow(now-int64(overflowGrace), func(k dataplane.ClientKey) bool {
			_, ok := f.table.Lookup(k)
			return ok
		})
	}
	if n := f.held.overflowLen(); (n > 0) != st.overflowing {
		st.overflowing = n > 0
		if n > 0 {
			f.log.Info("fast path: clients beyond the engine's flow limit go through conntrack (DNAT and SNAT) instead of the nat ingress stage; raise the open-file limit for more at ingress", "clients", n)
		} else {
			f.log.Info("fast path: no clients beyond the engine's flow limit any more")
		}
	}
	nat := f.kernel.ingressNAT()
	for id, s := range st.svcs {
		if f.cfg.Proposer == nil && !nat[id] {
			continue // no touches to propose; a held flow's activity is still read
		}
		if now-st.lastTouch[id] < int64(s.touchEvery) {
			continue
		}
		st.lastTouch[id] = now
		var counts map[netip.Addr]uint64
		var err error
		if nat[id] {
			counts, err = f.countFlows(st, s, now)
			if err == nil {
				// And the clients the DNAT map carries (the engine's
				// flow limit), if any: a change in either moves the sum.
				ct, cerr := f.kernel.activity(s)
				for c, n := range ct {
					counts[c] += n
				}
				err = cerr
			}
		} else {
			counts, err = f.kernel.activity(s)
		}
		if err != nil {
			f.log.Warn("fast path: reading active clients failed", "error", err, "service_id", id)
			continue
		}
		if f.cfg.Proposer != nil {
			f.touch(st, id, counts, now, nat[id])
		}
	}
}

// touch proposes a touch for every client of service id in the map whose
// element counted packets since the last read (a count below the last one:
// the element was replaced, and counted since), and keeps the counts.
func (f *FastPath) touch(st *fastState, id uint32, counts map[netip.Addr]uint64, now int64, nat bool) {
	for k := range st.packets {
		if k.Service == id {
			if _, ok := counts[k.Client.Netip()]; !ok {
				delete(st.packets, k)
			}
		}
	}
	for c, n := range counts {
		k := dataplane.ClientKey{Service: id, Client: dataplane.AddrFrom(c)}
		last, known := st.packets[k]
		st.packets[k] = n
		if n == 0 || (known && n == last) {
			continue
		}
		// In the map; or with flows in the ingress stage (counts holds
		// only the flows put there for the client's committed backend).
		if _, ok := st.mirror[k]; ok || nat {
			f.cfg.Proposer.Propose(dataplane.Proposal{Kind: dataplane.ProposeTouch, Key: k, At: now})
		}
	}
}

// readCounters adds the kernel's counts of svcs' objects to the bases.
func (f *FastPath) readCounters(svcs map[uint32]*fastService) {
	c, err := f.kernel.counters(svcs)
	if err != nil {
		f.log.Warn("fast path: reading counters failed", "error", err)
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for id, v := range c {
		b := f.base[id]
		f.counters[id] = FastCounters{
			Packets: b.Packets + v.Packets, Bytes: b.Bytes + v.Bytes,
			ReplyPackets: b.ReplyPackets + v.ReplyPackets, ReplyBytes: b.ReplyBytes + v.ReplyBytes,
		}
	}
}

func sortedIDs[V any](m map[uint32]V) []uint32 {
	ids := make([]uint32, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}
