package e2e

import (
	"bufio"
	"cmp"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	"github.com/ikelb/ikelb/test/netns"
	"github.com/ikelb/ikelb/test/topo"
)

// The cluster end-to-end tests: each ikelbd node is its own process in its
// own network namespace; clients (ikesim sessions: the 500 → 4500 move from a
// new source port, then DPD, ESP-in-UDP and keepalives) and stand-in IKEv2
// servers (ikesim responders, which answer DPD with their name) run in
// namespaces of their own. Nodes are reached only through `ip netns exec`.

const nodeAdmin = "127.0.0.1:7450" // inside each node's namespace

var (
	ikesimOnce sync.Once
	ikesimBin  string
	ikesimErr  error
)

// IkesimBinary builds test/ikesim/cmd/ikesim once.
func IkesimBinary(t testing.TB) string {
	t.Helper()
	Binaries(t) // makes binDir
	ikesimOnce.Do(func() {
		ikesimBin = filepath.Join(binDir, "ikesim")
		cmd := exec.Command("go", "build", "-o", ikesimBin, "./test/ikesim/cmd/ikesim")
		cmd.Dir = repoRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			ikesimErr = fmt.Errorf("go build ikesim: %v\n%s", err, out)
		}
	})
	if ikesimErr != nil {
		t.Fatal(ikesimErr)
	}
	return ikesimBin
}

// lbNode is one ikelbd process in a topo node's namespace.
type lbNode struct {
	t    *testing.T
	topo *topo.Node
	d    *Daemon
	role string
}

type clusterSpec struct {
	vip      netip.Addr
	backends []*topo.Backend
	mode     string
	snat     netip.Addr // nat mode's snat_address; invalid: none
	health   string     // the service's health_check; "": IKEv2 probes every second
}

// nodeConfig is one node's ikelbd.yaml. The admin API listens on every
// address of the node's namespace: peers forward writes and proposals to
// the leader's admin address, and the test reaches it on 127.0.0.1.
// Every node gets the same cluster block, as an operator would write it:
// the same join list naming every node (its own address included) and
// bootstrap_expect = the number of nodes.
func nodeConfig(n *topo.Node, role string, peers []*topo.Node, cs clusterSpec) string {
	var join []string
	for _, p := range peers {
		join = append(join, fmt.Sprintf("%s:7946", p.Edge))
	}
	var backs []string
	for _, b := range cs.backends {
		backs = append(backs, b.Addr.String())
	}
	health := cmp.Or(cs.health, "{type: ikev2, interval: 1s, timeout: 500ms, rise: 1, fall: 3}")
	snat := ""
	if cs.snat.IsValid() {
		snat = "    snat_address: " + cs.snat.String() + "\n"
	}
	return fmt.Sprintf(`node: %s
data_dir: ./data
admin_address: 0.0.0.0:7450
metrics_address: 127.0.0.1:7451
log_level: info
raft:
  bind_address: %s:7452
cluster:
  role: %s
  gossip_address: %s:7946
  join: [%s]
  bootstrap_expect: %d
  dead_server_timeout: 60s
services:
  - name: vpn
    vip: %s
    ports: [500, 4500]
    persistence_timeout: 1h
    forwarding_mode: %s
%s    health_check: %s
    backends: [%s]
`, n.Name, n.Edge, role, n.Edge, strings.Join(join, ", "), len(peers), cs.vip, cs.mode, snat, health, strings.Join(backs, ", "))
}

// startNodes starts ikelbd on every node (roles by name; default voter) and
// waits until all of them see one leader and the service.
func startNodes(t *testing.T, nodes []*topo.Node, roles map[string]string, cs clusterSpec) map[string]*lbNode {
	t.Helper()
	out := map[string]*lbNode{}
	for _, n := range nodes {
		role := roles[n.Name]
		if role == "" {
			role = "voter"
		}
		cfg := nodeConfig(n, role, nodes, cs)
		out[n.Name] = &lbNode{t: t, topo: n, role: role, d: StartDaemon(t, n.Name, nodeAdmin, cfg, n.Exec()...)}
	}
	for _, n := range out {
		n.waitReady(60 * time.Second)
	}
	return out
}

// ctl runs ikelbctl inside the node's namespace.
func (n *lbNode) ctl(args ...string) (string, error) {
	_, ctl := Binaries(n.t)
	full := append(n.topo.Exec(), append([]string{ctl, "--addr", nodeAdmin, "--timeout", "3s"}, args...)...)
	out, err := exec.Command(full[0], full[1:]...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func (n *lbNode) status() (*ikelbv1.GetNodeStatusResponse, error) {
	out, err := n.ctl("status", "-o", "json")
	if err != nil {
		return nil, fmt.Errorf("%v: %s", err, out)
	}
	st := &ikelbv1.GetNodeStatusResponse{}
	if err := protojson.Unmarshal([]byte(out), st); err != nil {
		return nil, fmt.Errorf("status json: %v: %s", err, out)
	}
	return st, nil
}

func (n *lbNode) waitReady(timeout time.Duration) {
	n.t.Helper()
	var last string
	Eventually(n.t, timeout, func() bool {
		st, err := n.status()
		if err != nil {
			last = err.Error()
			return false
		}
		last = fmt.Sprintf("state=%s leader=%q degraded=%v services=%d", st.RaftState, st.Leader, st.Degraded, st.Services)
		return st.Leader != "" && !st.Degraded && st.Services > 0
	}, func() string { return n.topo.Name + " not ready: " + last })
}

// table returns the node's committed affinity table: client → backend.
func (n *lbNode) table() (map[string]string, error) {
	out, err := n.ctl("affinity", "list", "--service", "vpn", "--all", "-o", "json")
	if err != nil {
		return nil, fmt.Errorf("%v: %s", err, out)
	}
	resp := &ikelbv1.ListAffinitiesResponse{}
	if err := protojson.Unmarshal([]byte(out), resp); err != nil {
		return nil, fmt.Errorf("affinity json: %v", err)
	}
	m := map[string]string{}
	for _, a := range resp.Affinities {
		m[a.Client] = a.Backend
	}
	return m, nil
}

func (n *lbNode) mustTable() map[string]string {
	n.t.Helper()
	m, err := n.table()
	if err != nil {
		n.t.Fatalf("%s: %v", n.topo.Name, err)
	}
	return m
}

// startResponders runs an ikesim responder on every backend, on 500/4500.
// startVRRPCluster starts v's responders and its nodes in nat mode (the
// witness as such), then keepalived on lb1, which becomes master, and on
// lb2; it returns the nodes by name and the master.
func startVRRPCluster(t *testing.T, lab *netns.Lab, v *topo.VRRP) (map[string]*lbNode, *topo.Node) {
	t.Helper()
	startResponders(t, lab, v.Backends)
	cs := clusterSpec{vip: v.VIP, backends: v.Backends, mode: "nat"}
	nodes := startNodes(t, v.Nodes(), map[string]string{v.Witness.Name: "witness"}, cs)
	v.StartKeepalived(v.LB1)
	master := v.WaitMaster(nil, 10*time.Second)
	v.StartKeepalived(v.LB2)
	return nodes, master
}

func startResponders(t *testing.T, lab *netns.Lab, backends []*topo.Backend) {
	t.Helper()
	bin := IkesimBinary(t)
	for _, b := range backends {
		lab.Start(b.NS, "responder-"+b.Name, bin, "responder", "--name", b.Name,
			"--ike", b.Addr.String()+":500", "--natt", b.Addr.String()+":4500")
	}
}

// sessionRun is a batch of ikesim sessions running in a client namespace.
type sessionRun struct {
	proc *netns.Proc
	name string
}

// startSessions adds count addresses to the client's interface (so each
// simulated client has its own IP, unless shared; client i of the
// namespace is x.y.z.(100+i)) and starts count sessions from addresses
// first..first+count-1 against vip for d.
func startSessions(t *testing.T, lab *netns.Lab, c *topo.Client, vip netip.Addr, first, count int, shared bool, d time.Duration) *sessionRun {
	t.Helper()
	base := c.Addr
	if !shared {
		if first+count > 150 {
			t.Fatalf("at most 150 own-address clients per namespace")
		}
		b4 := c.Addr.As4()
		base = netip.AddrFrom4([4]byte{b4[0], b4[1], b4[2], byte(99 + first)})
		a := base
		for range count {
			a = a.Next()
			if _, err := c.NS.Run("ip", "addr", "add", a.String()+"/24", "dev", topo.ClientIf); err != nil && !strings.Contains(err.Error(), "exists") {
				t.Fatalf("add client address %s: %v", a, err)
			}
		}
	}
	args := []string{"sessions", "--vip", vip.String(), "--clients", fmt.Sprint(count),
		"--source-base", base.String(), "--interval", "100ms", "--duration", d.String()}
	if shared {
		args = append(args, "--shared")
	}
	name := fmt.Sprintf("sessions-%s-%d", c.Name, first)
	return &sessionRun{proc: lab.Start(c.NS, name, IkesimBinary(t), args...), name: name}
}

// sessionLine is one client's line of an `ikesim sessions` report.
type sessionLine struct {
	Client        string   `json:"client"`
	NATTSource    string   `json:"natt_source"`
	IKEResponder  string   `json:"ike_responder"`
	NATTResponder string   `json:"natt_responder"`
	Servers       []string `json:"servers"`
	Kept          bool     `json:"kept"`
	ReachedEnd    bool     `json:"reached_end"`
	Checks        int      `json:"checks"`
	Answered      int      `json:"answered"`
	UnknownSA     int      `json:"unknown_sa"`
	MaxGapMS      float64  `json:"max_gap_ms"`
	Err           string   `json:"err"`
}

// wait waits for the sessions to end and parses their report.
func (s *sessionRun) wait(t *testing.T, timeout time.Duration) []sessionLine {
	t.Helper()
	select {
	case <-s.proc.Done():
	case <-time.After(timeout):
		t.Fatalf("%s did not finish in %v", s.name, timeout)
	}
	return parseSessions(s.proc.Log())
}

// parseSessions reads the JSON lines of an `ikesim sessions` report out of
// its process log (other lines are skipped).
func parseSessions(log string) []sessionLine {
	var lines []sessionLine
	sc := bufio.NewScanner(strings.NewReader(log))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l sessionLine
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.Client != "" {
			lines = append(lines, l)
		}
	}
	return lines
}

// gapReport summarizes the sessions' longest gaps.
func gapReport(lines []sessionLine) (p50, p99, max float64) {
	var g []float64
	for _, l := range lines {
		g = append(g, l.MaxGapMS)
	}
	if len(g) == 0 {
		return 0, 0, 0
	}
	sort.Float64s(g)
	return g[len(g)/2], g[len(g)*99/100], g[len(g)-1]
}

// leaderOf returns the node the cluster names as leader.
func leaderOf(t *testing.T, nodes map[string]*lbNode) *lbNode {
	t.Helper()
	var leader string
	Eventually(t, 20*time.Second, func() bool {
		for _, n := range nodes {
			if !n.d.Running() {
				continue
			}
			if st, err := n.status(); err == nil && st.Leader != "" {
				leader = st.Leader
				return true
			}
		}
		return false
	}, func() string { return "no leader" })
	for _, n := range nodes {
		if n.topo.Name == leader || strings.HasPrefix(leader, n.topo.Name) || strings.Contains(leader, n.topo.Edge.String()) {
			return n
		}
	}
	t.Fatalf("leader %q is none of the nodes", leader)
	return nil
}

// waitTables waits until every running node has the same table of at
// least min entries, and returns it.
func waitTables(t *testing.T, nodes map[string]*lbNode, min int, timeout time.Duration) map[string]string {
	t.Helper()
	var ref map[string]string
	var why string
	Eventually(t, timeout, func() bool {
		ref = nil
		for _, n := range nodes {
			if !n.d.Running() {
				continue
			}
			m, err := n.table()
			if err != nil {
				why = err.Error()
				return false
			}
			if len(m) < min {
				why = fmt.Sprintf("%s has %d of %d affinities", n.topo.Name, len(m), min)
				return false
			}
			if ref == nil {
				ref = m
				continue
			}
			if !sameMap(ref, m) {
				why = fmt.Sprintf("%s's table differs (%d vs %d entries)", n.topo.Name, len(m), len(ref))
				return false
			}
		}
		return ref != nil
	}, func() string { return "tables did not converge: " + why })
	return ref
}

func sameMap(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// checkSessions asserts that every client whose binding was committed
// before the failover kept its server throughout, and logs the gaps.
func checkSessions(t *testing.T, what string, lines []sessionLine, want int, committed map[string]string, backendName map[string]string) {
	t.Helper()
	if len(lines) != want {
		t.Fatalf("%s: %d session reports, want %d", what, len(lines), want)
	}
	moved := 0
	for _, l := range lines {
		ip := l.Client
		if ap, err := netip.ParseAddrPort(l.Client); err == nil {
			ip = ap.Addr().String()
		}
		if l.Err != "" {
			t.Errorf("%s: client %s failed to connect: %s", what, l.Client, l.Err)
			continue
		}
		if committed != nil {
			if b, ok := committed[ip]; ok && backendName[b] != l.IKEResponder {
				t.Errorf("%s: client %s connected to %s but the committed affinity says %s", what, ip, l.IKEResponder, backendName[b])
			}
		}
		if !l.Kept {
			moved++
			if moved <= 5 {
				t.Errorf("%s: client %s did not keep its server: ike=%s natt=%s servers=%v unknown_sa=%d answered=%d/%d answered_to_the_end=%v",
					what, l.Client, l.IKEResponder, l.NATTResponder, l.Servers, l.UnknownSA, l.Answered, l.Checks, l.ReachedEnd)
			}
		}
	}
	p50, p99, max := gapReport(lines)
	t.Logf("%s: %d clients, %d moved or split; longest gap per client: p50 %.0f ms, p99 %.0f ms, max %.0f ms", what, len(lines), moved, p50, p99, max)
}

func backendNames(bs []*topo.Backend) map[string]string {
	m := map[string]string{}
	for _, b := range bs {
		m[b.Addr.String()] = b.Name
	}
	return m
}

// TestVRRPFailover: an HA pair plus a witness, keepalived moving the VIP
// with `ikelbctl check ready` as its track script. 200 clients (100 with
// their own address, 100 behind one NAT) connect and stay; the master is
// SIGKILLed mid-session; every client keeps its server. Then the killed
// node comes back and catches up, and finally every node is killed and
// restarted with the table intact.
func TestVRRPFailover(t *testing.T) {
	netns.Require(t, "ip", "nft", "keepalived")
	_, ctlBin := Binaries(t)
	lab := netns.New(t, "vr")
	v := topo.NewVRRP(lab, topo.VRRPConfig{
		ClientSide:   topo.ClientSide{Clients: 1, NATClients: 1},
		Backends:     3,
		NoKeepalived: true,
		TrackScript: func(n *topo.Node) string {
			return fmt.Sprintf("%s --addr %s --timeout 1s check ready", ctlBin, nodeAdmin)
		},
	})
	nodes, master := startVRRPCluster(t, lab, v)
	t.Logf("VRRP master: %s", master.Name)

	own, natted := v.Clients[0], v.Clients[1]
	const d = 14 * time.Second
	s1 := startSessions(t, lab, own, v.VIP, 0, 100, false, d)
	s2 := startSessions(t, lab, natted, v.VIP, 0, 100, true, d)

	// 101 client IPs: 100 own, 1 NAT address shared by 100 clients.
	committed := waitTables(t, nodes, 101, 20*time.Second)
	killed := nodes[master.Name]
	killAt := time.Now()
	killed.d.Kill()
	v.KillKeepalived(master)
	v.DropFloating(master)
	newMaster := v.WaitMaster(v.Peer(master), 10*time.Second)
	t.Logf("SIGKILL of %s; VIP on %s after %v", master.Name, newMaster.Name, time.Since(killAt).Round(time.Millisecond))

	names := backendNames(v.Backends)
	checkSessions(t, "own-address clients", s1.wait(t, d+time.Minute), 100, committed, names)
	checkSessions(t, "clients behind one NAT", s2.wait(t, d+time.Minute), 100, committed, names)

	// The killed node restarts and catches up.
	killed.d.Start()
	killed.waitReady(60 * time.Second)
	after := waitTables(t, nodes, len(committed), 30*time.Second)
	for c, b := range committed {
		if after[c] != b {
			t.Fatalf("after failover: client %s on %s, was %s", c, after[c], b)
		}
	}

	// Every node killed and started again: the table is intact.
	for _, n := range nodes {
		n.d.Kill()
	}
	for _, n := range nodes {
		n.d.Start()
	}
	for _, n := range nodes {
		n.waitReady(60 * time.Second)
	}
	again := waitTables(t, nodes, len(after), 30*time.Second)
	if !sameMap(after, again) {
		t.Fatalf("after killing every node: %d affinities, want the %d from before", len(again), len(after))
	}
}

// TestVRRPReadyWatcher: only ikelbd dies on the VRRP master (keepalived
// lives on). The track script is made too slow to matter (every 30 s, fall
// 2), so the VIP can only move because the readiness watcher
// (`ikelbctl check ready --track-file`) saw ikelbd go and keepalived read
// its track_file; the sessions' clients keep their servers.
func TestVRRPReadyWatcher(t *testing.T) {
	netns.Require(t, "ip", "nft", "keepalived")
	_, ctlBin := Binaries(t)
	lab := netns.New(t, "rw")
	v := topo.NewVRRP(lab, topo.VRRPConfig{
		ClientSide:   topo.ClientSide{Clients: 1},
		Backends:     3,
		NoKeepalived: true,
		TrackScript: func(n *topo.Node) string {
			return fmt.Sprintf("%s --addr %s --timeout 1s check ready", ctlBin, nodeAdmin)
		},
		TrackInterval: 30 * time.Second,
		ReadyWatcher: func(*topo.Node) []string {
			return []string{ctlBin, "--addr", nodeAdmin, "check", "ready"}
		},
	})
	nodes, master := startVRRPCluster(t, lab, v)

	const d = 10 * time.Second
	s := startSessions(t, lab, v.Clients[0], v.VIP, 0, 50, false, d)
	committed := waitTables(t, nodes, 50, 20*time.Second)
	killAt := time.Now()
	nodes[master.Name].d.Kill()
	// Far below the track script's 60 s (30 s × fall 2).
	newMaster := v.WaitMaster(v.Peer(master), 10*time.Second)
	t.Logf("SIGKILL of ikelbd on %s (keepalived lives); VIP on %s after %v", master.Name, newMaster.Name, time.Since(killAt).Round(time.Millisecond))
	checkSessions(t, "clients across an ikelbd kill", s.wait(t, d+time.Minute), 50, committed, backendNames(v.Backends))
}

// TestAnycastFailover: a router with an ECMP route to the VIP over three
// nodes and an L4 multipath hash, so the 500 and 4500 halves of a client
// often reach different nodes; every client must still reach exactly one
// server. One node is SIGKILLed mid-session (and its route withdrawn, as
// BFD/BGP would); committed clients keep their server.
func TestAnycastFailover(t *testing.T) {
	netns.Require(t, "ip", "nft")
	lab := netns.New(t, "ac")
	a := topo.NewAnycast(lab, topo.AnycastConfig{ClientSide: topo.ClientSide{Clients: 1, NATClients: 1}, Nodes: 3, Backends: 3})
	startResponders(t, lab, a.Backends)
	cs := clusterSpec{vip: a.VIP, backends: a.Backends, mode: "nat"}
	nodes := startNodes(t, a.Nodes, nil, cs)

	const d = 14 * time.Second
	s1 := startSessions(t, lab, a.Clients[0], a.VIP, 0, 100, false, d)
	s2 := startSessions(t, lab, a.Clients[1], a.VIP, 0, 100, true, d)
	committed := waitTables(t, nodes, 101, 20*time.Second)

	victim := leaderOf(t, nodes)
	killAt := time.Now()
	victim.d.Kill()
	a.RemoveNexthop(victim.topo)
	t.Logf("SIGKILL of %s (the leader) and its route withdrawn at %v", victim.topo.Name, killAt.Format(time.StampMilli))

	names := backendNames(a.Backends)
	checkSessions(t, "anycast own-address clients", s1.wait(t, d+time.Minute), 100, committed, names)
	checkSessions(t, "anycast clients behind one NAT", s2.wait(t, d+time.Minute), 100, committed, names)

	victim.d.Start()
	a.RestoreNexthop(victim.topo)
	victim.waitReady(60 * time.Second)
	after := waitTables(t, nodes, len(committed), 30*time.Second)
	for c, b := range committed {
		if after[c] != b {
			t.Fatalf("after failover: client %s on %s, was %s", c, after[c], b)
		}
	}
}

// TestPartition cuts one node off from its peers (nft drop in its
// namespace; clients and servers still reach it): the majority goes on
// committing new clients, the cut-off node keeps forwarding its clients
// and reports itself degraded; after healing there is one table and no
// client is split.
func TestPartition(t *testing.T) {
	netns.Require(t, "ip", "nft")
	lab := netns.New(t, "pt")
	a := topo.NewAnycast(lab, topo.AnycastConfig{ClientSide: topo.ClientSide{Clients: 1}, Nodes: 3, Backends: 3})
	startResponders(t, lab, a.Backends)
	cs := clusterSpec{vip: a.VIP, backends: a.Backends, mode: "nat"}
	nodes := startNodes(t, a.Nodes, nil, cs)

	const d = 16 * time.Second
	s1 := startSessions(t, lab, a.Clients[0], a.VIP, 0, 60, false, d)
	committed := waitTables(t, nodes, 60, 20*time.Second)

	cut := nodes[a.Nodes[2].Name]
	a.Isolate(cut.topo)
	var st *ikelbv1.GetNodeStatusResponse
	Eventually(t, 15*time.Second, func() bool {
		var err error
		st, err = cut.status()
		return err == nil && st.Degraded
	}, func() string { return fmt.Sprintf("isolated node never reported degraded: %v", st) })
	if m := cut.mustTable(); len(m) < len(committed) {
		t.Fatalf("isolated node lost affinities: %d of %d", len(m), len(committed))
	}
	// The majority commits new clients meanwhile (they also reach the cut
	// node through ECMP, which forwards them by the same hash).
	s2 := startSessions(t, lab, a.Clients[0], a.VIP, 60, 40, false, 6*time.Second)
	checkSessions(t, "new clients during the partition", s2.wait(t, time.Minute), 40, nil, backendNames(a.Backends))
	a.Heal(cut.topo)
	cut.waitReady(60 * time.Second)

	names := backendNames(a.Backends)
	checkSessions(t, "clients across the partition", s1.wait(t, d+time.Minute), 60, committed, names)
	final := waitTables(t, nodes, 100, 30*time.Second)
	for c, b := range committed {
		if final[c] != b {
			t.Fatalf("after healing: client %s on %s, was %s", c, final[c], b)
		}
	}
}
