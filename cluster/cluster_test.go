package cluster

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/cluster/membership"
	"github.com/ikelb/ikelb/dataplane"
	"github.com/ikelb/ikelb/persist"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	"google.golang.org/grpc"
)

// Timers of the in-process clusters: short, but long enough for -race on a
// busy two-core machine not to cause needless elections.
var (
	clusterRaft = RaftConfig{
		HeartbeatTimeout: 200 * time.Millisecond, ElectionTimeout: 200 * time.Millisecond,
		LeaderLeaseTimeout: 100 * time.Millisecond, CommitTimeout: 5 * time.Millisecond,
	}
	clusterGossip = membership.Tunables{
		ProbeInterval: 100 * time.Millisecond, ProbeTimeout: 50 * time.Millisecond,
		SuspicionMult: 3, SuspicionMaxTimeoutMult: 2, GossipInterval: 50 * time.Millisecond,
		PushPullInterval: 2 * time.Second, TCPTimeout: time.Second, DeadNodeReclaimTime: 200 * time.Millisecond,
	}
)

// cutLayer wraps a Raft stream layer so that a test can cut the node off
// from the others (both directions) and heal it again.
type cutLayer struct {
	raft.StreamLayer
	cut   atomic.Bool
	mu    sync.Mutex
	conns []net.Conn
}

var errCut = errors.New("cut off by the test")

func (c *cutLayer) track(conn net.Conn) {
	c.mu.Lock()
	c.conns = append(c.conns, conn)
	c.mu.Unlock()
}

func (c *cutLayer) Accept() (net.Conn, error) {
	for {
		conn, err := c.StreamLayer.Accept()
		if err != nil {
			return nil, err
		}
		if c.cut.Load() {
			conn.Close()
			continue
		}
		c.track(conn)
		return conn, nil
	}
}

func (c *cutLayer) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	if c.cut.Load() {
		return nil, errCut
	}
	conn, err := c.StreamLayer.Dial(addr, timeout)
	if err == nil {
		c.track(conn)
	}
	return conn, err
}

func (c *cutLayer) setCut(cut bool) {
	c.cut.Store(cut)
	if !cut {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, conn := range c.conns {
		conn.Close()
	}
	c.conns = nil
}

// headTruncatedLog hides entries below the log's first index. raft-wal
// truncates the head of its current segment logically only and still
// returns those entries, so with a short test log the leader would never
// need to send a snapshot; with real logs that span segments it does.
type headTruncatedLog struct{ raft.LogStore }

func (l headTruncatedLog) GetLog(index uint64, log *raft.Log) error {
	first, err := l.FirstIndex()
	if err != nil {
		return err
	}
	if index < first {
		return raft.ErrLogNotFound
	}
	return l.LogStore.GetLog(index, log)
}

// IsMonotonic passes raft.MonotonicLogStore through: without it raft keeps
// trailing entries on a snapshot install, and raft-wal then refuses the
// next append ("non-monotonic log entries").
func (l headTruncatedLog) IsMonotonic() bool {
	m, ok := l.LogStore.(raft.MonotonicLogStore)
	return ok && m.IsMonotonic()
}

// testNode is one member of an in-process cluster: a Node with its own data
// directory, gossip and Raft on 127.0.0.1 port 0, and a gRPC server with the
// admin and cluster services.
type testNode struct {
	name    string
	dataDir string
	witness bool
	eng     *fakeEngine
	cut     *cutLayer
	node    *Node
	srv     *grpc.Server
	srvDone chan struct{}
	// cutAtStart starts the node with its Raft traffic cut off.
	cutAtStart bool
	// hideRaftState makes its ClusterService.GetStats report no Raft state.
	hideRaftState bool
	// shared, if set, is the configuration every node of a cluster formed
	// with BootstrapExpect shares (bootstrap_test.go); nil: the first node
	// bootstraps alone and the others join the running ones.
	shared *sharedConfig
}

// sharedConfig is one node's part of a configuration written once for every
// node: a gossip address fixed before any node starts, the common join list
// and bootstrap_expect. The Raft address is kept across restarts.
type sharedConfig struct {
	gossipAddr string
	raftAddr   string // "" until the first start
	join       []string
	expect     int
}

type testCluster struct {
	t      *testing.T
	raft   RaftConfig
	gossip membership.Tunables
	dead   time.Duration
	nodes  []*testNode
}

func newTestCluster(t *testing.T, raftCfg RaftConfig, deadServerTimeout time.Duration) *testCluster {
	return &testCluster{t: t, raft: raftCfg, gossip: clusterGossip, dead: deadServerTimeout}
}

// add starts a new node; the first bootstraps, the others join the first.
func (c *testCluster) add(name string, witness bool) *testNode {
	c.t.Helper()
	tn := &testNode{name: name, dataDir: c.t.TempDir(), witness: witness}
	c.nodes = append(c.nodes, tn)
	c.start(tn)
	return tn
}

// start (re)starts tn on its data directory, joining any running node.
func (c *testCluster) start(tn *testNode) {
	c.t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		c.t.Fatal(err)
	}
	var join []string
	for _, o := range c.nodes {
		if o != tn && o.node != nil && o.node.running() {
			join = append(join, o.node.GossipAddr())
		}
	}
	bootstrap, expect, gossipAddr, raftAddr := len(join) == 0, 0, "127.0.0.1:0", "127.0.0.1:0"
	if s := tn.shared; s != nil {
		join, bootstrap, expect, gossipAddr = s.join, false, s.expect, s.gossipAddr
		raftAddr = cmp.Or(s.raftAddr, raftAddr)
	}
	tn.cut = nil
	cfg := Config{
		Name: tn.name, DataDir: tn.dataDir, RaftBindAddr: raftAddr, Bootstrap: bootstrap, BootstrapExpect: expect,
		Logger: testLogger(c.t), Raft: c.raft, Batch: BatchConfig{Linger: time.Millisecond},
		Gossip:            GossipConfig{BindAddr: gossipAddr, Join: join, Tunables: c.gossip},
		AdminAddr:         lis.Addr().String(),
		DeadServerTimeout: c.dead,
		ReconcileInterval: 200 * time.Millisecond,
		wrapStream: func(s raft.StreamLayer) raft.StreamLayer {
			tn.cut = &cutLayer{StreamLayer: s}
			tn.cut.cut.Store(tn.cutAtStart)
			return tn.cut
		},
	}
	cfg.Raft.TrailingLogs = 1 // a node that was away catches up by snapshot
	ps, err := persist.Open(tn.dataDir, persist.Options{Logger: cfg.Logger})
	if err != nil {
		c.t.Fatal(err)
	}
	cfg.Stores = &Stores{Log: headTruncatedLog{ps.Log}, Stable: ps.Stable, Snapshots: ps.Snapshots, Close: ps.Close}
	n, err := New(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	tn.node = n
	tn.srv = grpc.NewServer()
	ikelbv1.RegisterAdminServiceServer(tn.srv, NewAdminServer(n))
	var cs ikelbv1.ClusterServiceServer = NewClusterServer(n)
	if tn.hideRaftState {
		cs = stateHidingServer{NewClusterServer(n)}
	}
	ikelbv1.RegisterClusterServiceServer(tn.srv, cs)
	tn.srvDone = make(chan struct{})
	go func(srv *grpc.Server, done chan struct{}) {
		defer close(done)
		_ = srv.Serve(lis)
	}(tn.srv, tn.srvDone)
	var dp Dataplane
	if !tn.witness {
		tn.eng = &fakeEngine{}
		dp = tn.eng
	}
	if err := n.Start(dp); err != nil {
		c.t.Fatal(err)
	}
	if tn.shared != nil {
		tn.shared.raftAddr = n.RaftAddr()
	}
	c.t.Cleanup(func() { tn.stop(c.t) })
}

// stop shuts tn down without leaving (as if killed); safe to call again.
func (tn *testNode) stop(t testing.TB) {
	if tn.node == nil || tn.srv == nil {
		return
	}
	if err := tn.node.Shutdown(); err != nil {
		t.Errorf("shutdown %s: %v", tn.name, err)
	}
	tn.srv.Stop()
	<-tn.srvDone
	tn.srv = nil
}

func (c *testCluster) running() []*testNode {
	var out []*testNode
	for _, tn := range c.nodes {
		if tn.srv != nil {
			out = append(out, tn)
		}
	}
	return out
}

// waitWithin polls cond until it holds or d passes.
func waitWithin(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not a wait for state
	}
}

// leader returns the running node that leads, once every running node
// agrees on it.
func (c *testCluster) leader() *testNode {
	c.t.Helper()
	var l *testNode
	waitWithin(c.t, 10*time.Second, "one leader all running nodes agree on", func() bool {
		l = nil
		for _, tn := range c.running() {
			if tn.node.IsLeader() {
				l = tn
			}
		}
		if l == nil {
			return false
		}
		for _, tn := range c.running() {
			if _, id := tn.node.raft.LeaderWithID(); string(id) != l.name {
				return false
			}
		}
		return true
	})
	return l
}

func (c *testCluster) follower() *testNode {
	l := c.leader()
	for _, tn := range c.running() {
		if tn != l && !tn.witness {
			return tn
		}
	}
	c.t.Fatal("no follower with a dataplane")
	return nil
}

// voters returns the sorted voter IDs of tn's latest Raft configuration.
func voters(tn *testNode) []string {
	f := tn.node.raft.GetConfiguration()
	if f.Error() != nil {
		return nil
	}
	var ids []string
	for _, s := range f.Configuration().Servers {
		if s.Suffrage == raft.Voter {
			ids = append(ids, string(s.ID))
		}
	}
	slices.Sort(ids)
	return ids
}

func (c *testCluster) waitVoters(d time.Duration, want ...string) {
	c.t.Helper()
	slices.Sort(want)
	waitWithin(c.t, d, fmt.Sprintf("voters %v", want), func() bool {
		l := c.leader()
		return slices.Equal(voters(l), want)
	})
}

// clientKey is client 198.51.100.i of service 1.
func clientKey(i int) dataplane.ClientKey {
	return dataplane.ClientKey{Service: 1, Client: dataplane.AddrFrom(netip.AddrFrom4([4]byte{198, 51, 100 + byte(i/250), byte(i%250 + 1)}))}
}

// propose binds clients [from, to) to backend through tn's Proposer.
func propose(t testing.TB, tn *testNode, from, to int, backend uint32) {
	t.Helper()
	for i := from; i < to; i++ {
		p := dataplane.Proposal{Kind: dataplane.ProposeBind, Key: clientKey(i), Backend: backend, At: testEpoch + int64(i)}
		if !tn.node.Proposer().Propose(p) {
			t.Fatalf("%s dropped proposal %d", tn.name, i)
		}
	}
}

// hasBinds reports whether tn's table has clients [0, n) bound.
func hasBinds(tn *testNode, n int) bool {
	for i := range n {
		if _, ok := tn.node.Table().Lookup(clientKey(i)); !ok {
			return false
		}
	}
	return true
}

func (c *testCluster) waitBinds(d time.Duration, n int) {
	c.t.Helper()
	for _, tn := range c.running() {
		waitWithin(c.t, d, tn.name+" has "+strconv.Itoa(n)+" binds", func() bool { return hasBinds(tn, n) })
	}
}

func createVPN(t testing.TB, tn *testNode) {
	t.Helper()
	_, err := NewAdminServer(tn.node).CreateService(context.Background(), &ikelbv1.CreateServiceRequest{
		Service: apiService("vpn", "10.0.0.1", "10.1.0.1", "10.1.0.2"),
	})
	if err != nil {
		t.Fatalf("create service on %s: %v", tn.name, err)
	}
}

// TestClusterReplicationForwardingAndWitness: three nodes (two with a
// dataplane, one witness) form a cluster via join; proposals and admin
// writes on a follower are forwarded and committed everywhere; first writer
// wins across nodes; touches from any node refresh last-seen; the cluster
// status shows every member; the witness keeps quorum when a voter dies.
func TestClusterReplicationForwardingAndWitness(t *testing.T) {
	c := newTestCluster(t, clusterRaft, time.Minute)
	c.add("n1", false)
	c.add("n2", false)
	w := c.add("n3", true)
	c.waitVoters(10*time.Second, "n1", "n2", "n3")
	f := c.follower()

	// An admin write on a follower is forwarded, and readable there at once.
	createVPN(t, f)
	if _, ok := f.node.FSM().serviceByName("vpn"); !ok {
		t.Fatal("a forwarded write is not visible on the node it was sent to")
	}
	_, err := NewAdminServer(f.node).CreateService(context.Background(), &ikelbv1.CreateServiceRequest{Service: apiService("vpn", "10.0.0.9")})
	assertCode(t, err, "AlreadyExists", "already exists")
	for _, tn := range c.running() {
		waitWithin(t, 5*time.Second, tn.name+" has the service", func() bool { _, ok := tn.node.FSM().serviceByName("vpn"); return ok })
	}
	for _, tn := range c.running() {
		if !tn.witness {
			waitWithin(t, 5*time.Second, tn.name+"'s dataplane gets the service", func() bool { return len(tn.eng.latest()) == 1 })
		}
	}

	// Binds proposed on a follower are committed on all three.
	propose(t, f, 0, 100, 1)
	c.waitBinds(5*time.Second, 100)
	if st := f.node.Status(); st.Forwarded < 100 || st.Proposed != 0 {
		t.Fatalf("follower status %+v: want its proposals forwarded", st)
	}
	if st := c.leader().node.Status(); st.Received < 100 {
		t.Fatalf("leader status %+v: want the follower's proposals received", st)
	}

	// First writer wins: a later bind of the same client to another backend
	// from the leader does not move it.
	propose(t, c.leader(), 0, 1, 2)
	propose(t, c.leader(), 100, 101, 2) // a marker committed after it
	c.waitBinds(5*time.Second, 101)
	for _, tn := range c.running() {
		if e, _ := tn.node.Table().Lookup(clientKey(0)); e.Backend != 1 {
			t.Fatalf("%s: client 0 moved to backend %d", tn.name, e.Backend)
		}
	}

	// A touch from a follower refreshes last-seen everywhere (so the
	// leader's expiry, which compares last-seen, keeps the client).
	at := testEpoch + int64(time.Hour)
	f.node.Proposer().Propose(dataplane.Proposal{Kind: dataplane.ProposeTouch, Key: clientKey(5), At: at})
	for _, tn := range c.running() {
		waitWithin(t, 5*time.Second, tn.name+" sees the touch", func() bool {
			e, _ := tn.node.Table().Lookup(clientKey(5))
			return e.LastSeen == at
		})
	}

	// The cluster status, asked on the witness, shows every member.
	resp, err := NewAdminServer(w.node).GetClusterStatus(context.Background(), &ikelbv1.GetClusterStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetMembers()) != 3 || resp.GetLeader() == "" {
		t.Fatalf("cluster status %v", resp)
	}
	for _, m := range resp.GetMembers() {
		wantRole := "voter"
		if m.GetName() == "n3" {
			wantRole = "witness"
		}
		if m.GetStatus() != "alive" || m.GetSuffrage() != "Voter" || m.GetRole() != wantRole || m.GetMatchIndex() == 0 ||
			m.GetAdminAddress() == "" || m.GetGossipAddress() == "" || m.GetLeader() != (m.GetName() == c.leader().name) {
			t.Fatalf("member %v", m)
		}
		t.Logf("member %s role %s match %d lag %d", m.GetName(), m.GetRole(), m.GetMatchIndex(), m.GetLag())
	}
	if st := w.node.Status(); st.Role != "witness" || st.Affinities != 101 {
		t.Fatalf("witness status %+v", st)
	}

	// Kill the voter that is not the witness... or, if the witness leads,
	// either voter: the remaining two (one of them the witness) keep a
	// quorum and go on committing.
	var victim *testNode
	for _, tn := range c.running() {
		if !tn.witness {
			victim = tn
			break
		}
	}
	victim.stop(t)
	l := c.leader()
	if l == victim {
		t.Fatal("a stopped node leads")
	}
	var survivor *testNode
	for _, tn := range c.running() {
		if !tn.witness {
			survivor = tn
		}
	}
	propose(t, survivor, 101, 150, 1)
	c.waitBinds(10*time.Second, 150)
	if st := w.node.Status(); st.Degraded {
		t.Fatalf("witness degraded with a quorum: %+v", st)
	}
}

// TestClusterLeaderFailoverAndRejoin runs with the default Raft timers and
// measures the failover: the leader is killed (no leave); a new leader is
// elected and commits; the two keep every committed affinity; the dead node
// is removed after DeadServerTimeout; restarted on its data directory it
// rejoins and catches up from a snapshot.
func TestClusterLeaderFailoverAndRejoin(t *testing.T) {
	defaults := Config{}.withDefaults().Raft
	const deadAfter = time.Second
	c := newTestCluster(t, defaults, deadAfter)
	for _, name := range []string{"n1", "n2", "n3"} {
		c.add(name, false)
	}
	c.waitVoters(10*time.Second, "n1", "n2", "n3")
	createVPN(t, c.nodes[2])
	propose(t, c.follower(), 0, 200, 1)
	c.waitBinds(5*time.Second, 200)

	old := c.leader()
	killed := time.Now()
	old.stop(t)
	var nl *testNode
	waitWithin(t, 5*time.Second, "a new leader", func() bool {
		for _, tn := range c.running() {
			if tn.node.IsLeader() {
				nl = tn
				return true
			}
		}
		return false
	})
	elected := time.Since(killed)
	var other *testNode
	for _, tn := range c.running() {
		if tn != nl {
			other = tn
		}
	}
	// The first commit after the failover: a bind proposed on the other
	// survivor, forwarded to the new leader.
	waitWithin(t, 5*time.Second, "the first commit after the failover", func() bool {
		propose(t, other, 200, 201, 1)
		_, ok := nl.node.Table().Lookup(clientKey(200))
		return ok
	})
	committed := time.Since(killed)
	t.Logf("failover with default raft timers (heartbeat %v, election %v): new leader after %v, first commit after %v",
		defaults.HeartbeatTimeout, defaults.ElectionTimeout, elected.Round(time.Millisecond), committed.Round(time.Millisecond))
	if committed > 3*time.Second {
		t.Errorf("failover took %v, want about a second", committed)
	}
	c.waitBinds(5*time.Second, 201)

	// The dead node is removed once it has been failed for deadAfter.
	removed := time.Now()
	c.waitVoters(deadAfter+5*time.Second, nl.name, other.name)
	t.Logf("dead leader removed from the raft configuration %v after the new leader was elected", time.Since(removed).Round(time.Millisecond))

	// Commit more and snapshot, so that the old leader's log is too far
	// behind: it must catch up from a snapshot.
	propose(t, other, 201, 400, 1)
	c.waitBinds(5*time.Second, 400)
	if err := nl.node.raft.Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	snapIndex := nl.node.raft.LastIndex()
	propose(t, other, 400, 450, 1)
	c.waitBinds(5*time.Second, 450)

	c.start(old)
	c.waitVoters(10*time.Second, "n1", "n2", "n3")
	waitWithin(t, 10*time.Second, old.name+" catches up", func() bool { return hasBinds(old, 450) && old.node.Table().Len() == 450 })
	if s, _ := strconv.ParseUint(old.node.RaftStats()["last_snapshot_index"], 10, 64); s < snapIndex {
		t.Errorf("%s caught up without installing the leader's snapshot (its last snapshot index %d < %d)", old.name, s, snapIndex)
	}
	// And it commits again, as a follower forwarding to the leader.
	if old.node.IsLeader() {
		t.Fatalf("%s leads after rejoining", old.name)
	}
	propose(t, old, 450, 460, 2)
	c.waitBinds(5*time.Second, 460)
}

// TestClusterIsolatedNodeDegraded cuts one follower's Raft traffic: it
// reports degraded and keeps its table while the majority commits; healed,
// it catches up. Then it leaves, and the leader removes it at once.
func TestClusterIsolatedNodeDegraded(t *testing.T) {
	c := newTestCluster(t, clusterRaft, time.Minute)
	for _, name := range []string{"n1", "n2", "n3"} {
		c.add(name, false)
	}
	c.waitVoters(10*time.Second, "n1", "n2", "n3")
	createVPN(t, c.leader())
	propose(t, c.leader(), 0, 50, 1)
	c.waitBinds(5*time.Second, 50)

	iso := c.follower()
	iso.cut.setCut(true)
	waitWithin(t, 5*time.Second, iso.name+" reports degraded", func() bool { return iso.node.Status().Degraded })
	if !hasBinds(iso, 50) {
		t.Fatal("the isolated node lost its table")
	}
	// Its proposals never block: they are held while no leader is reachable
	// (and committed once it is, checked below); the majority goes on
	// committing.
	propose(t, iso, 50, 60, 1)
	var rest *testNode
	for _, tn := range c.running() {
		if tn != iso && !tn.node.IsLeader() {
			rest = tn
		}
	}
	propose(t, rest, 60, 100, 1)
	for _, tn := range c.running() {
		if tn != iso {
			waitWithin(t, 5*time.Second, tn.name+" commits without the isolated node", func() bool {
				_, ok := tn.node.Table().Lookup(clientKey(99))
				return ok
			})
		}
	}
	if _, ok := iso.node.Table().Lookup(clientKey(99)); ok {
		t.Fatal("the isolated node applied an entry it cannot have received")
	}
	if st := iso.node.Status(); !st.Degraded || st.Affinities < 50 {
		t.Fatalf("isolated status %+v", st)
	}

	iso.cut.setCut(false)
	waitWithin(t, 10*time.Second, iso.name+" catches up", func() bool {
		_, ok := iso.node.Table().Lookup(clientKey(99))
		return ok && !iso.node.Status().Degraded
	})
	// What its clients did while it was cut off is committed everywhere.
	for _, tn := range c.running() {
		waitWithin(t, 10*time.Second, tn.name+" has the isolated node's held binds", func() bool {
			for i := 50; i < 60; i++ {
				if _, ok := tn.node.Table().Lookup(clientKey(i)); !ok {
					return false
				}
			}
			return true
		})
	}

	// A node that leaves is removed at once, not after DeadServerTimeout (a
	// minute here).
	if err := iso.node.Leave(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, tn := range c.running() {
		if tn != iso {
			want = append(want, tn.name)
		}
	}
	c.waitVoters(5*time.Second, want...)
}
