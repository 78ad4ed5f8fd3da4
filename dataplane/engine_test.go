package dataplane

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// recordingProposer records proposals; the test goroutine commits them.
type recordingProposer struct {
	mu    sync.Mutex
	props []Proposal
}

func (p *recordingProposer) Propose(pr Proposal) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.props = append(p.props, pr)
	return true
}

func (p *recordingProposer) take() []Proposal {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.props
	p.props = nil
	return out
}

// received is one datagram a stand-in backend got.
type received struct {
	backend string // backend address
	local   netip.AddrPort
	from    netip.AddrPort
	payload []byte
}

// standIn is a UDP backend that records what it gets and answers
// "re:" + payload.
type standIn struct {
	conn *net.UDPConn
	got  chan received
	done chan struct{}
}

func startStandIn(t *testing.T, c *net.UDPConn, got chan received) {
	s := &standIn{conn: c, got: got, done: make(chan struct{})}
	t.Cleanup(func() { c.Close(); <-s.done })
	go func() {
		defer close(s.done)
		buf := make([]byte, 65535)
		local := c.LocalAddr().(*net.UDPAddr).AddrPort()
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			p := bytes.Clone(buf[:n])
			got <- received{backend: local.Addr().String(), local: local, from: from, payload: p}
			c.WriteToUDPAddrPort(append([]byte("re:"), p...), from)
		}
	}()
}

// freePorts finds n ports free on every address in addrs and returns the
// sockets bound on addrs[1:] (the stand-in backends); the first address's
// port is left for the engine.
func freePorts(t testing.TB, n int, vip string, backends ...string) (ports []uint16, conns map[string][]*net.UDPConn) {
	t.Helper()
	conns = map[string][]*net.UDPConn{}
	for attempt := 0; len(ports) < n && attempt < 50; attempt++ {
		probe, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(net.JoinHostPort(vip, "0"))))
		if err != nil {
			t.Skipf("cannot bind %s: %v", vip, err)
		}
		port := probe.LocalAddr().(*net.UDPAddr).AddrPort().Port()
		var got []*net.UDPConn
		for _, b := range backends {
			c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(b), port)))
			if err != nil {
				break
			}
			got = append(got, c)
		}
		probe.Close()
		if len(got) != len(backends) {
			for _, c := range got {
				c.Close()
			}
			continue
		}
		ports = append(ports, port)
		for i, b := range backends {
			conns[b] = append(conns[b], got[i])
		}
	}
	if len(ports) < n {
		t.Fatalf("found only %d free ports", len(ports))
	}
	return ports, conns
}

type engineHarness struct {
	t      *testing.T
	e      *Engine
	table  *Table
	prop   *recordingProposer
	got    chan received
	vip    netip.Addr
	ports  []uint16
	svc    Service
	baseGR int
}

func newHarness(t *testing.T, vip string, backendAddrs ...string) *engineHarness {
	t.Helper()
	baseGR := runtime.NumGoroutine()
	ports, conns := freePorts(t, 2, vip, backendAddrs...)
	h := &engineHarness{t: t, table: NewTable(), prop: &recordingProposer{}, got: make(chan received, 1024),
		vip: netip.MustParseAddr(vip), ports: ports, baseGR: baseGR}
	for _, cs := range conns {
		for _, c := range cs {
			startStandIn(t, c, h.got)
		}
	}
	e, err := New(Config{
		Logger:        slog.New(slog.NewTextHandler(testWriter{t}, nil)),
		Table:         h.table,
		Proposer:      h.prop,
		BatchSize:     8,
		ClockTick:     5 * time.Millisecond,
		SweepInterval: 20 * time.Millisecond,
		HandoverIdle:  50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	h.e = e
	t.Cleanup(func() { e.Close() })
	h.svc = Service{ID: 1, Name: "vpn", VIP: h.vip, Ports: ports, Timeout: time.Hour, Mode: ModeNAT, Key: KeySourceIP}
	for i, a := range backendAddrs {
		h.svc.Backends = append(h.svc.Backends, Backend{ID: uint32(i + 1), Addr: netip.MustParseAddr(a),
			Weight: 1, State: StateActive, Health: HealthUp})
	}
	h.apply()
	return h
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func (h *engineHarness) apply() {
	h.t.Helper()
	if err := h.e.SetServices([]Service{h.svc}); err != nil {
		h.t.Fatal(err)
	}
}

func (h *engineHarness) setState(id uint32, s BackendState) {
	h.t.Helper()
	bs := append([]Backend(nil), h.svc.Backends...)
	bs[id-1].State = s
	h.svc.Backends = bs
	h.apply()
}

// commit applies recorded proposals the way the FSM would: the first bind
// wins unless the bound backend is no longer usable; touches refresh.
func (h *engineHarness) commit() []Proposal {
	props := h.prop.take()
	for _, p := range props {
		e, ok := h.table.Get(p.Key)
		switch p.Kind {
		case ProposeBind:
			if ok {
				var usable bool
				for _, b := range h.svc.Backends {
					usable = usable || (b.ID == e.Backend && b.Usable())
				}
				if usable {
					continue
				}
			}
			h.table.Put(p.Key, Entry{Backend: p.Backend, Created: p.At, LastSeen: p.At})
		case ProposeTouch:
			if ok {
				e.LastSeen = p.At
				h.table.Put(p.Key, e)
			}
		}
	}
	return props
}

func (h *engineHarness) client(ip string) *net.UDPConn {
	h.t.Helper()
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(ip), 0)))
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { c.Close() })
	return c
}

func (h *engineHarness) vipPort(i int) netip.AddrPort { return netip.AddrPortFrom(h.vip, h.ports[i]) }

// send sends payload from c to VIP:ports[pi] and waits for the backend to
// get it and for the reply to come back from VIP:port; it returns the
// backend's address.
func (h *engineHarness) send(c *net.UDPConn, pi int, payload []byte) string {
	h.t.Helper()
	return h.sendRecv(c, pi, payload).backend
}

// sendRecv is send returning the datagram as the backend got it.
func (h *engineHarness) sendRecv(c *net.UDPConn, pi int, payload []byte) received {
	h.t.Helper()
	dst := h.vipPort(pi)
	if _, err := c.WriteToUDPAddrPort(payload, dst); err != nil {
		h.t.Fatal(err)
	}
	r := h.recv()
	if !bytes.Equal(r.payload, payload) || r.local.Port() != dst.Port() {
		h.t.Fatalf("backend %v got % x on port %d, want % x on %d", r.backend, r.payload, r.local.Port(), payload, dst.Port())
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 65535)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		h.t.Fatalf("no reply: %v", err)
	}
	if from.Addr().Unmap() != dst.Addr() || from.Port() != dst.Port() {
		h.t.Fatalf("reply from %v, want %v", from, dst)
	}
	if want := append([]byte("re:"), payload...); !bytes.Equal(buf[:n], want) {
		h.t.Fatalf("reply % x, want % x", buf[:n], want)
	}
	return r
}

func (h *engineHarness) recv() received {
	h.t.Helper()
	select {
	case r := <-h.got:
		return r
	case <-time.After(5 * time.Second):
		h.t.Fatal("no datagram reached a backend within 5s")
	}
	return received{}
}

// waitFor polls cond until it holds or 5 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not a wait for state
	}
}

func TestEngineLoopback(t *testing.T) {
	h := newHarness(t, "127.0.0.1", "127.0.0.2", "127.0.0.3")
	other := map[string]string{"127.0.0.2": "127.0.0.3", "127.0.0.3": "127.0.0.2"}

	// IKE_SA_INIT on P1, then IKE_AUTH from a NEW source port on P2: same backend.
	c1 := h.client("127.0.0.10")
	b1 := h.send(c1, 0, MinimalIKESAInit(0xabc, false))
	props := h.commit()
	key1 := ClientKey{Service: 1, Client: AddrFrom(netip.MustParseAddr("127.0.0.10"))}
	if len(props) != 1 || props[0].Kind != ProposeBind || props[0].Key != key1 {
		t.Fatalf("proposals %+v, want one bind for %v", props, key1)
	}
	c1b := h.client("127.0.0.10")
	if b := h.send(c1b, 1, MinimalIKESAInit(0xabc, true)); b != b1 {
		t.Fatalf("4500 half went to %s, 500 half to %s", b, b1)
	}
	// ESP, keepalive, garbage and an empty datagram are all forwarded.
	for _, p := range [][]byte{{0x58, 0x0b, 0x8b, 0x3e, 0, 0, 0, 1, 9, 9}, {0xff}, {0, 0}, {}} {
		if b := h.send(c1b, 1, p); b != b1 {
			t.Fatalf("% x went to %s, want %s", p, b, b1)
		}
	}

	// A committed binding wins over Pick: bind client 2 to whatever Pick
	// would not choose.
	c2ip := "127.0.0.11"
	key2 := ClientKey{Service: 1, Client: AddrFrom(netip.MustParseAddr(c2ip))}
	picked, _ := Pick(h.svc.Backends, key2)
	forced := h.svc.Backends[0]
	if forced.ID == picked.ID {
		forced = h.svc.Backends[1]
	}
	h.table.Put(key2, Entry{Backend: forced.ID, Created: 1, LastSeen: h.e.now.Load()})
	c2 := h.client(c2ip)
	if b := h.send(c2, 1, []byte{0xff}); b != forced.Addr.String() {
		t.Fatalf("bound client went to %s, want %s", b, forced.Addr)
	}
	if props := h.commit(); len(props) != 0 {
		t.Fatalf("committed fresh client proposed %+v", props)
	}

	// Drain client 1's backend: client 1 stays, new clients go elsewhere.
	id1 := uint32(1)
	if b1 == "127.0.0.3" {
		id1 = 2
	}
	h.setState(id1, StateDrain)
	if b := h.send(c1b, 1, []byte{0xff}); b != b1 {
		t.Fatalf("drained backend lost its client: %s", b)
	}
	for i := 0; i < 4; i++ {
		c := h.client(fmt.Sprintf("127.0.0.%d", 20+i))
		if b := h.send(c, 0, MinimalIKESAInit(uint64(i), false)); b != other[b1] {
			t.Fatalf("new client went to draining backend %s", b)
		}
	}
	h.commit()

	// Disable it: client 1 is re-chosen, a new bind is proposed, the flow
	// is re-created to the new backend.
	h.setState(id1, StateDisabled)
	if b := h.send(c1b, 1, []byte{0xff}); b != other[b1] {
		t.Fatalf("disabled backend still gets traffic: %s", b)
	}
	props = h.commit()
	if len(props) != 1 || props[0].Kind != ProposeBind || props[0].Key != key1 || props[0].Backend == id1 {
		t.Fatalf("after disable: proposals %+v, want a rebind of %v", props, key1)
	}

	// Nothing accepts new clients: a new client is dropped and counted.
	for _, b := range h.svc.Backends {
		h.setState(b.ID, StateDrain)
	}
	c3 := h.client("127.0.0.30")
	if _, err := c3.WriteToUDPAddrPort([]byte{0xff}, h.vipPort(0)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "no_backend drop", func() bool {
		cs := h.e.Counters()
		return len(cs) == 1 && cs[0].DropsByReason["no_backend"] == 1
	})
	// …while a bound client still passes.
	if b := h.send(c1b, 1, []byte{0xff}); b != other[b1] {
		t.Fatalf("bound client went to %s", b)
	}

	// Test ports are not 500, so every datagram is classified as NAT-T
	// framed: the classes only have to add up.
	// A batch's counters are flushed after its datagrams are sent, so the
	// last reply can reach the client first: poll.
	var cs ServiceCounters
	countersOK := func() bool {
		cs = h.e.Counters()[0]
		var classes uint64
		for _, n := range cs.Datagrams {
			classes += n
		}
		return cs.Packets == 14 && cs.ReplyPackets == cs.Packets && cs.Drops == 1 && classes == cs.Packets+cs.Drops &&
			cs.Datagrams["keepalive"] == 6 && cs.Datagrams["esp"] == 1 && cs.Backends[0].Packets+cs.Backends[1].Packets == 14
	}
	deadline := time.Now().Add(5 * time.Second)
	for !countersOK() {
		if time.Now().After(deadline) {
			t.Fatalf("counters %+v", cs)
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not a wait for state
	}

	// Removing a port closes its listener.
	h.svc.Ports = h.ports[:1]
	h.apply()
	p2 := h.vipPort(1)
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(p2))
	if err != nil {
		t.Fatalf("port of removed listener still bound: %v", err)
	}
	c.Close()

	// Close leaves no goroutines behind (clients and stand-ins are closed
	// by the cleanups; the engine's must be gone now).
	if err := h.e.Close(); err != nil {
		t.Fatal(err)
	}
	if h.e.Flows() != 0 {
		t.Fatalf("%d flows after Close", h.e.Flows())
	}
	standIns := 2 * 2 // backends × ports
	waitFor(t, "engine goroutines to exit", func() bool { return runtime.NumGoroutine() <= h.baseGR+standIns })
	if err := h.e.SetServices([]Service{h.svc}); !errors.Is(err, ErrClosed) {
		t.Fatalf("SetServices after Close: %v", err)
	}
}

func TestEngineIPv6VIP(t *testing.T) {
	// VIP ::1 with IPv4 backends: NAT mode crosses families.
	probe, err := net.ListenUDP("udp6", &net.UDPAddr{IP: net.IPv6loopback})
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	probe.Close()
	h := newHarness(t, "::1", "127.0.0.2")
	c := h.client("::1")
	if b := h.send(c, 0, MinimalIKESAInit(1, false)); b != "127.0.0.2" {
		t.Fatalf("went to %s", b)
	}
	props := h.commit()
	if len(props) != 1 || props[0].Key.Client != AddrFrom(netip.MustParseAddr("::1")) {
		t.Fatalf("proposals %+v", props)
	}
	if b := h.send(h.client("::1"), 1, []byte{0xff}); b != "127.0.0.2" {
		t.Fatalf("went to %s", b)
	}
}

func TestEngineFlowExpiry(t *testing.T) {
	h := newHarness(t, "127.0.0.1", "127.0.0.2")
	h.svc.Timeout = 100 * time.Millisecond // flow idle timeout follows it
	h.apply()
	c := h.client("127.0.0.10")
	h.send(c, 0, []byte{1})
	if h.e.Flows() != 1 {
		t.Fatalf("%d flows", h.e.Flows())
	}
	waitFor(t, "idle flow to close", func() bool { return h.e.Flows() == 0 })
	h.send(c, 0, []byte{2}) // a new flow
}

// kernelClients is a KernelPath forwarding a fixed set of clients; it
// records the handovers and releases. With carry set its Handover takes
// the flows (the kernel carries them with their own addresses); active is
// its LastActive, by client.
type kernelClients struct {
	mu        sync.Mutex
	keys      map[ClientKey]bool
	carry     bool
	handovers map[KernelFlow]int
	active    map[netip.AddrPort]int64
	releases  []KernelFlow
}

func (k *kernelClients) Forwards(c ClientKey) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.keys[c]
}

func (k *kernelClients) Handover(f KernelFlow) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.handovers == nil {
		k.handovers = map[KernelFlow]int{}
	}
	k.handovers[f]++
	return k.carry
}

func (k *kernelClients) LastActive(f KernelFlow) int64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.active[f.Client]
}

func (k *kernelClients) Release(f KernelFlow) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.releases = append(k.releases, f)
}

func (k *kernelClients) setActive(client netip.AddrPort, at int64) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.active == nil {
		k.active = map[netip.AddrPort]int64{}
	}
	k.active[client] = at
}

func (k *kernelClients) handedOver() map[KernelFlow]int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return maps.Clone(k.handovers)
}

func (k *kernelClients) released() []KernelFlow {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.releases)
}

func localAddr(c *net.UDPConn) netip.AddrPort { return c.LocalAddr().(*net.UDPAddr).AddrPort() }

// A flow whose client the kernel took over (through conntrack: Handover
// returns false) closes after HandoverIdle, long before the flow timeout;
// the others stay.
func TestEngineHandoverClosesFlows(t *testing.T) {
	h := newHarness(t, "127.0.0.1", "127.0.0.2")
	kernel, userspace := h.client("127.0.0.10"), h.client("127.0.0.11")
	kp := &kernelClients{keys: map[ClientKey]bool{{Service: h.svc.ID, Client: AddrFrom(netip.MustParseAddr("127.0.0.10"))}: true}}
	h.e.SetKernelPath(kp)
	h.send(kernel, 0, []byte{1})
	h.send(userspace, 0, []byte{1})
	if n := h.e.Flows(); n != 2 {
		t.Fatalf("%d flows, want 2", n)
	}
	// While the kernel client's datagrams still reach the listener (a
	// conntrack entry from before its binding reached the kernel), its
	// flow is handed over; it stays open.
	for i := range 10 {
		h.send(kernel, 0, []byte{byte(2 + i)})
		time.Sleep(20 * time.Millisecond) // 200 ms: past a handover check (every 100 ms), within the 50 ms HandoverIdle
	}
	got := kp.handedOver()
	var flow KernelFlow
	for f := range got {
		flow = f
	}
	if len(got) != 1 || flow.Client != localAddr(kernel) || flow.Local != h.vipPort(0) || flow.Service != h.svc.ID {
		t.Fatalf("handovers %v, want only the kernel client's %v → %v", got, localAddr(kernel), h.vipPort(0))
	}
	if n := h.e.Flows(); n != 2 {
		t.Fatalf("%d flows while the kernel client is active, want 2", n)
	}
	waitFor(t, "the kernel client's flow to close", func() bool { return h.e.Flows() == 1 })
	time.Sleep(200 * time.Millisecond) // several sweeps past HandoverIdle: the userspace client's flow (1 h timeout) stays
	if n := h.e.Flows(); n != 1 {
		t.Fatalf("%d flows after the handover, want 1 (the userspace client's)", n)
	}
	if r := kp.released(); len(r) != 0 {
		t.Fatalf("released %v: the kernel path took no flow", r)
	}
	h.e.SetKernelPath(nil)
	h.send(kernel, 0, []byte{2}) // back through userspace: a new flow
	if n := h.e.Flows(); n != 2 {
		t.Fatalf("%d flows, want 2", n)
	}
}

// checkKernelFlow checks that the kernel path was handed f as the backend
// saw the flow (r): Upstream is the address and port the backend got the
// datagram from, Backend where it got it.
func checkKernelFlow(t *testing.T, h *engineHarness, f KernelFlow, client netip.AddrPort, r received) {
	t.Helper()
	want := KernelFlow{Service: h.svc.ID, Client: client, Local: netip.AddrPortFrom(h.vip, r.local.Port()),
		Upstream: r.from, Backend: r.local}
	if f != want {
		t.Fatalf("kernel flow %+v, want %+v (as the backend saw it)", f, want)
	}
}

// A flow the kernel carries with its own addresses (Handover returns
// true) keeps its socket past HandoverIdle while the kernel forwards its
// datagrams, forwards what still reaches the listener through that
// socket, and closes once neither it nor the kernel forwarded anything for
// the flow timeout; it is then released, once.
func TestEngineKernelCarriesFlow(t *testing.T) {
	h := newHarness(t, "127.0.0.1", "127.0.0.2")
	h.svc.Timeout = 400 * time.Millisecond // flow idle timeout follows it; HandoverIdle is 50 ms
	h.apply()
	flowIdle := h.svc.Timeout
	c := h.client("127.0.0.10")
	client := localAddr(c)
	kp := &kernelClients{carry: true, keys: map[ClientKey]bool{{Service: h.svc.ID, Client: AddrFrom(client.Addr())}: true}}
	h.e.SetKernelPath(kp)

	r := h.sendRecv(c, 0, []byte{1}) // the flow's first datagram asks
	got := kp.handedOver()
	if len(got) != 1 {
		t.Fatalf("handovers %v, want one", got)
	}
	var kf KernelFlow
	for f := range got {
		kf = f
	}
	checkKernelFlow(t, h, kf, client, r)

	// The kernel forwards the flow: nothing reaches the listener for
	// longer than the flow timeout, yet the flow stays.
	deadline := time.Now().Add(flowIdle + flowIdle/2)
	for time.Now().Before(deadline) {
		kp.setActive(client, time.Now().UnixNano())
		time.Sleep(20 * time.Millisecond) // pacing the kernel's activity; a sweep every 20 ms
		if n := h.e.Flows(); n != 1 {
			t.Fatalf("%d flows while the kernel carries the client, want 1", n)
		}
	}
	// A datagram the kernel leaves to userspace goes through the same
	// socket; the flow asks again, with the same addresses.
	if r2 := h.sendRecv(c, 0, []byte{2}); r2.from != r.from {
		t.Fatalf("backend got the datagram from %v, want %v (the flow's socket)", r2.from, r.from)
	}
	if got := kp.handedOver(); len(got) != 1 || got[kf] != 2 {
		t.Fatalf("handovers %v, want %v twice", got, kf)
	}
	if rs := kp.released(); len(rs) != 0 {
		t.Fatalf("released %v while open", rs)
	}

	last := time.Now()
	kp.setActive(client, last.UnixNano())
	waitFor(t, "the idle flow to close", func() bool { return h.e.Flows() == 0 })
	if idle := time.Since(last); idle < flowIdle {
		t.Fatalf("flow closed %v after the kernel's last activity, before the %v flow timeout", idle, flowIdle)
	}
	if rs := kp.released(); len(rs) != 1 || rs[0] != kf {
		t.Fatalf("released %v, want %v once", rs, kf)
	}
	// The socket is closed (the descriptor once its reply goroutine has
	// returned): its port can be bound again.
	waitFor(t, "the flow socket's port to be free", func() bool {
		c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(kf.Upstream))
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

// A flow the kernel carries is released when it is replaced (its client
// re-bound to another backend) and when its listener closes.
func TestEngineKernelFlowReleased(t *testing.T) {
	for name, end := range map[string]func(h *engineHarness){
		"service removed": func(h *engineHarness) {
			if err := h.e.SetServices(nil); err != nil {
				h.t.Fatal(err)
			}
		},
		"engine closed": func(h *engineHarness) { h.e.Close() },
	} {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t, "127.0.0.1", "127.0.0.2", "127.0.0.3")
			c := h.client("127.0.0.10")
			client := localAddr(c)
			key := ClientKey{Service: h.svc.ID, Client: AddrFrom(client.Addr())}
			kp := &kernelClients{carry: true, keys: map[ClientKey]bool{key: true}}
			h.e.SetKernelPath(kp)

			r1 := h.sendRecv(c, 0, []byte{1})
			// Re-bind the client to the other backend: its next
			// datagram replaces the flow.
			other := h.svc.Backends[0]
			if other.Addr.String() == r1.backend {
				other = h.svc.Backends[1]
			}
			h.table.Put(key, Entry{Backend: other.ID, Created: 1, LastSeen: h.e.now.Load()})
			r2 := h.sendRecv(c, 0, []byte{2})
			if r2.backend != other.Addr.String() {
				t.Fatalf("re-bound client went to %s, want %s", r2.backend, other.Addr)
			}
			if n := h.e.Flows(); n != 1 {
				t.Fatalf("%d flows, want 1", n)
			}
			got := kp.handedOver()
			if len(got) != 2 {
				t.Fatalf("handovers %v, want the two flows'", got)
			}
			var first, second KernelFlow
			for f := range got {
				if f.Backend == r1.local {
					first = f
				} else {
					second = f
				}
			}
			checkKernelFlow(t, h, first, client, r1)
			checkKernelFlow(t, h, second, client, r2)
			if rs := kp.released(); len(rs) != 1 || rs[0] != first {
				t.Fatalf("released %v after the re-bind, want %v", rs, first)
			}

			end(h)
			if n := h.e.Flows(); n != 0 {
				t.Fatalf("%d flows", n)
			}
			if rs := kp.released(); len(rs) != 2 || rs[1] != second {
				t.Fatalf("released %v, want %v then %v", rs, first, second)
			}
		})
	}
}

func TestEngineListenError(t *testing.T) {
	h := newHarness(t, "127.0.0.1", "127.0.0.2")
	busy, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	port := busy.LocalAddr().(*net.UDPAddr).AddrPort().Port()
	s2 := h.svc
	s2.ID, s2.Ports = 2, []uint16{port}
	err = h.e.SetServices([]Service{h.svc, s2})
	want := netip.AddrPortFrom(h.vip, port).String()
	if !errors.Is(err, ErrListen) || !strings.Contains(err.Error(), want) {
		t.Fatalf("SetServices = %v, want ErrListen naming %s", err, want)
	}
	// The other service still works.
	h.send(h.client("127.0.0.10"), 0, []byte{1})
}

func TestSetServicesValidation(t *testing.T) {
	e, err := New(Config{Logger: slog.New(slog.DiscardHandler), Table: NewTable(), Proposer: &recordingProposer{}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ok := Service{ID: 1, VIP: netip.MustParseAddr("127.0.0.1"), Ports: []uint16{1}, Mode: ModeNAT,
		Backends: []Backend{{ID: 1, Addr: netip.MustParseAddr("127.0.0.2"), Weight: 1, State: StateActive}}}
	mut := func(f func(s *Service)) []Service { s := ok; f(&s); return []Service{s} }
	for name, set := range map[string][]Service{
		"no vip":           mut(func(s *Service) { s.VIP = netip.Addr{} }),
		"no ports":         mut(func(s *Service) { s.Ports = nil }),
		"port 0":           mut(func(s *Service) { s.Ports = []uint16{0} }),
		"mode 9":           mut(func(s *Service) { s.Mode = 9 }),
		"transparent snat": mut(func(s *Service) { s.Mode, s.SNAT = ModeTransparent, netip.MustParseAddr("127.0.0.3") }),
		"dup backend":      mut(func(s *Service) { s.Backends = append(s.Backends, s.Backends[0]) }),
		"snat family":      mut(func(s *Service) { s.SNAT = netip.MustParseAddr("::1") }),
		"dup service id":   {ok, ok},
		"dup vip and port": {ok, func() Service { s := ok; s.ID = 2; return s }()},
	} {
		if err := e.SetServices(set); !errors.Is(err, ErrInvalidService) {
			t.Errorf("%s: %v, want ErrInvalidService", name, err)
		}
	}
	if _, err := New(Config{}); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("New(Config{}) = %v", err)
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

func TestFlowRoom(t *testing.T) {
	for _, c := range []struct {
		nofile uint64
		want   int
	}{
		{1024, 64}, {2048, 1024}, {20000, 18000}, {1 << 20, 943719},
	} {
		if got := flowRoom(c.nofile); got != c.want {
			t.Errorf("flowRoom(%d) = %d, want %d", c.nofile, got, c.want)
		}
	}
}

// The engine never plans more flows than the open-file limit leaves room
// for: past it the daemon's admin API, metrics and Raft could not accept
// or dial either.
func TestEngineMaxFlowsUnderFileLimit(t *testing.T) {
	nofile, ok := openFileLimit()
	if !ok {
		t.Skip("no RLIMIT_NOFILE here")
	}
	e, err := New(Config{Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil)), Table: NewTable(),
		Proposer: &recordingProposer{}, MaxFlows: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if e.cfg.MaxFlows != flowRoom(nofile) {
		t.Fatalf("MaxFlows %d with an open-file limit of %d, want %d", e.cfg.MaxFlows, nofile, flowRoom(nofile))
	}
}

// TestEngineSweepAsksHandover: a flow whose client the kernel starts
// forwarding is handed over by the next sweep, without a datagram of its
// own (on a saturated core the listener may not read one for seconds),
// and once only.
func TestEngineSweepAsksHandover(t *testing.T) {
	for _, carry := range []bool{true, false} {
		t.Run(fmt.Sprintf("carry=%v", carry), func(t *testing.T) {
			h := newHarness(t, "127.0.0.1", "127.0.0.2")
			h.svc.Timeout = 2 * time.Second // longer than the test: only a handover closes the flow
			h.apply()
			c := h.client("127.0.0.10")
			client := localAddr(c)
			kp := &kernelClients{carry: carry, keys: map[ClientKey]bool{}}
			h.e.SetKernelPath(kp)
			h.sendRecv(c, 0, []byte{1})        // asks; the kernel does not forward the client yet
			time.Sleep(100 * time.Millisecond) // sweeps every 20 ms
			if got := kp.handedOver(); len(got) != 0 {
				t.Fatalf("handovers %v before the kernel forwards the client", got)
			}
			kp.mu.Lock()
			kp.keys[ClientKey{Service: h.svc.ID, Client: AddrFrom(client.Addr())}] = true
			kp.mu.Unlock()
			waitFor(t, "a sweep to hand the flow over", func() bool { return len(kp.handedOver()) == 1 })
			if carry {
				time.Sleep(100 * time.Millisecond) // more sweeps
				for kf, n := range kp.handedOver() {
					if n != 1 || kf.Upstream == (netip.AddrPort{}) {
						t.Fatalf("handed over %v %d times, want once with its upstream", kf, n)
					}
				}
				if h.e.Flows() != 1 {
					t.Fatal("the flow the kernel carries closed")
				}
				return
			}
			// Through conntrack: the flow closes after HandoverIdle, asked once.
			waitFor(t, "the flow to close", func() bool { return h.e.Flows() == 0 })
			for kf, n := range kp.handedOver() {
				if n != 1 {
					t.Fatalf("handed over %v %d times, want once", kf, n)
				}
			}
		})
	}
}
