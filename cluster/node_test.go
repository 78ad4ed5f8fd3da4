package cluster

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/dataplane"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	"google.golang.org/protobuf/types/known/durationpb"
)

// testEpoch is the time binds are proposed at: recent, so that the leader
// does not expire them.
var testEpoch = time.Now().UnixNano()

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not a wait for state
	}
}

// fakeEngine is a Dataplane recording the service sets it gets.
type fakeEngine struct {
	mu       sync.Mutex
	sets     [][]dataplane.Service
	counters []dataplane.ServiceCounters
	flows    int
	fail     int // SetServices calls still to fail
	kernel   map[uint32]dataplane.KernelClients
}

func (e *fakeEngine) KernelClients() map[uint32]dataplane.KernelClients {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.kernel
}

func (e *fakeEngine) Flows() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.flows
}

func (e *fakeEngine) SetServices(s []dataplane.Service) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.sets = append(e.sets, s)
	if e.fail > 0 {
		e.fail--
		return errors.New("listen failed: 10.0.0.1:500: bind: address already in use")
	}
	return nil
}

func (e *fakeEngine) Counters() []dataplane.ServiceCounters {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.counters
}

func (e *fakeEngine) latest() []dataplane.Service {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.sets) == 0 {
		return nil
	}
	return e.sets[len(e.sets)-1]
}

func testLogger(t testing.TB) *slog.Logger {
	w := &tlogWriter{t: t}
	// Cleanups run last-registered first, so this runs after the nodes
	// created later have stopped; memberlist's own goroutines may still log
	// after its Shutdown, and t.Log after the test has ended panics.
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// tlogWriter sends log lines to t.Log until the test's cleanups are done.
type tlogWriter struct {
	t    testing.TB
	mu   sync.Mutex
	done bool
}

func (w *tlogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(string(p[:len(p)-1]))
	}
	return len(p), nil
}

func inmemStores() *Stores {
	return &Stores{Log: raft.NewInmemStore(), Stable: raft.NewInmemStore(), Snapshots: raft.NewInmemSnapshotStore()}
}

// fastRaft shortens timers for in-process tests.
var fastRaft = RaftConfig{
	HeartbeatTimeout: 100 * time.Millisecond, ElectionTimeout: 100 * time.Millisecond,
	LeaderLeaseTimeout: 50 * time.Millisecond, CommitTimeout: 5 * time.Millisecond,
}

func testConfig(t testing.TB) Config {
	return Config{
		Name: "n1", RaftBindAddr: "127.0.0.1:0", Bootstrap: true, Logger: testLogger(t),
		Raft: fastRaft, Batch: BatchConfig{Linger: time.Millisecond},
	}
}

// startNode starts a node and waits until it leads.
func startNode(t testing.TB, cfg Config, dp Dataplane) *Node {
	t.Helper()
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(dp); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Shutdown(); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	waitFor(t, "leadership", n.IsLeader)
	return n
}

func apiService(name, vip string, backends ...string) *ikelbv1.Service {
	s := &ikelbv1.Service{Name: name, Vip: vip}
	for _, b := range backends {
		s.Backends = append(s.Backends, &ikelbv1.Backend{Address: b})
	}
	return s
}

func mustCreate(t testing.TB, n *Node, s *ikelbv1.Service) *ikelbv1.Service {
	t.Helper()
	resp, err := NewAdminServer(n).CreateService(context.Background(), &ikelbv1.CreateServiceRequest{Service: s})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetService()
}

// proposeBinds binds clients 192.0.2.x (x in 1..count) of service 1 to backend 1
// through the node's Proposer and waits until all are committed.
func proposeBinds(t testing.TB, n *Node, count int) {
	t.Helper()
	for i := 1; i <= count; i++ {
		p := dataplane.Proposal{Kind: dataplane.ProposeBind, Key: key(1, netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}).String()), Backend: 1, At: testEpoch + int64(i)}
		if !n.Proposer().Propose(p) {
			t.Fatal("proposal dropped")
		}
	}
	waitFor(t, "committed binds", func() bool { return n.Table().Len() >= count })
}

func checkState(t testing.TB, n *Node, binds int) {
	t.Helper()
	svc, ok := n.FSM().serviceByName("vpn")
	if !ok || len(svc.dp.Backends) != 2 {
		t.Fatalf("service vpn after restart: %v", ok)
	}
	if n.Table().Len() != binds {
		t.Fatalf("%d affinities, want %d", n.Table().Len(), binds)
	}
	for i := 1; i <= binds; i++ {
		e, ok := n.Table().Lookup(key(1, netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}).String()))
		if !ok || e.Backend != 1 || e.Created != testEpoch+int64(i) {
			t.Fatalf("client %d: %+v %v", i, e, ok)
		}
	}
}

func TestNodeInmemBootstrapProposeRestart(t *testing.T) {
	stores := inmemStores()
	cfg := testConfig(t)
	cfg.Stores = stores
	eng := &fakeEngine{}
	n := startNode(t, cfg, eng)
	mustCreate(t, n, apiService("vpn", "10.0.0.1", "10.1.0.1", "10.1.0.2"))
	waitFor(t, "services reach the dataplane", func() bool { return len(eng.latest()) == 1 })
	if got := eng.latest()[0]; got.Name != "vpn" || len(got.Ports) != 2 || got.Timeout != defaultTimeout {
		t.Fatalf("dataplane got %+v", got)
	}
	proposeBinds(t, n, 50)
	if st := n.Status(); st.RaftState != "Leader" || st.Degraded || st.Affinities != 50 || st.Services != 1 || st.Proposed != 50 {
		t.Fatalf("status %+v", st)
	}
	if err := n.Shutdown(); err != nil {
		t.Fatal(err)
	}

	// Same stores, fresh table and FSM: raft replays the log.
	n2 := startNode(t, cfg, &fakeEngine{})
	waitFor(t, "replay", func() bool { return n2.Table().Len() == 50 })
	checkState(t, n2, 50)
}

func TestNodePersistRestartWithSnapshot(t *testing.T) {
	cfg := testConfig(t)
	cfg.DataDir = t.TempDir()
	n := startNode(t, cfg, &fakeEngine{})
	mustCreate(t, n, apiService("vpn", "10.0.0.1", "10.1.0.1", "10.1.0.2"))
	proposeBinds(t, n, 30)
	if err := n.raft.Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	proposeBinds(t, n, 60) // 30 more after the snapshot, in the log only
	if err := n.Shutdown(); err != nil {
		t.Fatal(err)
	}
	n2 := startNode(t, cfg, &fakeEngine{})
	waitFor(t, "snapshot restore and log replay", func() bool { return n2.Table().Len() == 60 })
	checkState(t, n2, 60)
	// The node repaired its own address (port 0 gave it a new one).
	waitFor(t, "own address in the configuration", func() bool {
		m, err := n2.Members()
		return err == nil && len(m) == 1 && m[0].RaftAddr == n2.RaftAddr()
	})
}

func TestNodeExpiry(t *testing.T) {
	var offset atomic.Int64
	cfg := testConfig(t)
	cfg.Stores = inmemStores()
	cfg.ExpiryInterval = 20 * time.Millisecond
	cfg.Now = func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	n := startNode(t, cfg, nil)
	s := apiService("vpn", "10.0.0.1", "10.1.0.1", "10.1.0.2")
	s.PersistenceTimeout = durationpb.New(time.Minute)
	mustCreate(t, n, s)
	now := cfg.Now().UnixNano()
	for i, c := range []string{"192.0.2.1", "192.0.2.2"} {
		n.Proposer().Propose(dataplane.Proposal{Kind: dataplane.ProposeBind, Key: key(1, c), Backend: 1, At: now + int64(i)*int64(time.Hour)})
	}
	waitFor(t, "binds", func() bool { return n.Table().Len() == 2 })
	offset.Store(int64(2 * time.Minute))
	waitFor(t, "expiry of the idle client", func() bool { return n.Table().Len() == 1 })
	if _, ok := n.Table().Lookup(key(1, "192.0.2.2")); !ok {
		t.Fatal("the client seen recently was expired")
	}
}

// fakeChecker is a HealthChecker driven by the test.
type fakeChecker struct {
	mu      sync.Mutex
	report  func(HealthTransition)
	targets []HealthTarget
	closed  bool
}

func (c *fakeChecker) Update(t []HealthTarget) { c.mu.Lock(); c.targets = t; c.mu.Unlock() }
func (c *fakeChecker) Close()                  { c.mu.Lock(); c.closed = true; c.mu.Unlock() }
func (c *fakeChecker) get() ([]HealthTarget, func(HealthTransition)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.targets, c.report
}

func TestNodeHealthTransitionsCommitted(t *testing.T) {
	fc := &fakeChecker{}
	cfg := testConfig(t)
	cfg.Stores = inmemStores()
	cfg.HealthChecker = func(report func(HealthTransition)) HealthChecker {
		fc.mu.Lock()
		fc.report = report
		fc.mu.Unlock()
		return fc
	}
	n := startNode(t, cfg, &fakeEngine{}) // a witness (no dataplane) runs no checks
	mustCreate(t, n, apiService("vpn", "10.0.0.1", "10.1.0.1", "10.1.0.2"))
	none := apiService("plain", "10.0.0.2", "10.1.0.1")
	none.HealthCheck = &ikelbv1.HealthCheck{Type: ikelbv1.HealthCheckType_HEALTH_CHECK_TYPE_NONE}
	mustCreate(t, n, none)
	waitFor(t, "targets", func() bool { tg, _ := fc.get(); return len(tg) == 2 })
	tg, report := fc.get()
	if tg[0].Type != HealthCheckICMP || tg[0].Interval != defaultCheckInterval || tg[0].Rise != 2 || tg[0].Fall != 3 || tg[0].Service != 1 {
		t.Fatalf("target %+v", tg[0])
	}
	report(HealthTransition{Service: 1, Backend: 2, Up: false, At: time.Unix(5, 0), Err: "timeout"})
	waitFor(t, "committed health", func() bool {
		s, _ := n.FSM().serviceByName("vpn")
		return s.dp.Backends[1].Health == dataplane.HealthDown
	})
	resp, err := NewAdminServer(n).GetHealth(context.Background(), &ikelbv1.GetHealthRequest{Service: "vpn"})
	if err != nil {
		t.Fatal(err)
	}
	if b := resp.GetBackends()[1]; b.GetHealth() != ikelbv1.BackendHealth_BACKEND_HEALTH_DOWN || b.GetLastError() != "timeout" || b.GetChanged().AsTime() != time.Unix(5, 0).UTC() {
		t.Fatalf("health %v", b)
	}
}

func TestProposerDropsWhenFull(t *testing.T) {
	cfg := testConfig(t)
	cfg.Stores = inmemStores()
	cfg.Batch.QueueSize = 2
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	// Not started: nothing drains the queue.
	p := dataplane.Proposal{Kind: dataplane.ProposeTouch, Key: key(1, "192.0.2.1"), At: 1}
	got := []bool{n.Proposer().Propose(p), n.Proposer().Propose(p), n.Proposer().Propose(p)}
	if got[0] != true || got[1] != true || got[2] != false {
		t.Fatalf("propose results %v", got)
	}
	if st := n.Status(); st.ProposalsDropped != 1 || !st.Degraded {
		t.Fatalf("status %+v", st)
	}
}

func TestBatcherCoalesces(t *testing.T) {
	p := &pending{binds: map[dataplane.ClientKey]struct{}{}, touches: map[dataplane.ClientKey]int{}}
	p.add(dataplane.Proposal{Kind: dataplane.ProposeBind, Key: key(1, "192.0.2.1"), Backend: 1, At: 1})
	p.add(dataplane.Proposal{Kind: dataplane.ProposeBind, Key: key(1, "192.0.2.1"), Backend: 2, At: 2})
	p.add(dataplane.Proposal{Kind: dataplane.ProposeTouch, Key: key(1, "192.0.2.1"), At: 5})
	p.add(dataplane.Proposal{Kind: dataplane.ProposeTouch, Key: key(1, "192.0.2.1"), At: 3})
	p.add(dataplane.Proposal{Kind: dataplane.ProposeTouch, Key: key(2, "192.0.2.1"), At: 3})
	if len(p.batch.Binds) != 1 || p.batch.Binds[0].GetBackendId() != 1 || len(p.batch.Touches) != 2 || p.batch.Touches[0].GetAtNs() != 5 || p.n != 5 {
		t.Fatalf("batch %v (n %d)", &p.batch, p.n)
	}
}

func TestFollowerWithoutLeaderRejectsWrites(t *testing.T) {
	cfg := testConfig(t)
	cfg.Stores = inmemStores()
	cfg.Bootstrap = false
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(nil); err != nil {
		t.Fatal(err)
	}
	defer n.Shutdown()
	_, err = NewAdminServer(n).CreateService(context.Background(), &ikelbv1.CreateServiceRequest{Service: apiService("vpn", "10.0.0.1")})
	assertCode(t, err, "Unavailable", "no leader is known")
	if st := n.Status(); !st.Degraded || st.Role != "witness" {
		t.Fatalf("status %+v", st)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tt := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no name", Config{DataDir: "x"}, "name: required"},
		{"no dir", Config{Name: "a"}, "data_dir"},
		{"lease", Config{Name: "a", DataDir: "x", Raft: RaftConfig{HeartbeatTimeout: time.Second, LeaderLeaseTimeout: 2 * time.Second, ElectionTimeout: time.Second}}, "leader_lease_timeout"},
		{"bind", Config{Name: "a", DataDir: "x", RaftBindAddr: "nope"}, "raft_bind_addr"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if err == nil || !contains(err.Error(), tt.want) {
				t.Fatalf("Validate() = %v, want it to mention %q", err, tt.want)
			}
		})
	}
	if err := (Config{Name: "a", DataDir: "x"}).Validate(); err != nil {
		t.Fatalf("defaults invalid: %v", err)
	}
}

// A service set the dataplane rejects (a listener that could not open) is
// retried until it takes it; meanwhile the node says why, and the admin
// API's node status carries it.
func TestDataplaneRejectionRetried(t *testing.T) {
	// Restored after the node stops: cleanups run last-registered first.
	old := dataplaneRetry
	t.Cleanup(func() { dataplaneRetry = old })
	dataplaneRetry = 50 * time.Millisecond
	eng := &fakeEngine{fail: 3}
	n, c := adminNode(t, eng)
	if _, err := c.CreateService(context.Background(), &ikelbv1.CreateServiceRequest{Service: apiService("vpn", "10.0.0.1", "10.1.0.1")}); err != nil {
		t.Fatal(err)
	}
	var seen string
	waitFor(t, "the dataplane error to show and clear", func() bool {
		if e := n.DataplaneError(); e != "" {
			seen = e
			st, err := c.GetNodeStatus(context.Background(), &ikelbv1.GetNodeStatusRequest{})
			// A retry may succeed between the two reads (it runs every
			// 50 ms): then the status rightly shows none. The error
			// clears only on success, so a status without it while the
			// node still has it is wrong.
			if err != nil || (st.GetDataplaneError() != e && n.DataplaneError() == e) {
				t.Errorf("node status dataplane_error = %q, %v; want %q", st.GetDataplaneError(), err, e)
			}
		}
		eng.mu.Lock()
		defer eng.mu.Unlock()
		return eng.fail == 0 && n.DataplaneError() == ""
	})
	if !strings.Contains(seen, "address already in use") {
		t.Errorf("DataplaneError never showed the rejection (saw %q)", seen)
	}
	eng.mu.Lock()
	defer eng.mu.Unlock()
	if last := eng.sets[len(eng.sets)-1]; len(last) != 1 || last[0].Name != "vpn" {
		t.Errorf("the set applied last is %+v, want the committed vpn service", last)
	}
}
