package dataplane

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeSockets stands in for the kernel: listeners never deliver (the test
// drives handleBatch itself), dialled conns count what is written.
type fakeSockets struct {
	mu       sync.Mutex
	dialled  []*fakeConn
	raws     []*fakeRaw
	failAt   netip.AddrPort // listen on it fails
	mtuValue int
}

func (f *fakeSockets) listen(addr netip.AddrPort) (conn, error) {
	if addr == f.failAt {
		return nil, ErrListen
	}
	return newFakeConn(addr), nil
}

func (f *fakeSockets) dial(src netip.AddrPort, dst netip.AddrPort) (conn, error) {
	if src.Port() == 0 {
		src = netip.AddrPortFrom(src.Addr(), 40000)
	}
	c := newFakeConn(src)
	c.peer = dst
	f.mu.Lock()
	f.dialled = append(f.dialled, c)
	f.mu.Unlock()
	return c, nil
}

func (f *fakeSockets) raw(v6 bool) (rawConn, error) {
	r := &fakeRaw{}
	f.mu.Lock()
	f.raws = append(f.raws, r)
	f.mu.Unlock()
	return r, nil
}

func (f *fakeSockets) tproxy(v6 bool, port uint16) (replyConn, error) {
	if port == 0 {
		port = 7999
	}
	a := netip.IPv4Unspecified()
	if v6 {
		a = netip.IPv6Unspecified()
	}
	return &fakeReply{local: netip.AddrPortFrom(a, port), closed: make(chan struct{})}, nil
}

func (f *fakeSockets) mtu(netip.Addr) int { return f.mtuValue }

// fakeRaw counts the packets sent and keeps a copy of the last batch's
// headers and payload lengths when keep is set.
type fakeRaw struct {
	sent   atomic.Int64
	keep   bool
	last   [][]byte // header+payload of each packet of the last Send
	failAt int      // 1-based message index that fails; 0 none
}

func (r *fakeRaw) Send(rb *rawBatch) (int, error) {
	if r.keep {
		r.last = r.last[:0]
		for i := 0; i < rb.n; i++ {
			m := &rb.msgs[i]
			r.last = append(r.last, append(append([]byte{}, m.hdr[:m.hlen]...), m.payload...))
		}
	}
	sent := rb.n
	if r.failAt > 0 && r.failAt <= rb.n {
		rb.msgs[r.failAt-1].failed = true
		sent--
	}
	r.sent.Add(int64(sent))
	return sent, nil
}

func (r *fakeRaw) Close() error { return nil }

type fakeReply struct {
	local     netip.AddrPort
	closeOnce sync.Once
	closed    chan struct{}
}

func (r *fakeReply) ReadReplies(*batchPool, []netip.AddrPort) (*batch, int, error) {
	<-r.closed
	return nil, 0, net.ErrClosed
}
func (r *fakeReply) LocalAddr() netip.AddrPort { return r.local }
func (r *fakeReply) Close() error {
	r.closeOnce.Do(func() { close(r.closed) })
	return nil
}

type fakeConn struct {
	local, peer netip.AddrPort
	sent        atomic.Int64
	keep        bool             // record destinations (not concurrency-safe: one writer)
	dsts        []netip.AddrPort // with keep: where each datagram went
	closeOnce   sync.Once
	closed      chan struct{}
}

func newFakeConn(local netip.AddrPort) *fakeConn {
	return &fakeConn{local: local, closed: make(chan struct{})}
}

func (c *fakeConn) ReadBatch(*batchPool) (*batch, int, error) {
	<-c.closed
	return nil, 0, net.ErrClosed
}

func (c *fakeConn) WriteBatch(_ *batch, pkts []packet) (int, error) {
	select {
	case <-c.closed:
		return 0, net.ErrClosed // as a closed socket
	default:
	}
	if c.keep {
		for i := range pkts {
			c.dsts = append(c.dsts, pkts[i].addr)
		}
	}
	c.sent.Add(int64(len(pkts)))
	return len(pkts), nil
}

func (c *fakeConn) SetReadDeadline(time.Time) error { return nil }
func (c *fakeConn) LocalAddr() netip.AddrPort       { return c.local }
func (c *fakeConn) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	return nil
}

type countingProposer struct{ n atomic.Int64 }

func (p *countingProposer) Propose(Proposal) bool { p.n.Add(1); return true }

// fakeEngine returns an engine on fake sockets with one service and its
// listener on port 4500.
func fakeEngine(t testing.TB) (*Engine, *listener, *fakeSockets, *countingProposer) {
	fs := &fakeSockets{}
	prop := &countingProposer{}
	e, err := New(Config{Logger: discardLogger(), Table: NewTable(), Proposer: prop, BatchSize: 32, sockets: fs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	s := Service{ID: 1, Name: "vpn", VIP: netip.MustParseAddr("192.0.2.1"), Ports: []uint16{4500},
		Timeout: time.Hour, Mode: ModeNAT, Key: KeySourceIP, Backends: testBackends(3)}
	if err := e.SetServices([]Service{s}); err != nil {
		t.Fatal(err)
	}
	return e, e.listeners[netip.MustParseAddrPort("192.0.2.1:4500")], fs, prop
}

// clientBatch fills a batch with n datagrams from n/2 clients (two each,
// adjacent, so they form runs).
func clientBatch(e *Engine, n int) *batch {
	b := newBatch(e.cfg.BatchSize, 2048)
	esp := []byte{1, 2, 3, 4, 0, 0, 0, 1, 0xaa, 0xbb}
	for i := 0; i < n; i++ {
		p := &b.pkts[i]
		p.n = copy(p.buf, esp)
		p.addr = netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(i / 2)}), 4500)
	}
	return b
}

// TestListenerBatchAllocs: once a client's flow exists, handling a batch
// (decide, flow lookup, batched write, counters) allocates nothing.
func TestListenerBatchAllocs(t *testing.T) {
	e, l, fs, prop := fakeEngine(t)
	b := clientBatch(e, 32)
	l.handleBatch(b, 32, e.now.Load()) // warm: 16 flows are opened
	if len(fs.dialled) != 16 || e.Flows() != 16 {
		t.Fatalf("%d dials, %d flows; want 16", len(fs.dialled), e.Flows())
	}
	if prop.n.Load() != 16 {
		t.Fatalf("%d proposals for 16 new clients, want 16 binds", prop.n.Load())
	}
	allocs := testing.AllocsPerRun(200, func() { l.handleBatch(b, 32, e.now.Load()) })
	if allocs != 0 {
		t.Fatalf("handleBatch allocates %v per batch", allocs)
	}
	var sent int64
	for _, c := range fs.dialled {
		sent += c.sent.Load()
	}
	if want := int64(32 * 202); sent != want { // AllocsPerRun runs once more to warm up
		t.Fatalf("%d datagrams sent upstream, want %d", sent, want)
	}
	cs := e.Counters()[0]
	if cs.Packets != 32*202 || cs.Datagrams["esp"] != 32*202 {
		t.Fatalf("counters %+v", cs)
	}
}

func TestListenerBatchFlowLimit(t *testing.T) {
	e, l, _, _ := fakeEngine(t)
	e.cfg.MaxFlows = 4
	l.handleBatch(clientBatch(e, 32), 32, e.now.Load())
	cs := e.Counters()[0]
	if e.Flows() != 4 || cs.DropsByReason["flow_limit"] != 24 || cs.Packets != 8 {
		t.Fatalf("flows %d, counters %+v", e.Flows(), cs)
	}
}

// A client the kernel forwards whose datagrams still reach the listener
// but find no flow (the flow limit) is handed over all the same: it has no
// flow to be handed over later, and would stay dropped here.
func TestListenerFlowLimitHandsOver(t *testing.T) {
	e, l, _, _ := fakeEngine(t)
	e.cfg.MaxFlows = 4
	kp := &kernelClients{keys: map[ClientKey]bool{}}
	for i := range 16 {
		kp.keys[ClientKey{Service: l.svc.Load().svc.ID, Client: AddrFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}))}] = true
	}
	e.SetKernelPath(kp)
	l.handleBatch(clientBatch(e, 32), 32, e.now.Load())
	got := kp.handedOver()
	if len(got) != 16 {
		t.Fatalf("%d clients handed over, want all 16 (4 with a flow, 12 dropped by the flow limit): %v", len(got), got)
	}
	var withFlow int
	for fl := range got {
		if fl.Local != l.addr || fl.Service != 1 {
			t.Fatalf("handed over %+v, want service 1 and the listener's address %v", fl, l.addr)
		}
		if fl.Backend.IsValid() {
			withFlow++
		} else if fl.Upstream != (netip.AddrPort{}) {
			t.Fatalf("handed over %+v: an upstream without a flow", fl)
		}
	}
	if withFlow != 4 {
		t.Fatalf("%d handovers with a flow, want 4: %v", withFlow, got)
	}
}

// TestListenerHandoverAllocs: asking the kernel path about flows it
// carries, every batch, allocates nothing.
func TestListenerHandoverAllocs(t *testing.T) {
	e, l, _, _ := fakeEngine(t)
	kp := &kernelClients{carry: true, keys: map[ClientKey]bool{}}
	for i := range 16 {
		kp.keys[ClientKey{Service: 1, Client: AddrFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}))}] = true
	}
	e.SetKernelPath(kp)
	b := clientBatch(e, 32)
	now := e.now.Load()
	l.handleBatch(b, 32, now) // warm: 16 flows, each handed over
	allocs := testing.AllocsPerRun(50, func() {
		now += int64(handoverEvery)
		l.handleBatch(b, 32, now)
	})
	if allocs != 0 {
		t.Fatalf("handleBatch with handovers allocates %v per batch", allocs)
	}
	got := kp.handedOver()
	if len(got) != 16 {
		t.Fatalf("%d flows handed over, want 16", len(got))
	}
	for fl, n := range got {
		if n != 52 { // AllocsPerRun runs once more to warm up
			t.Fatalf("%+v handed over %d times, want 52 (once per batch)", fl, n)
		}
	}
	e.Close()
	if rs := kp.released(); len(rs) != 16 {
		t.Fatalf("%d flows released at Close, want 16", len(rs))
	}
}

// rebindingProposer commits, for every bind proposed, a binding of the
// client to another backend than the one proposed (as when another node's
// proposal for the client won).
type rebindingProposer struct{ table *Table }

func (p *rebindingProposer) Propose(pr Proposal) bool {
	if pr.Kind == ProposeBind {
		p.table.Put(pr.Key, Entry{Backend: 100 + (pr.Backend-100+1)%3}) // testBackends: IDs 100..102
	}
	return true
}

// A flow replaced in the middle of a batch (here: the client's binding
// committed elsewhere between two of its datagrams) still carries the
// batch's earlier datagrams: its socket closes after the batch is sent.
func TestListenerFlowReplacedMidBatch(t *testing.T) {
	e, l, fs, _ := fakeEngine(t)
	e.proposer = &rebindingProposer{table: e.table}
	l.handleBatch(clientBatch(e, 2), 2, e.now.Load()) // one client, two datagrams
	cs := e.Counters()[0]
	if len(fs.dialled) != 2 || e.Flows() != 1 || cs.Packets != 2 || cs.Drops != 0 {
		t.Fatalf("%d dials, %d flows, counters %+v; want 2 dials (the flow replaced), 1 flow, 2 packets, no drop", len(fs.dialled), e.Flows(), cs)
	}
	first, second := fs.dialled[0], fs.dialled[1]
	if first.sent.Load() != 1 || second.sent.Load() != 1 {
		t.Fatalf("sent %d on the first flow, %d on the second; want 1 and 1", first.sent.Load(), second.sent.Load())
	}
	select {
	case <-first.closed:
	default:
		t.Fatal("the replaced flow's socket is still open after the batch")
	}
	if len(l.retired) != 0 {
		t.Fatalf("%d retired flows kept", len(l.retired))
	}
}

func TestFakeListenError(t *testing.T) {
	fs := &fakeSockets{failAt: netip.MustParseAddrPort("192.0.2.1:500")}
	e, err := New(Config{Logger: discardLogger(), Table: NewTable(), Proposer: &countingProposer{}, sockets: fs})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	s := Service{ID: 1, VIP: netip.MustParseAddr("192.0.2.1"), Ports: []uint16{500, 4500}, Mode: ModeNAT}
	if err := e.SetServices([]Service{s}); err == nil {
		t.Fatal("no error")
	}
	if len(e.listeners) != 1 {
		t.Fatalf("%d listeners, want the one that opened", len(e.listeners))
	}
}

func BenchmarkListenerBatch(b *testing.B) {
	e, l, _, _ := fakeEngine(b)
	bt := clientBatch(e, 32)
	for i := 0; i < 32; i += 2 { // committed bindings: the steady state
		k := ClientKey{Service: 1, Client: AddrFrom(bt.pkts[i].addr.Addr())}
		b, _ := Pick(l.svc.Load().backends, k)
		e.table.Put(k, Entry{Backend: b.ID, LastSeen: e.now.Load()})
	}
	l.handleBatch(bt, 32, e.now.Load())
	b.ReportAllocs()
	for b.Loop() {
		l.handleBatch(bt, 32, e.now.Load())
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/32, "ns/datagram")
}
