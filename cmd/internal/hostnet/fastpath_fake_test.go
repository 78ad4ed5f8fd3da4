package hostnet

import (
	"errors"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ikelb/ikelb/dataplane"
)

// fakeKernel is a fastKernel in memory: whether the table exists, with the
// rules of which services and which map elements; install can be made to
// fail (atomically, as an nft transaction does: the old table stays).
type fakeKernel struct {
	mu         sync.Mutex
	present    bool
	svcs       map[uint32]*fastService
	elems      map[dataplane.ClientKey]netip.Addr
	installErr error
	forgotten  []mapOp
	installs   int
	handedOver []ctFlow
	sweeps     int
	// rehook: the next refresh reports changed interfaces.
	rehook bool
	// natIngress: nat services go to the ingress stage; noRoute: no
	// client has a next hop; flowErr fails flow updates.
	natIngress bool
	noRoute    bool
	flowErr    error
	flows      map[dataplane.KernelFlow]uint64 // → packets counted
	replySets  map[uint32][]netip.Addr         // replies' last call per service
	routeEvent bool                            // routesChanged's answer (then false)
	routes     map[netip.Addr]ingressRoute
	gateway    map[netip.Addr]netip.Addr // client → next hop (default: on-link)
}

func newFakeKernel() *fakeKernel {
	return &fakeKernel{elems: map[dataplane.ClientKey]netip.Addr{},
		flows: map[dataplane.KernelFlow]uint64{}, routes: map[netip.Addr]ingressRoute{}, gateway: map[netip.Addr]netip.Addr{}}
}

func (k *fakeKernel) install(svcs map[uint32]*fastService, elems map[dataplane.ClientKey]netip.Addr) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.installErr != nil {
		return k.installErr
	}
	k.installs++
	k.present, k.svcs, k.elems = true, svcs, map[dataplane.ClientKey]netip.Addr{}
	k.flows, k.routes = map[dataplane.KernelFlow]uint64{}, map[netip.Addr]ingressRoute{}
	for key, a := range elems {
		k.elems[key] = a
	}
	return nil
}

func (k *fakeKernel) update(ops []mapOp) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, op := range ops {
		key := dataplane.ClientKey{Service: op.svc.id, Client: dataplane.AddrFrom(op.client)}
		if op.backend.IsValid() {
			k.elems[key] = op.backend
		} else {
			delete(k.elems, key)
		}
	}
	return nil
}

func (k *fakeKernel) forget(ops []mapOp) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.forgotten = append(k.forgotten, ops...)
	return nil
}

func (k *fakeKernel) counters(map[uint32]*fastService) (map[uint32]FastCounters, error) {
	return map[uint32]FastCounters{}, nil
}

func (k *fakeKernel) activity(*fastService) (map[netip.Addr]uint64, error) { return nil, nil }

func (k *fakeKernel) remove() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.present, k.svcs, k.elems = false, nil, map[dataplane.ClientKey]netip.Addr{}
	k.flows, k.routes = map[dataplane.KernelFlow]uint64{}, map[netip.Addr]ingressRoute{}
	return nil
}

func (k *fakeKernel) forwards(bool) bool { return true }

func (k *fakeKernel) routesChanged() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	c := k.routeEvent
	k.routeEvent = false
	return c
}

func (k *fakeKernel) close() {}

func (k *fakeKernel) replies(s *fastService) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.replySets == nil {
		k.replySets = map[uint32][]netip.Addr{}
	}
	k.replySets[s.id] = slices.Clone(s.replyFrom)
	return nil
}

func (k *fakeKernel) ingressNAT() map[uint32]bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.present {
		return nil
	}
	out := map[uint32]bool{}
	for id, s := range k.svcs {
		if k.natIngress && natStateless(s) {
			out[id] = true
		}
	}
	return out
}

func (k *fakeKernel) routed(netip.Addr) bool { return true }

func (k *fakeKernel) clientRoute(c netip.Addr) (ingressRoute, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if gw, ok := k.gateway[c]; ok {
		return ingressRoute{via: gw, index: 2}, !k.noRoute
	}
	return ingressRoute{via: c, index: 1}, !k.noRoute
}

func (k *fakeKernel) updateFlows(flows []natFlowOp, routes []clientRouteOp) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.flowErr != nil {
		return k.flowErr
	}
	for _, op := range flows {
		if !op.add {
			delete(k.flows, op.kf)
		}
	}
	for _, r := range routes {
		if !r.add {
			delete(k.routes, r.client)
		}
	}
	for _, r := range routes {
		if r.add {
			k.routes[r.client] = r.route
		}
	}
	for _, op := range flows {
		if op.add {
			for o := range k.flows { // the kernel refuses a second element with the same key
				if reqKey(o) == reqKey(op.kf) || replyKey(o) == replyKey(op.kf) {
					return errors.New("element exists")
				}
			}
			k.flows[op.kf] = 0
		}
	}
	return nil
}

func (k *fakeKernel) flowCounts(s *fastService) (map[natReqKey]uint64, map[netip.AddrPort]uint64, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	req, rep := map[natReqKey]uint64{}, map[netip.AddrPort]uint64{}
	for kf, n := range k.flows {
		if kf.Service == s.id {
			req[reqKey(kf)] = n
		}
	}
	return req, rep, nil
}

// snapshotFlows returns the flows in the kernel's maps.
func (k *fakeKernel) snapshotFlows() map[dataplane.KernelFlow]uint64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return maps.Clone(k.flows)
}

func (k *fakeKernel) handover(flows []ctFlow) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.handedOver = append(k.handedOver, flows...)
	return nil
}

func (k *fakeKernel) sweep(svcs map[uint32]*fastService, forwards func(dataplane.ClientKey) bool) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.sweeps++
	return 0, nil
}

func (k *fakeKernel) refresh(map[uint32]*fastService) (bool, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	again := k.rehook
	k.rehook = false
	return again, nil
}

func (k *fakeKernel) snapshot() (present bool, elems map[dataplane.ClientKey]netip.Addr, forgotten int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	elems = map[dataplane.ClientKey]netip.Addr{}
	for key, a := range k.elems {
		elems[key] = a
	}
	return k.present, elems, len(k.forgotten)
}

// TestFastPathInstallFailureLeavesNoStaleRules: when a rebuild cannot
// install the new rules, the previous table must not stay in the kernel.
// It would keep DNATing the clients of its map to their old backends
// (also one that was since disabled or removed) while nothing maintains
// the map any more (flushes and polls stop while not installed), and the
// log says the clients "stay on the userspace path".
func TestFastPathInstallFailureLeavesNoStaleRules(t *testing.T) {
	a := netip.MustParseAddr
	tb := dataplane.NewTable()
	key := dataplane.ClientKey{Service: 7, Client: dataplane.AddrFrom(a("10.1.0.1"))}
	tb.Put(key, dataplane.Entry{Backend: 1})
	k := newFakeKernel()
	fp := startFastPath(FastPathConfig{Logger: slogDiscard, Table: tb, Poll: time.Hour}, k)
	defer fp.Close()

	svc := func(ports ...uint16) []dataplane.Service {
		return []dataplane.Service{{ID: 7, Mode: dataplane.ModeNAT, VIP: a("10.0.100.1"), Ports: ports,
			Backends: []dataplane.Backend{{ID: 1, Addr: a("10.0.0.11"), Weight: 1, State: dataplane.StateActive}}}}
	}
	fp.transparent(fp.setServices(svc(500, 4500)), 5*time.Second)
	if present, elems, _ := k.snapshot(); !present || elems[key] != a("10.0.0.11") {
		t.Fatalf("after the first set: table present %v, map %v", present, elems)
	}

	k.mu.Lock()
	k.installErr = errors.New("injected nft failure")
	k.mu.Unlock()
	fp.transparent(fp.setServices(svc(4500)), 5*time.Second) // other ports: a rebuild
	present, elems, forgotten := k.snapshot()
	if present || len(elems) != 0 {
		t.Fatalf("rebuild failed but the old table is still installed (present %v, map %v): the kernel keeps forwarding with rules nothing maintains", present, elems)
	}
	if forgotten == 0 {
		t.Fatalf("the map's nat clients' conntrack entries were not forgotten: their DNAT would outlive the table")
	}
}

// TestFastPathCloseWaitsForNotify: a notify call (Dataplane.reapply, which
// installs hostnet's TPROXY rules and routes) started by the fast path's
// goroutine must be over when Close returns; otherwise it can run after
// the daemon's Manager.Close and leave the host rules behind on exit.
func TestFastPathCloseWaitsForNotify(t *testing.T) {
	a := netip.MustParseAddr
	k := newFakeKernel()
	fp := startFastPath(FastPathConfig{Logger: slogDiscard, Table: dataplane.NewTable(), Poll: time.Hour}, k)
	entered, release := make(chan struct{}), make(chan struct{})
	var ran sync.Mutex // held until notify has finished
	ran.Lock()
	fp.mu.Lock()
	fp.notify = func() {
		close(entered)
		<-release
		ran.Unlock()
	}
	fp.mu.Unlock()

	// A transparent service becomes covered by a rebuild: notify is called.
	fp.setServices([]dataplane.Service{{ID: 8, Mode: dataplane.ModeTransparent, VIP: a("10.0.100.2"), Ports: []uint16{500},
		Backends: []dataplane.Backend{{ID: 1, Addr: a("10.0.0.21"), Weight: 1, State: dataplane.StateActive}}}})
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("notify was not called after the covered set changed")
	}
	closed := make(chan error, 1)
	go func() { closed <- fp.Close() }()
	select {
	case <-closed:
		t.Fatal("Close returned while a notify call was still running")
	case <-time.After(100 * time.Millisecond): // a negative check: Close must still be waiting
	}
	close(release)
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if !ran.TryLock() {
		t.Fatal("Close returned before notify finished")
	}
}

// TestFastPathForwards: the engine asks Forwards which clients the kernel
// took over (to close their flows early). Only a client of an installed
// service whose committed backend is usable, and nothing once the rules
// are gone.
func TestFastPathForwards(t *testing.T) {
	a := netip.MustParseAddr
	tb := dataplane.NewTable()
	key := func(svc uint32, c string) dataplane.ClientKey {
		return dataplane.ClientKey{Service: svc, Client: dataplane.AddrFrom(a(c))}
	}
	tb.Put(key(7, "10.1.0.1"), dataplane.Entry{Backend: 1})
	tb.Put(key(7, "10.1.0.2"), dataplane.Entry{Backend: 2}) // disabled backend
	tb.Put(key(9, "10.1.0.1"), dataplane.Entry{Backend: 1}) // no such service
	k := newFakeKernel()
	fp := startFastPath(FastPathConfig{Logger: slogDiscard, Table: tb, Poll: time.Hour}, k)
	defer fp.Close()
	if fp.Forwards(key(7, "10.1.0.1")) {
		t.Fatal("forwards before any rules are installed")
	}
	fp.transparent(fp.setServices([]dataplane.Service{{ID: 7, Mode: dataplane.ModeNAT, VIP: a("10.0.100.1"), Ports: []uint16{4500},
		Backends: []dataplane.Backend{
			{ID: 1, Addr: a("10.0.0.11"), Weight: 1, State: dataplane.StateActive},
			{ID: 2, Addr: a("10.0.0.12"), Weight: 1, State: dataplane.StateDisabled},
		}}}), 5*time.Second)
	for c, want := range map[dataplane.ClientKey]bool{
		key(7, "10.1.0.1"): true, key(7, "10.1.0.2"): false, key(7, "10.1.0.3"): false, key(9, "10.1.0.1"): false,
	} {
		if got := fp.Forwards(c); got != want {
			t.Errorf("Forwards(%v) = %v, want %v", c, got, want)
		}
	}
	fp.transparent(fp.setServices(nil), 5*time.Second)
	if fp.Forwards(key(7, "10.1.0.1")) {
		t.Fatal("forwards with no service installed")
	}
	fp.transparent(fp.setServices([]dataplane.Service{{ID: 7, Mode: dataplane.ModeNAT, VIP: a("10.0.100.1"), Ports: []uint16{4500},
		Backends: []dataplane.Backend{{ID: 1, Addr: a("10.0.0.11"), Weight: 1, State: dataplane.StateActive}}}}), 5*time.Second)
	if !fp.Forwards(key(7, "10.1.0.1")) {
		t.Fatal("does not forward after the service came back")
	}
	if err := fp.Close(); err != nil {
		t.Fatal(err)
	}
	if fp.Forwards(key(7, "10.1.0.1")) {
		t.Fatal("forwards after Close")
	}
}

// TestFastPathReinstallsWhenInterfacesChange: a poll whose refresh reports
// changed interfaces reinstalls the rules with the whole map (the ingress
// stage hooks every interface; a new one needs a chain of its own).
func TestFastPathReinstallsWhenInterfacesChange(t *testing.T) {
	a := netip.MustParseAddr
	tb := dataplane.NewTable()
	key := dataplane.ClientKey{Service: 7, Client: dataplane.AddrFrom(a("10.1.0.1"))}
	tb.Put(key, dataplane.Entry{Backend: 1})
	k := newFakeKernel()
	fp := startFastPath(FastPathConfig{Logger: slogDiscard, Table: tb, Poll: 5 * time.Millisecond}, k)
	defer fp.Close()
	fp.transparent(fp.setServices([]dataplane.Service{{ID: 7, Mode: dataplane.ModeTransparent, VIP: a("10.0.100.1"), Ports: []uint16{4500},
		Backends: []dataplane.Backend{{ID: 1, Addr: a("10.0.0.11"), Weight: 1, State: dataplane.StateActive}}}}), 5*time.Second)
	time.Sleep(50 * time.Millisecond) // ten polls: no change, no reinstall
	k.mu.Lock()
	before := k.installs
	k.rehook = true
	k.mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	for {
		k.mu.Lock()
		n, elems := k.installs, k.elems[key]
		k.mu.Unlock()
		if n == before+1 && elems == a("10.0.0.11") {
			break
		}
		if n > before+1 || time.Now().After(deadline) {
			t.Fatalf("installs %d → %d (want one more), map element %v", before, n, elems)
		}
		time.Sleep(5 * time.Millisecond) // polling the fast path's goroutine, with a deadline
	}
	if before != 1 {
		t.Fatalf("%d installs before the change, want 1: a refresh without change reinstalled", before)
	}
}

// TestFastPathHandover: Handover never blocks, and the flows reach the
// kernel side's handover (which deletes their conntrack entries) from
// the fast path's goroutine.
func TestFastPathHandover(t *testing.T) {
	k := newFakeKernel()
	fp := startFastPath(FastPathConfig{Logger: slogDiscard, Table: dataplane.NewTable(), Poll: time.Hour}, k)
	defer fp.Close()
	ap := netip.MustParseAddrPort
	vip := ap("10.0.100.1:4500")
	// A datagram the flow limit dropped, of a client the kernel does
	// not forward: it stays with the listener.
	fp.Handover(dataplane.KernelFlow{Service: 7, Client: ap("10.2.0.1:4500"), Local: vip})
	up, be := ap("10.0.0.1:40000"), ap("10.0.0.11:4500")
	for i := range 2 * handoverQueue { // more than the queue holds: the rest are dropped, never waited for
		fp.Handover(dataplane.KernelFlow{Service: 7, Client: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 4500), Local: vip, Upstream: up, Backend: be})
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		k.mu.Lock()
		got := map[ctFlow]bool{}
		for _, fl := range k.handedOver {
			got[fl] = true
		}
		k.mu.Unlock()
		if got[ctFlow{client: ap("10.2.0.1:4500"), local: vip}] {
			t.Fatal("a dropped datagram's client that the kernel does not forward was handed over")
		}
		if got[ctFlow{client: ap("10.1.0.0:4500"), local: vip}] && len(got) >= handoverQueue/2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d flows handed over, want the first and at least %d", len(got), handoverQueue/2)
		}
		time.Sleep(5 * time.Millisecond) // polling the fast path's goroutine, with a deadline
	}
}

// Many handovers between two polls (here: more than the queue holds) ask
// for a sweep at the next poll (one dump for every client still reaching
// the listener), and a single one does not.
func TestFastPathSweepsWhenHandoversOverflow(t *testing.T) {
	a := netip.MustParseAddr
	k := newFakeKernel()
	fp := startFastPath(FastPathConfig{Logger: slogDiscard, Table: dataplane.NewTable(), Poll: 5 * time.Millisecond}, k)
	defer fp.Close()
	fp.transparent(fp.setServices([]dataplane.Service{{ID: 7, Mode: dataplane.ModeNAT, VIP: a("10.0.100.1"), Ports: []uint16{4500},
		Backends: []dataplane.Backend{{ID: 1, Addr: a("10.0.0.11"), Weight: 1, State: dataplane.StateActive}}}}), 5*time.Second)
	sweeps := func() int {
		k.mu.Lock()
		defer k.mu.Unlock()
		return k.sweeps
	}
	ap := netip.MustParseAddrPort
	vip, up, be := ap("10.0.100.1:4500"), ap("10.0.0.1:40000"), ap("10.0.0.11:4500")
	fp.Handover(dataplane.KernelFlow{Service: 7, Client: ap("10.1.0.1:4500"), Local: vip, Upstream: up, Backend: be})
	time.Sleep(50 * time.Millisecond) // ten polls
	if n := sweeps(); n != 0 {
		t.Fatalf("%d sweeps after one handover, want 0", n)
	}
	for i := range 4 * handoverQueue {
		fp.Handover(dataplane.KernelFlow{Service: 7, Client: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 4500), Local: vip, Upstream: up, Backend: be})
	}
	deadline := time.Now().Add(5 * time.Second)
	for sweeps() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no sweep after the handover queue overflowed")
		}
		time.Sleep(5 * time.Millisecond) // polling the fast path's goroutine, with a deadline
	}
	time.Sleep(20 * time.Millisecond) // the overflow's own polls
	n := sweeps()
	time.Sleep(50 * time.Millisecond) // ten more polls, without an overflow
	if m := sweeps(); m != n {
		t.Errorf("sweeps went on without an overflow: %d, then %d", n, m)
	}
}

// TestFastPathNATFlows: with the ingress stage carrying the nat service,
// a handed-over flow whose client's binding is its backend goes into the
// flow maps (Handover says so), leaves them when released or when the
// client is bound elsewhere, is active as long as its counts move, and
// the DNAT map holds only the clients the engine had no flow for.
func TestFastPathNATFlows(t *testing.T) {
	a, ap := netip.MustParseAddr, netip.MustParseAddrPort
	k := newFakeKernel()
	k.natIngress = true
	tb := dataplane.NewTable()
	var now atomic.Int64
	now.Store(1)
	prop := &touches{keys: map[dataplane.ClientKey]int{}}
	fp := startFastPath(FastPathConfig{Logger: slogDiscard, Table: tb, Proposer: prop, Poll: 5 * time.Millisecond, Now: now.Load}, k)
	defer fp.Close()
	svc := dataplane.Service{ID: 7, Mode: dataplane.ModeNAT, VIP: a("10.0.100.1"), Ports: []uint16{500, 4500}, Timeout: 20 * time.Millisecond,
		Backends: []dataplane.Backend{{ID: 1, Addr: a("10.0.0.11"), Weight: 1, State: dataplane.StateActive},
			{ID: 2, Addr: a("10.0.0.12"), Weight: 1, State: dataplane.StateActive}}}
	fp.transparent(fp.setServices([]dataplane.Service{svc}), 5*time.Second)
	key := func(c string) dataplane.ClientKey {
		return dataplane.ClientKey{Service: 7, Client: dataplane.AddrFrom(a(c))}
	}
	tb.Put(key("10.1.0.1"), dataplane.Entry{Backend: 1})
	tb.Put(key("10.1.0.2"), dataplane.Entry{Backend: 2})
	kf := dataplane.KernelFlow{Service: 7, Client: ap("10.1.0.1:4500"), Local: ap("10.0.100.1:4500"),
		Upstream: ap("10.0.0.1:40001"), Backend: ap("10.0.0.11:4500")}
	wait := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s; kernel flows %v", what, k.snapshotFlows())
			}
			time.Sleep(5 * time.Millisecond) // polling the fast path's goroutine, with a deadline
		}
	}
	if !fp.Handover(kf) {
		t.Fatal("Handover of a flow of a service the ingress stage carries = false")
	}
	wait("the flow in the maps", func() bool { _, ok := k.snapshotFlows()[kf]; return ok })
	if c := fp.KernelClients()[7]; c != (dataplane.KernelClients{Flows: 1}) {
		t.Fatalf("KernelClients %+v, want one flow at ingress and nothing on the DNAT map", c)
	}
	if _, elems, _ := k.snapshot(); len(elems) != 0 {
		t.Fatalf("DNAT map %v, want empty: every client has its flow", elems)
	}
	// The client's next hop changes: a later poll looks it up again.
	k.mu.Lock()
	k.gateway[a("10.1.0.1")] = a("10.0.0.254")
	k.mu.Unlock()
	wait("the client's new next hop", func() bool {
		k.mu.Lock()
		defer k.mu.Unlock()
		return k.routes[a("10.1.0.1")] == ingressRoute{via: a("10.0.0.254"), index: 2}
	})
	// A flow to another backend than the binding's stays out.
	stale := kf
	stale.Client, stale.Upstream = ap("10.1.0.2:4500"), ap("10.0.0.1:40002")
	fp.Handover(stale)
	time.Sleep(50 * time.Millisecond) // ten polls and flushes
	if _, ok := k.snapshotFlows()[stale]; ok {
		t.Fatal("a flow to another backend than its client's binding went into the maps")
	}
	// Activity: counts that move make the flow active at that time.
	k.mu.Lock()
	k.flows[kf] = 5
	k.mu.Unlock()
	now.Store(int64(time.Second))
	wait("the flow active", func() bool { return fp.LastActive(kf) == int64(time.Second) })
	wait("its client touched", func() bool {
		prop.mu.Lock()
		defer prop.mu.Unlock()
		return prop.keys[key("10.1.0.1")] > 0
	})
	// Bound elsewhere: out of the maps; bound back and released: out.
	tb.Put(key("10.1.0.1"), dataplane.Entry{Backend: 2, Created: 2})
	wait("the re-bound client's flow out", func() bool { return len(k.snapshotFlows()) == 0 })
	tb.Put(key("10.1.0.1"), dataplane.Entry{Backend: 1, Created: 3})
	fp.Handover(kf)
	wait("the flow back in", func() bool { return len(k.snapshotFlows()) == 1 })
	fp.Release(kf)
	wait("the released flow out", func() bool { return len(k.snapshotFlows()) == 0 })
	if fp.LastActive(kf) != 0 {
		t.Fatal("a released flow is still active")
	}
	// No flow for the client (the engine's limit): the DNAT map.
	fp.Handover(dataplane.KernelFlow{Service: 7, Client: ap("10.1.0.2:4500"), Local: ap("10.0.100.1:4500")})
	wait("the overflow client in the DNAT map", func() bool {
		_, elems, _ := k.snapshot()
		return elems[key("10.1.0.2")] == a("10.0.0.12") && len(elems) == 1
	})
	// Dropped at its first datagram, before the binding that datagram
	// proposed commits: in the DNAT map once it does.
	fp.Handover(dataplane.KernelFlow{Service: 7, Client: ap("10.1.0.3:500"), Local: ap("10.0.100.1:500")})
	time.Sleep(20 * time.Millisecond) // polls and flushes
	if _, elems, _ := k.snapshot(); len(elems) != 1 {
		t.Fatalf("DNAT map %v before the marked client's binding commits", elems)
	}
	tb.Put(key("10.1.0.3"), dataplane.Entry{Backend: 1})
	wait("the client marked before its binding in the DNAT map", func() bool {
		_, elems, _ := k.snapshot()
		return elems[key("10.1.0.3")] == a("10.0.0.11") && len(elems) == 2
	})
	if c := fp.KernelClients()[7]; c != (dataplane.KernelClients{DNAT: 2}) {
		t.Fatalf("KernelClients %+v, want the two overflow clients on the DNAT map and no flow", c)
	}
	// Their datagrams to the listener were untracked (listenerUntracked):
	// no conntrack entry to delete.
	k.mu.Lock()
	for _, fl := range k.handedOver {
		if c := fl.client.Addr(); c == a("10.1.0.2") || c == a("10.1.0.3") {
			k.mu.Unlock()
			t.Fatalf("an overflow client's listener entry was deleted: %v", fl)
		}
	}
	k.mu.Unlock()
	// A mark whose binding never commits expires; a bound client's stays.
	fp.Handover(dataplane.KernelFlow{Service: 7, Client: ap("10.1.0.4:500"), Local: ap("10.0.100.1:500")})
	if !fp.held.inOverflow(key("10.1.0.4")) {
		t.Fatal("a client the flow limit dropped is not marked")
	}
	now.Store(now.Load() + 2*int64(overflowGrace))
	wait("the unbound mark expired", func() bool { return !fp.held.inOverflow(key("10.1.0.4")) })
	if !fp.held.inOverflow(key("10.1.0.3")) {
		t.Fatal("a bound overflow client's mark expired")
	}
	// Without the ingress stage Handover says false.
	k.mu.Lock()
	k.natIngress = false
	k.mu.Unlock()
	k.rehook = true // a reinstall, which asks ingressNAT again
	wait("every client in the DNAT map", func() bool { _, elems, _ := k.snapshot(); return len(elems) == 3 })
	if fp.Handover(kf) {
		t.Fatal("Handover = true without the ingress stage")
	}
}

// TestFastPathNATBackendsInPlace: with the ingress stage carrying a nat
// service, a backend added or removed changes the set its listener rules
// keep tracked (replies of DNATed flows) in place, without reinstalling
// the tables (which would take every flow out of the ingress maps).
func TestFastPathNATBackendsInPlace(t *testing.T) {
	a := netip.MustParseAddr
	k := newFakeKernel()
	k.natIngress = true
	fp := startFastPath(FastPathConfig{Logger: slogDiscard, Table: dataplane.NewTable(), Poll: time.Hour}, k)
	defer fp.Close()
	svc := func(addrs ...string) dataplane.Service {
		s := dataplane.Service{ID: 7, Mode: dataplane.ModeNAT, VIP: a("10.0.100.1"), Ports: []uint16{500, 4500}}
		for i, b := range addrs {
			s.Backends = append(s.Backends, dataplane.Backend{ID: uint32(i + 1), Addr: a(b), Weight: 1, State: dataplane.StateActive})
		}
		return s
	}
	fp.transparent(fp.setServices([]dataplane.Service{svc("10.0.0.11", "10.0.0.12")}), 5*time.Second)
	fp.transparent(fp.setServices([]dataplane.Service{svc("10.0.0.11", "10.0.0.12", "10.0.0.13")}), 5*time.Second)
	k.mu.Lock()
	installs, set := k.installs, k.replySets[7]
	k.mu.Unlock()
	if installs != 1 {
		t.Fatalf("%d installs, want 1: a backend added reinstalled the tables", installs)
	}
	if want := []netip.Addr{a("10.0.0.11"), a("10.0.0.12"), a("10.0.0.13")}; !slices.Equal(set, want) {
		t.Fatalf("backend set %v, want %v", set, want)
	}
	// Its rules otherwise changed (another port): reinstalled.
	s := svc("10.0.0.11")
	s.Ports = []uint16{4500}
	fp.transparent(fp.setServices([]dataplane.Service{s}), 5*time.Second)
	k.mu.Lock()
	installs = k.installs
	k.mu.Unlock()
	if installs != 2 {
		t.Fatalf("%d installs after a port change, want 2", installs)
	}
}

// TestRecheckRoutesPace: client next hops are looked up again
// recheckPerPoll a poll while the routes are still, and at recheckBurst
// after a route event, for the pass under way and one full pass after
// it, then slowly again.
func TestRecheckRoutesPace(t *testing.T) {
	k := newFakeKernel()
	f := &FastPath{kernel: k, log: slogDiscard}
	st := &fastState{nat: newNATFlows()}
	const clients = 3 * recheckBurst
	var all []netip.Addr
	for i := range clients {
		c := netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)})
		all = append(all, c)
		st.nat.routes[c] = &clientHop{route: ingressRoute{via: c, index: 1}, refs: 1}
	}
	moved := func() int { // clients whose hop is the new gateway in the maps
		k.mu.Lock()
		defer k.mu.Unlock()
		n := 0
		for _, c := range all {
			if k.routes[c].via == netip.MustParseAddr("10.0.0.254") {
				n++
			}
		}
		return n
	}
	reroute := func() {
		k.mu.Lock()
		defer k.mu.Unlock()
		for _, c := range all {
			k.gateway[c] = netip.MustParseAddr("10.0.0.254")
		}
	}
	reroute() // missed by the events: the slow pace finds it
	f.recheckRoutes(st)
	if n := moved(); n != recheckPerPoll {
		t.Fatalf("%d clients re-pointed by a quiet poll, want %d", n, recheckPerPoll)
	}
	// Back, with an event: the pass under way goes on at the burst pace.
	k.mu.Lock()
	clear(k.gateway)
	k.routeEvent = true
	k.mu.Unlock()
	for range 3 { // the pass under way: its 1,504 clients left, 512 a poll
		f.recheckRoutes(st)
	}
	for range 3 { // a full pass at the burst pace (it holds the first 32)
		f.recheckRoutes(st)
	}
	if n := moved(); n != 0 {
		t.Fatalf("%d clients still on the old gateway after an event and six polls", n)
	}
	reroute() // no event: 32 a poll again
	f.recheckRoutes(st)
	if n := moved(); n != recheckPerPoll {
		t.Fatalf("%d clients re-pointed by a quiet poll after the burst, want %d", n, recheckPerPoll)
	}
}
