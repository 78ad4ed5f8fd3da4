package e2e

import (
	"bufio"
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ikelb/ikelb/test/netns"
	"github.com/ikelb/ikelb/test/swan"
	"github.com/ikelb/ikelb/test/topo"
)

// The strongSwan failover lab is topo's VRRP shape (see topo.VRRP):
//
//	c1 203.0.113.10 (own address) ──┐
//	h1 192.168.0.10 ── nat 203.0.113.2 (masquerade, fully random ports)
//	    ── rt ── edge 10.0.0.0/24: lb1 .11, lb2 .12, lbw .13 (witness), VIP .100
//	    lb1/lb2 back0 10.1.0.11/.12, floating gateway 10.1.0.1
//	    ── back 10.1.0.0/24: be1 .21, be2 .22, be3 .23 (strongSwan responders,
//	       default route via 10.1.0.1)
//
// c1 and h1 run strongSwan initiators with DPD; keepalived moves the VIP and
// the gateway together, with `ikelbctl check ready` as its track script.
// In nat mode the service's snat_address is the floating gateway, so the
// responders see the same peer address from either balancer.

const (
	sfDuration  = 10 * time.Second        // of the pings across the failover (transparent)
	sfInterval  = 150 * time.Millisecond  // between pings
	sfKillAfter = 2500 * time.Millisecond // into the pings
)

// sfSpec is the service of the failover test. Health checks are off: IKE_SA_INIT
// probes would leave half-open SAs on the responders and spoil the check that
// no new SA appears. In nat mode the SNAT address is the floating gateway: it
// moves with the VIP, so the backends see one peer address whichever node
// forwards.
func sfSpec(v *topo.VRRP, mode string) clusterSpec {
	cs := clusterSpec{vip: v.VIP, backends: v.Backends, mode: mode, health: "{type: none}"}
	if mode == "nat" {
		cs.snat = v.Gateway
	}
	return cs
}

// sfClient is one strongSwan initiator and what the test learned of it.
type sfClient struct {
	node   *topo.Client
	charon *swan.Charon
	resp   *swan.Charon // the responder that holds its SA
	before swan.IKESA   // the responder's view of the SA before the failover
	own    swan.IKESA   // the initiator's view before the failover
}

// sfPing is the outcome of one ping run through a tunnel.
type sfPing struct {
	sent, received int
	replies        []time.Time
	maxGap         time.Duration // longest time between two replies (or start and first reply)
	gapEnd         time.Time     // the reply that ended the longest gap
	out            string
}

// sfPingRun pings dst from the initiator's virtual IP every sfInterval for d
// (ping -D: each reply is timestamped) and parses the replies.
func sfPingRun(ctx context.Context, c *swan.Charon, dst string, d time.Duration) (sfPing, error) {
	vip, err := c.VirtualIP()
	if err != nil {
		return sfPing{}, err
	}
	start := time.Now()
	out, _ := c.NS().RunContext(ctx, "ping", "-D", "-n", "-i", strconv.FormatFloat(sfInterval.Seconds(), 'f', 3, 64),
		"-W", "1", "-w", strconv.Itoa(int(d/time.Second)), "-I", vip.String(), dst)
	p := sfPing{out: out}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if strings.Contains(line, "packets transmitted") {
			f := strings.Fields(line)
			if len(f) >= 4 {
				p.sent, _ = strconv.Atoi(f[0])
				p.received, _ = strconv.Atoi(f[3])
			}
			continue
		}
		if !strings.HasPrefix(line, "[") || !strings.Contains(line, "bytes from") {
			continue
		}
		ts, _, ok := strings.Cut(line[1:], "]")
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(ts, 64)
		if err != nil {
			continue
		}
		p.replies = append(p.replies, time.Unix(0, int64(f*1e9)))
	}
	prev := start
	for _, r := range p.replies {
		if g := r.Sub(prev); g > p.maxGap {
			p.maxGap, p.gapEnd = g, r
		}
		prev = r
	}
	if len(p.replies) == 0 {
		return p, fmt.Errorf("no ping replies from %s through %s's tunnel:\n%s", dst, c.Name(), out)
	}
	return p, nil
}

// sfFindSAs maps each initiator's identity to the responder that has an
// established IKE SA with it, failing on duplicates; it also returns every
// IKE SA (in any state) per responder.
func sfFindSAs(t *testing.T, responders []*swan.Charon) (map[string]*swan.Charon, map[string]swan.IKESA, map[*swan.Charon][]swan.IKESA) {
	t.Helper()
	where := map[string]*swan.Charon{}
	sas := map[string]swan.IKESA{}
	all := map[*swan.Charon][]swan.IKESA{}
	for _, r := range responders {
		list, err := r.ListSAs()
		if err != nil {
			t.Fatal(err)
		}
		all[r] = list
		for _, sa := range list {
			if prev, dup := where[sa.RemoteID]; dup {
				t.Errorf("%s has IKE SAs on %s and %s", sa.RemoteID, prev.Name(), r.Name())
			}
			where[sa.RemoteID] = r
			sas[sa.RemoteID] = sa
		}
	}
	return where, sas, all
}

// sfInstalled returns the SA's installed CHILD SAs (a rekeyed one lingers
// a few seconds in another state).
func sfInstalled(sa swan.IKESA) []swan.ChildSA {
	var in []swan.ChildSA
	for _, c := range sa.Children {
		if c.State == "INSTALLED" {
			in = append(in, c)
		}
	}
	return in
}

// sfSameSA reports how b differs from a: identity, SPIs, state and, if
// sameChild, the installed CHILD SA's SPIs (else it must be one installed
// CHILD SA, possibly rekeyed).
func sfSameSA(a, b swan.IKESA, sameChild bool) string {
	var d []string
	if a.UniqueID != b.UniqueID {
		d = append(d, fmt.Sprintf("unique id %d → %d", a.UniqueID, b.UniqueID))
	}
	if a.InitiatorSPI != b.InitiatorSPI || a.ResponderSPI != b.ResponderSPI {
		d = append(d, fmt.Sprintf("SPIs %s_i/%s_r → %s_i/%s_r", a.InitiatorSPI, a.ResponderSPI, b.InitiatorSPI, b.ResponderSPI))
	}
	if !b.Up() {
		d = append(d, "state "+b.State+", not established with an installed CHILD SA")
	}
	ca, cb := sfInstalled(a), sfInstalled(b)
	switch {
	case len(cb) != 1:
		d = append(d, fmt.Sprintf("%d installed CHILD SAs, want 1", len(cb)))
	case sameChild && len(ca) == 1 && (ca[0].SPIIn != cb[0].SPIIn || ca[0].SPIOut != cb[0].SPIOut):
		d = append(d, fmt.Sprintf("CHILD SA SPIs %s/%s → %s/%s", ca[0].SPIIn, ca[0].SPIOut, cb[0].SPIIn, cb[0].SPIOut))
	}
	return strings.Join(d, "; ")
}

// sfChildSPIs describes the installed CHILD SA's SPIs.
func sfChildSPIs(sa swan.IKESA) string {
	var s []string
	for _, c := range sfInstalled(sa) {
		s = append(s, c.SPIIn+"_i/"+c.SPIOut+"_o")
	}
	return strings.Join(s, ",")
}

// sfCountSince counts the lines of a charon log at or after offset that
// contain substr.
func sfCountSince(log string, offset int, substr string) int {
	if offset > len(log) {
		return 0
	}
	return strings.Count(log[offset:], substr)
}

// TestStrongSwanFailover: an HA pair (keepalived, two voters and a witness)
// in front of three strongSwan responders; two strongSwan initiators with
// DPD, one behind a NAT and one with its own address, keep pinging through
// their tunnels while the VRRP master (ikelbd and keepalived) is SIGKILLed.
// The pings go on, DPD keeps the IKE SAs up, and every client's IKE and
// CHILD SAs stay on the same responder with the same SPIs: no new IKE SA
// anywhere. In transparent mode the responder goes on seeing the client's
// public address and port; in nat mode the floating snat_address.
func TestStrongSwanFailover(t *testing.T) {
	netns.Require(t, "ip", "nft", "keepalived", "swanctl", "pki", "ping")
	ca := swan.NewCA(t, swan.Bits(2048))
	ca.Prepare(5)
	Binaries(t)
	for _, mode := range []string{"transparent", "nat"} {
		t.Run(mode, func(t *testing.T) { testStrongSwanFailover(t, ca, mode) })
	}
}

func testStrongSwanFailover(t *testing.T, ca *swan.CA, mode string) {
	begin := time.Now()
	phase := func(what string, since time.Time) {
		t.Logf("timing: %s: %s: %v", mode, what, time.Since(since).Round(time.Millisecond))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	_, ctlBin := Binaries(t)

	lab := netns.New(t, "sf")
	v := topo.NewVRRP(lab, topo.VRRPConfig{
		ClientSide:   topo.ClientSide{Clients: 1, NATClients: 1, NATFlags: []string{"fully-random"}},
		Backends:     3,
		NoKeepalived: true,
		TrackScript: func(*topo.Node) string {
			return fmt.Sprintf("%s --addr %s --timeout 1s check ready", ctlBin, nodeAdmin)
		},
	})
	var responders []*swan.Charon
	for i, b := range v.Backends {
		responders = append(responders, swan.StartResponder(t, lab, b.NS, swan.Options{
			CA: ca, Name: fmt.Sprintf("r%d.ikelb.test", i+1),
			Pool:         fmt.Sprintf("10.201.%d.0/24", i+1),
			InnerAddr:    fmt.Sprintf("10.250.0.%d", 21+i),
			FragmentSize: 1000, // RSA 2048: IKE_AUTH ~1.4 KB, fragmented
		}))
	}
	var clients []*sfClient
	for _, c := range v.Clients {
		clients = append(clients, &sfClient{node: c, charon: swan.StartInitiator(t, lab, c.NS, swan.Options{
			CA: ca, Name: c.Name + ".ikelb.test", Remote: v.VIP.String(), FragmentSize: 1000,
			DPD: time.Second,
		})})
	}

	// ikelbd on the three nodes, then keepalived (the track script needs
	// ikelbd ready).
	start := time.Now()
	nodes := map[string]*lbNode{}
	for _, n := range v.Nodes() {
		role := "voter"
		if n == v.Witness {
			role = "witness"
		}
		nodes[n.Name] = &lbNode{t: t, topo: n, role: role,
			d: StartDaemon(t, fmt.Sprintf("%s-%s", n.Name, mode), nodeAdmin, nodeConfig(n, role, v.Nodes(), sfSpec(v, mode)), n.Exec()...)}
	}
	for _, n := range nodes {
		n.waitReady(60 * time.Second)
	}
	v.StartKeepalived(v.LB1)
	master := v.WaitMaster(nil, 15*time.Second)
	v.StartKeepalived(v.LB2)
	phase("lab, 5 charons, 3 ikelbd and the VRRP master up", start)

	// Both tunnels up, through the master.
	start = time.Now()
	errs := make([]error, len(clients))
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Go(func() { errs[i] = c.charon.Initiate(ctx) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("%s: %v", clients[i].charon.Name(), err)
		}
	}
	phase("2 IKE+CHILD SAs through "+master.Name, start)

	where, sas, _ := sfFindSAs(t, responders)
	for _, c := range clients {
		c.resp = where[c.charon.Name()]
		if c.resp == nil {
			t.Fatalf("no responder has an IKE SA with %s", c.charon.Name())
		}
		c.before = sas[c.charon.Name()]
		own, err := c.charon.ListSAs()
		if err != nil {
			t.Fatal(err)
		}
		if len(own) != 1 || !own[0].Up() {
			t.Fatalf("%s: want one established IKE SA, have %+v", c.charon.Name(), own)
		}
		c.own = own[0]
		want := c.node.Public
		if mode == "nat" {
			want = v.Gateway
		}
		if got := c.before.Remote.Addr(); got != want {
			t.Fatalf("%s: %s sees the client at %s, want %s", mode, c.resp.Name(), c.before.Remote, want)
		}
		if err := c.charon.Ping(ctx, c.resp.Options().InnerAddr); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %s (public %s) → %s, which sees it at %s (SPIs %s_i %s_r)", mode, c.charon.Name(), c.node.Public,
			c.resp.Name(), c.before.Remote, c.before.InitiatorSPI, c.before.ResponderSPI)
	}
	// The clients' affinities are committed on every node before the kill.
	committed := waitTables(t, nodes, len(clients), 20*time.Second)
	t.Logf("%s: committed affinities: %v", mode, committed)

	// A session that has lived a while has had DPD exchanges. (Had the new
	// node shown the responder a new source port, strongSwan's initiator
	// would notice the changed NAT mapping only against an earlier DPD's
	// NAT-D hashes and follow with a MOBIKE update; ikelb keeps the port, and
	// the test checks that no MOBIKE update happens.)
	start = time.Now()
	Eventually(t, 10*time.Second, func() bool {
		for _, c := range clients {
			if c.charon.CountLog("parsed INFORMATIONAL response") < 1 {
				return false
			}
		}
		return true
	}, func() string { return "no DPD exchange before the failover" })
	phase("a DPD exchange per client before the failover", start)

	// Pings through both tunnels across the failover.
	logOff := map[*swan.Charon]int{}
	for _, c := range clients {
		logOff[c.charon] = len(c.charon.Log())
	}
	dur := sfDuration
	pings := make([]sfPing, len(clients))
	pingErrs := make([]error, len(clients))
	for i, c := range clients {
		wg.Go(func() {
			pings[i], pingErrs[i] = sfPingRun(ctx, c.charon, c.resp.Options().InnerAddr, dur)
		})
	}
	// The kill comes mid-session, at a known time into the pings.
	pingStart := time.Now()
	<-time.After(sfKillAfter)
	killAt := time.Now()
	nodes[master.Name].d.Kill()
	v.KillKeepalived(master)
	v.DropFloating(master)
	newMaster := v.WaitMaster(v.Peer(master), 10*time.Second)
	moved := time.Since(killAt)
	t.Logf("%s: SIGKILL of %s's ikelbd and keepalived; VIP and gateway on %s after %v", mode, master.Name, newMaster.Name, moved.Round(time.Millisecond))
	killOff := map[*swan.Charon]int{}
	for _, c := range clients {
		killOff[c.charon] = len(c.charon.Log())
	}
	wg.Wait()
	phase("pings across the failover", pingStart)

	var worst time.Duration
	for i, c := range clients {
		p := pings[i]
		if pingErrs[i] != nil {
			t.Errorf("%s", pingErrs[i])
			continue
		}
		last := p.replies[len(p.replies)-1]
		after := 0
		for _, r := range p.replies {
			if r.After(killAt) {
				after++
			}
		}
		t.Logf("%s: %s: %d/%d pings answered, %d after the kill; longest gap %v (ended %v after the kill)",
			mode, c.charon.Name(), p.received, p.sent, after, p.maxGap.Round(time.Millisecond), p.gapEnd.Sub(killAt).Round(time.Millisecond))
		worst = max(worst, p.maxGap)
		if after == 0 || last.Before(killAt.Add(dur-sfKillAfter-2*time.Second)) {
			t.Errorf("%s: pings through the tunnel did not resume after the failover (last reply %v after the kill)\n%s",
				c.charon.Name(), last.Sub(killAt).Round(time.Millisecond), p.out)
		}
	}
	t.Logf("%s: longest ping gap across the failover: %v (VIP moved in %v)", mode, worst.Round(time.Millisecond), moved.Round(time.Millisecond))

	// DPD goes on through the new master: with the pings over, at least
	// two DPD requests per client, each answered.
	idleOff := map[*swan.Charon]int{}
	for _, c := range clients {
		idleOff[c.charon] = len(c.charon.Log())
	}
	start = time.Now()
	Eventually(t, 15*time.Second, func() bool {
		for _, c := range clients {
			l := c.charon.Log()
			if sfCountSince(l, idleOff[c.charon], "sending DPD request") < 2 || sfCountSince(l, idleOff[c.charon], "parsed INFORMATIONAL response") < 2 {
				return false
			}
		}
		return true
	}, func() string {
		var s []string
		for _, c := range clients {
			l := c.charon.Log()
			s = append(s, fmt.Sprintf("%s: %d DPD requests, %d INFORMATIONAL responses since the pings ended", c.charon.Name(),
				sfCountSince(l, idleOff[c.charon], "sending DPD request"), sfCountSince(l, idleOff[c.charon], "parsed INFORMATIONAL response")))
		}
		return "DPD did not go on after the failover: " + strings.Join(s, "; ")
	})
	phase("2 DPD exchanges per client after the failover", start)
	for _, c := range clients {
		l := c.charon.Log()
		t.Logf("%s: %s since the pings began: %d DPD requests, %d INFORMATIONAL responses, %d retransmits; since the kill: %d/%d/%d",
			mode, c.charon.Name(),
			sfCountSince(l, logOff[c.charon], "sending DPD request"), sfCountSince(l, logOff[c.charon], "parsed INFORMATIONAL response"),
			sfCountSince(l, logOff[c.charon], "retransmit"),
			sfCountSince(l, killOff[c.charon], "sending DPD request"), sfCountSince(l, killOff[c.charon], "parsed INFORMATIONAL response"),
			sfCountSince(l, killOff[c.charon], "retransmit"))
	}

	// Every client's SA is still on its responder, the same SA; no other
	// IKE SA anywhere.
	where, sas, all := sfFindSAs(t, responders)
	for _, c := range clients {
		name := c.charon.Name()
		if where[name] != c.resp {
			t.Errorf("%s: IKE SA now on %v, was on %s", name, where[name], c.resp.Name())
			continue
		}
		after := sas[name]
		// In both modes the responder must see the same peer after the
		// failover: the client's own address and port (transparent), or the
		// floating SNAT address and the port ikelb derives from the client
		// flow on every node (nat) — so the CHILD SA is untouched too.
		if d := sfSameSA(c.before, after, true); d != "" {
			t.Errorf("%s: the SA on %s changed: %s", name, c.resp.Name(), d)
		}
		if after.Remote != c.before.Remote {
			t.Errorf("%s: %s sees the client at %s, was %s", name, c.resp.Name(), after.Remote, c.before.Remote)
		}
		if mode == "nat" && after.Remote.Addr() != v.Gateway {
			t.Errorf("%s: %s sees the client at %s, want the SNAT address %s", name, c.resp.Name(), after.Remote, v.Gateway)
		}
		t.Logf("%s: %s still on %s (same IKE SA #%d, %s_i %s_r); the responder saw it at %s before, %s after; CHILD SA %s before, %s after; %d MOBIKE updates",
			mode, name, c.resp.Name(), after.UniqueID, after.InitiatorSPI, after.ResponderSPI, c.before.Remote, after.Remote,
			sfChildSPIs(c.before), sfChildSPIs(after), c.charon.CountLog("initiating MOBIKE update"))
		if n := c.charon.CountLog("initiating MOBIKE update"); n != 0 {
			t.Errorf("%s: %d MOBIKE updates: the responder saw a new peer address", name, n)
		}
		own, err := c.charon.ListSAs()
		if err != nil {
			t.Fatal(err)
		}
		if len(own) != 1 {
			t.Errorf("%s: %d IKE SAs, want 1: %+v", name, len(own), own)
		} else if d := sfSameSA(c.own, own[0], true); d != "" {
			t.Errorf("%s: its own SA changed: %s", name, d)
		}
		if n := c.charon.CountLog("initiating IKE_SA"); n != 1 {
			t.Errorf("%s: initiated %d IKE SAs, want 1", name, n)
		}
	}
	for r, list := range all {
		for _, sa := range list {
			if sa.State != "ESTABLISHED" {
				t.Errorf("%s: IKE SA with %s in state %s", r.Name(), sa.RemoteID, sa.State)
			}
		}
	}
	if len(where) != len(clients) {
		t.Errorf("%d clients have IKE SAs on the responders, want %d: %v", len(where), len(clients), where)
	}
	phase("whole subtest before cleanup", begin)
}
