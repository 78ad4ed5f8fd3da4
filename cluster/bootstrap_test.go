package cluster

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/cluster/membership"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

func TestPlanBootstrap(t *testing.T) {
	member := func(name string, role string) membership.Member {
		return membership.Member{Name: name, Status: membership.StatusAlive, Meta: membership.Meta{RaftAddr: name + ":7452", Role: role}}
	}
	failed, left, badMeta, noRaft := member("f", "voter"), member("l", "voter"), member("m", "voter"), member("r", "voter")
	failed.Status, left.Status, badMeta.MetaErr, noRaft.Meta.RaftAddr = membership.StatusFailed, membership.StatusLeft, errors.New("bad"), ""
	voters := func(names ...string) []raft.Server {
		var out []raft.Server
		for _, n := range names {
			out = append(out, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(n), Address: raft.ServerAddress(n + ":7452")})
		}
		return out
	}
	cases := []struct {
		name       string
		self       string
		expect     int
		members    []membership.Member
		want       []raft.Server
		candidates int
		wait       string
	}{
		{"too few", "a", 3, []membership.Member{member("a", "voter"), member("b", "voter")}, nil, 2, "sees 2 of the 3"},
		{"exactly, sorted whatever the input order", "b", 3,
			[]membership.Member{member("c", "voter"), member("a", "voter"), member("b", "voter")}, voters("a", "b", "c"), 3, ""},
		{"a witness votes", "w", 2, []membership.Member{member("w", "witness"), member("a", "voter")}, voters("a", "w"), 2, ""},
		{"failed, left, bad meta and no raft address do not count", "a", 2,
			[]membership.Member{member("a", "voter"), failed, left, badMeta, noRaft}, nil, 1, "sees 1 of the 2"},
		{"more than expected: the first by name", "b", 2,
			[]membership.Member{member("c", "voter"), member("b", "voter"), member("a", "voter")}, voters("a", "b"), 3, ""},
		{"more than expected, not among the first", "c", 2,
			[]membership.Member{member("c", "voter"), member("b", "voter"), member("a", "voter")}, nil, 3, "not among the first 2"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			servers, candidates, wait := planBootstrap(tc.self, tc.expect, tc.members)
			if !slices.Equal(servers, tc.want) || len(candidates) != tc.candidates {
				t.Fatalf("servers %v, %d candidates; want %v, %d", servers, len(candidates), tc.want, tc.candidates)
			}
			if (tc.wait == "") != (wait == "") || !strings.Contains(wait, tc.wait) {
				t.Fatalf("wait %q, want %q", wait, tc.wait)
			}
			if !slices.IsSortedFunc(candidates, func(a, b membership.Member) int { return strings.Compare(a.Name, b.Name) }) {
				t.Fatalf("candidates not sorted: %v", candidates)
			}
		})
	}
}

func TestMissingJoins(t *testing.T) {
	alive := []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:7946"), netip.MustParseAddrPort("10.0.0.2:7946")}
	lookup := func(host string) []netip.Addr {
		if host == "lb2.example" {
			return []netip.Addr{netip.MustParseAddr("::ffff:10.0.0.2")}
		}
		return nil
	}
	cases := []struct {
		join, want []string
	}{
		{nil, nil},
		{[]string{"10.0.0.1:7946", "10.0.0.2:7946"}, nil},
		{[]string{"10.0.0.1:7946", "10.0.0.3:7946"}, []string{"10.0.0.3:7946"}},
		{[]string{"10.0.0.1:7947"}, []string{"10.0.0.1:7947"}},                           // another port
		{[]string{"lb2.example:7946", "lb9.example:7946"}, []string{"lb9.example:7946"}}, // resolved, unmapped; unresolvable
		{[]string{"nonsense"}, []string{"nonsense"}},
	}
	for _, tc := range cases {
		if got := missingJoins(tc.join, alive, lookup); !slices.Equal(got, tc.want) {
			t.Errorf("missingJoins(%v) = %v, want %v", tc.join, got, tc.want)
		}
	}
}

func TestConfigValidateBootstrap(t *testing.T) {
	base := Config{Name: "n1", DataDir: "/nonexistent", AdminAddr: "127.0.0.1:7450"}
	gossip := GossipConfig{BindAddr: "127.0.0.1:0", Join: []string{"127.0.0.1:7946"}}
	cases := []struct {
		name string
		mod  func(*Config)
		want string // "" valid
	}{
		{"single node", func(c *Config) { c.Bootstrap = true }, ""},
		{"expect 1 alone", func(c *Config) { c.BootstrapExpect = 1 }, ""},
		{"expect with gossip and join", func(c *Config) { c.BootstrapExpect, c.Gossip = 3, gossip }, ""},
		{"join only", func(c *Config) { c.Gossip = gossip }, ""},
		{"negative", func(c *Config) { c.BootstrapExpect = -1 }, "bootstrap_expect:"},
		{"expect without gossip", func(c *Config) { c.BootstrapExpect = 3 }, "bootstrap_expect: 3 needs gossip"},
		{"expect and bootstrap", func(c *Config) { c.BootstrapExpect, c.Bootstrap, c.Gossip = 3, true, gossip }, "bootstrap_expect: 3 contradicts"},
		{"expect 1 with join", func(c *Config) { c.BootstrapExpect, c.Gossip = 1, gossip }, "bootstrap:"},
		{"bootstrap with join", func(c *Config) { c.Bootstrap, c.Gossip = true, gossip }, "bootstrap:"},
	}
	for _, tc := range cases {
		c := base
		tc.mod(&c)
		err := c.Validate()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: Validate() = %v, want %q", tc.name, err, tc.want)
		}
	}
}

// freeGossipAddr returns 127.0.0.1:port with a port that was free for TCP
// and UDP a moment ago. A configuration shared by every node must name each
// node's gossip address before any starts, so port 0 cannot be used; the
// port could be taken in between, and the node's start then fails loudly.
func freeGossipAddr(t *testing.T) string {
	t.Helper()
	for range 100 {
		// Below the kernel's ephemeral range (32768 and up by default):
		// a port it handed out (127.0.0.1:0) and that was closed again
		// could be handed to any other process's socket before the node
		// binds it (CI: "bind: address already in use" while other
		// packages' tests ran), and once to two nodes of the same test.
		addr := fmt.Sprintf("127.0.0.1:%d", 20000+rand.IntN(12000))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		u, err := net.ListenPacket("udp", addr)
		l.Close()
		if err != nil {
			continue
		}
		u.Close()
		if _, dup := gossipAddrsGiven.LoadOrStore(addr, true); dup {
			continue
		}
		return addr
	}
	t.Fatal("no port free for both TCP and UDP")
	return ""
}

// gossipAddrsGiven holds every address freeGossipAddr returned in this
// test process.
var gossipAddrsGiven sync.Map

// addShared adds, without starting them, nodes that share one configuration:
// a join list naming every one of them (each its own address included) and
// bootstrap_expect expect.
func (c *testCluster) addShared(expect int, witness map[string]bool, names ...string) []*testNode {
	c.t.Helper()
	var join []string
	var out []*testNode
	for _, name := range names {
		tn := &testNode{name: name, dataDir: c.t.TempDir(), witness: witness[name], shared: &sharedConfig{gossipAddr: freeGossipAddr(c.t), expect: expect}}
		join = append(join, tn.shared.gossipAddr)
		out = append(out, tn)
	}
	for _, tn := range out {
		tn.shared.join = join
	}
	c.nodes = append(c.nodes, out...)
	return out
}

// waitOneCluster waits until every running node has the voters want in its
// Raft configuration and all follow the one leader.
func (c *testCluster) waitOneCluster(d time.Duration, want ...string) *testNode {
	c.t.Helper()
	slices.Sort(want)
	var leader *testNode
	waitWithin(c.t, d, fmt.Sprintf("one cluster of voters %v with one leader on every node", want), func() bool {
		leader = nil
		var id raft.ServerID
		for _, tn := range c.running() {
			if tn.node.IsLeader() {
				if leader != nil {
					return false
				}
				leader = tn
			}
			_, lid := tn.node.raft.LeaderWithID()
			if lid == "" || id != "" && lid != id || !slices.Equal(voters(tn), want) {
				return false
			}
			id = lid
		}
		return leader != nil && string(id) == leader.name
	})
	return leader
}

func bootstrappedNodes(nodes []*testNode) []string {
	var out []string
	for _, tn := range nodes {
		if tn.node.bootstrapped.Load() {
			out = append(out, tn.name)
		}
	}
	return out
}

// TestBootstrapExpectFormsGrowsAndRestarts: three nodes started together
// with one configuration (the same join list, naming each of them, and
// bootstrap_expect 3) form one cluster; a fourth node with the same join
// list and bootstrap_expect, named to sort first (so that it would be in
// the configuration it planned) and with its Raft traffic cut (so that the
// leader cannot reach it first), joins that cluster instead of
// bootstrapping another; then all four are stopped and started again on
// their data directories and come back as the same cluster with the same
// data, none bootstrapping.
func TestBootstrapExpectFormsGrowsAndRestarts(t *testing.T) {
	c := newTestCluster(t, clusterRaft, time.Minute)
	nodes := c.addShared(3, nil, "n1", "n2", "n3")
	for _, tn := range nodes {
		c.start(tn)
	}
	c.waitOneCluster(10*time.Second, "n1", "n2", "n3")
	b := bootstrappedNodes(nodes)
	if len(b) == 0 {
		t.Fatal("a cluster formed but no node bootstrapped it")
	}
	t.Logf("bootstrapped by %v (the others were reached by the leader first)", b)
	createVPN(t, c.follower())
	propose(t, c.follower(), 0, 20, 1)
	c.waitBinds(5*time.Second, 20)

	// The fourth node starts with its Raft traffic cut, so that the leader
	// cannot add it before it decides: it must find out from the members
	// that a cluster exists.
	n0 := &testNode{name: "n0", dataDir: t.TempDir(), cutAtStart: true,
		shared: &sharedConfig{gossipAddr: freeGossipAddr(t), join: nodes[0].shared.join, expect: 3}}
	c.nodes = append(c.nodes, n0)
	c.start(n0)
	waitWithin(t, 5*time.Second, "n0 finds that the others have raft state", func() bool {
		w := n0.node.bootstrapWait.Load()
		return w != nil && strings.Contains(*w, "already has raft state")
	})
	if n0.node.bootstrapped.Load() {
		t.Fatal("the fourth node bootstrapped although the others had a cluster")
	}
	n0.cutAtStart = false
	n0.cut.setCut(false)
	c.waitOneCluster(10*time.Second, "n0", "n1", "n2", "n3")
	if n0.node.bootstrapped.Load() {
		t.Fatal("the fourth node bootstrapped although the others had a cluster")
	}
	c.waitBinds(5*time.Second, 20)

	for _, tn := range c.nodes {
		tn.stop(t)
	}
	for _, tn := range c.nodes {
		c.start(tn)
	}
	c.waitOneCluster(10*time.Second, "n0", "n1", "n2", "n3")
	if b := bootstrappedNodes(c.nodes); len(b) > 0 {
		t.Fatalf("%v bootstrapped again on restart", b)
	}
	c.waitBinds(5*time.Second, 20)
	propose(t, c.follower(), 20, 40, 1)
	c.waitBinds(5*time.Second, 40)
}

// stateHidingServer is a ClusterService whose GetStats claims no Raft
// state, so that every node of a test decides to bootstrap.
type stateHidingServer struct{ *ClusterServer }

func (s stateHidingServer) GetStats(ctx context.Context, req *ikelbv1.GetStatsRequest) (*ikelbv1.GetStatsResponse, error) {
	st, err := s.ClusterServer.GetStats(ctx, req)
	if err == nil {
		st.Term, st.LastIndex = 0, 0
	}
	return st, err
}

// TestBootstrapExpectAllBootstrapTogether: when every node bootstraps (Raft
// traffic cut until all have, and no node seeing another's state), they
// bootstrap the same configuration and, healed, are one cluster.
func TestBootstrapExpectAllBootstrapTogether(t *testing.T) {
	c := newTestCluster(t, clusterRaft, time.Minute)
	nodes := c.addShared(3, nil, "n1", "n2", "n3")
	for _, tn := range nodes {
		tn.cutAtStart, tn.hideRaftState = true, true
		c.start(tn)
	}
	waitWithin(t, 5*time.Second, "every node bootstraps", func() bool { return len(bootstrappedNodes(nodes)) == 3 })
	for _, tn := range nodes {
		tn.cut.setCut(false)
	}
	c.waitOneCluster(10*time.Second, "n1", "n2", "n3")
	createVPN(t, c.follower())
	propose(t, c.follower(), 0, 20, 1)
	c.waitBinds(5*time.Second, 20)
}

// TestBootstrapExpectWithWitness: an HA-pair-style start of one voter and
// one witness with bootstrap_expect 2 forms a cluster of two voters.
func TestBootstrapExpectWithWitness(t *testing.T) {
	c := newTestCluster(t, clusterRaft, time.Minute)
	nodes := c.addShared(2, map[string]bool{"w": true}, "n1", "w")
	for _, tn := range nodes {
		c.start(tn)
	}
	c.waitOneCluster(10*time.Second, "n1", "w")
	createVPN(t, c.leader())
	n1 := nodes[0]
	waitWithin(t, 5*time.Second, "n1's dataplane gets the service", func() bool { return len(n1.eng.latest()) == 1 })
	propose(t, n1, 0, 10, 1)
	c.waitBinds(5*time.Second, 10)
	if st := nodes[1].node.Status(); st.Role != "witness" || st.Affinities != 10 {
		t.Fatalf("witness status %+v", st)
	}
}

// TestRestartedNodeRejoinsGossip: a follower is stopped until the others
// have stopped gossiping to it (memberlist gossips to a failed member for
// PushPullInterval only), then restarted with no join list at all. The
// others' join lists name it, so their periodic rejoin brings it back into
// gossip, and the leader does not remove it when DeadServerTimeout passes.
// Without the periodic rejoin it would stay alone in gossip and be removed.
func TestRestartedNodeRejoinsGossip(t *testing.T) {
	const dead = 6 * time.Second
	c := newTestCluster(t, clusterRaft, dead)
	c.gossip.PushPullInterval = time.Second // also how long memberlist gossips to the dead
	nodes := c.addShared(3, nil, "n1", "n2", "n3")
	for _, tn := range nodes {
		c.start(tn)
	}
	c.waitOneCluster(10*time.Second, "n1", "n2", "n3")
	createVPN(t, c.leader())

	f := c.follower()
	f.stop(t)
	waitWithin(t, 5*time.Second, "the others see "+f.name+" failed for longer than they gossip to the dead", func() bool {
		for _, tn := range c.running() {
			m, ok := tn.node.memberByName(f.name)
			if !ok || m.Status != membership.StatusFailed || time.Since(m.Since) < c.gossip.PushPullInterval*3/2 {
				return false
			}
		}
		return true
	})
	f.shared.join = nil
	c.start(f)
	restarted := time.Now()
	waitWithin(t, dead/2, "the others rejoin "+f.name, func() bool {
		alive := 0
		for _, m := range f.node.members.Members() {
			if m.Status == membership.StatusAlive {
				alive++
			}
		}
		m, ok := c.leader().node.memberByName(f.name)
		return alive == 3 && ok && m.Status == membership.StatusAlive
	})
	t.Logf("%s back in gossip %v after its restart", f.name, time.Since(restarted).Round(time.Millisecond))
	// Watch past DeadServerTimeout: it must stay a voter throughout.
	for until := restarted.Add(dead + time.Second); time.Now().Before(until); {
		if !slices.Contains(voters(c.leader()), f.name) {
			t.Fatalf("%s was removed from the raft configuration although it is back in gossip", f.name)
		}
		time.Sleep(20 * time.Millisecond) // polling interval for the whole watch window
	}
	propose(t, c.leader(), 0, 10, 1)
	c.waitBinds(5*time.Second, 10)
}
