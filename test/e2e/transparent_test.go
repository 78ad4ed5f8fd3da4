package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ikelb/ikelb/test/netns"
	"github.com/ikelb/ikelb/test/swan"
)

// The lab of the forwarding-mode tests:
//
//	c1, c2 ── clan 192.168.10.0/24 ── nat (masquerade, fully random ports) 198.51.100.2
//	c3 198.51.100.3, c4 198.51.100.4 (their own public addresses)
//	nat, c3, c4 ── pub 198.51.100.0/24 ── lb up0 198.51.100.1 + VIP 198.51.100.10 (ikelbd)
//	lb lan0 10.0.0.1 ── blan 10.0.0.0/24 ── r1 10.0.0.11, r2 .12, r3 .13
//	                                       (strongSwan responders, default route via lb)
//
// lb does not forward IP (ip_forward stays 0): whatever reaches a client
// was sent by ikelbd.
const (
	tpVIP       = "198.51.100.10"
	tpLB        = "198.51.100.1"
	tpLBInside  = "10.0.0.1"
	tpNATPublic = "198.51.100.2"
	tpAdmin     = "127.0.0.1:7450" // inside lb's own namespace: no other process can hold it
)

// tpConfig is the ikelbd.yaml of the single balancer node in lb: one
// service on the VIP in mode, no health checks, the given backends.
func tpConfig(mode string, backends ...string) string {
	return fmt.Sprintf(`node: lb1
data_dir: ./data
admin_address: %s
metrics_address: ""
log_level: info
raft:
  bind_address: 127.0.0.1:0
services:
  - name: vpn
    vip: %s
    forwarding_mode: %s
    persistence_timeout: 1h
    health_check: {type: none}
    backends: [%s]
`, tpAdmin, tpVIP, mode, strings.Join(backends, ", "))
}

type tpClient struct {
	ns     *netns.NS
	public string // the address the balancer sees
	charon *swan.Charon
}

type tpLab struct {
	lab        *netns.Lab
	lb         *netns.NS
	clients    []*tpClient
	responders []*swan.Charon
	daemon     *Daemon
	ctlBin     string
}

func buildTPLab(t *testing.T, ca *swan.CA, mode string) *tpLab {
	t.Helper()
	lab := netns.New(t, "tp")
	tl := &tpLab{lab: lab}
	nat, lb := lab.AddNS("nat"), lab.AddNS("lb")
	tl.lb = lb
	clan, pub, blan := lab.AddSwitch("clan"), lab.AddSwitch("pub"), lab.AddSwitch("blan")

	clan.Attach(nat, "in0", "192.168.10.1/24")
	pub.Attach(nat, "out0", tpNATPublic+"/24")
	nat.DefaultRoute(tpLB)
	nat.Masquerade("out0", "fully-random")
	for i := range 2 {
		c := lab.AddNS(fmt.Sprintf("c%d", i+1))
		clan.Attach(c, "eth0", fmt.Sprintf("192.168.10.%d/24", 10+i))
		c.DefaultRoute("192.168.10.1")
		tl.clients = append(tl.clients, &tpClient{ns: c, public: tpNATPublic})
	}
	for i := 2; i < 4; i++ {
		c := lab.AddNS(fmt.Sprintf("c%d", i+1))
		addr := fmt.Sprintf("198.51.100.%d", i+1)
		pub.Attach(c, "eth0", addr+"/24")
		c.DefaultRoute(tpLB)
		tl.clients = append(tl.clients, &tpClient{ns: c, public: addr})
	}
	pub.Attach(lb, "up0", tpLB+"/24")
	lb.AddAddr("up0", tpVIP+"/32")
	blan.Attach(lb, "lan0", tpLBInside+"/24")
	lb.RPFilterOff()
	lb.Sysctl("net.ipv4.ip_forward", "0")

	var backends []string
	for i := range 3 {
		r := lab.AddNS(fmt.Sprintf("r%d", i+1))
		addr := fmt.Sprintf("10.0.0.%d", 11+i)
		blan.Attach(r, "eth0", addr+"/24")
		r.DefaultRoute(tpLBInside)
		backends = append(backends, "{address: "+addr+"}")
		tl.responders = append(tl.responders, swan.StartResponder(t, lab, r, swan.Options{
			CA: ca, Name: fmt.Sprintf("r%d.ikelb.test", i+1),
			Pool:         fmt.Sprintf("10.201.%d.0/24", i+1),
			InnerAddr:    fmt.Sprintf("10.250.0.%d", 11+i),
			FragmentSize: 1000, // RSA 2048 certificates: IKE_AUTH ~1.4 KB, fragmented
		}))
	}
	for i, c := range tl.clients {
		c.charon = swan.StartInitiator(t, lab, c.ns, swan.Options{
			CA: ca, Name: fmt.Sprintf("c%d.ikelb.test", i+1), Remote: tpVIP, FragmentSize: 1000,
		})
	}

	_, tl.ctlBin = Binaries(t)
	cfg := tpConfig(mode, backends...)
	tl.daemon = StartDaemon(t, "ikelbd-"+mode, tpAdmin, cfg, "ip", "netns", "exec", lb.Name())
	return tl
}

// ctl runs ikelbctl inside lb's namespace, where the admin API listens.
func (tl *tpLab) ctl(args ...string) (string, error) {
	return tl.lb.Run(append([]string{tl.ctlBin, "--addr", tpAdmin}, args...)...)
}

// waitServing waits until ikelbd is ready and listens on VIP:500 and
// VIP:4500 (and, in transparent mode, has installed its nft table).
func (tl *tpLab) waitServing(t *testing.T, mode string) {
	t.Helper()
	var last string
	Eventually(t, 20*time.Second, func() bool {
		if !tl.daemon.Running() {
			t.Fatalf("ikelbd exited:\n%s", tl.daemon.Log())
		}
		if out, err := tl.ctl("check", "ready"); err != nil {
			last = "ready: " + out
			return false
		}
		out, err := tl.lb.Run("ss", "-Hulnp")
		if err != nil || !strings.Contains(out, tpVIP+":500 ") || !strings.Contains(out, tpVIP+":4500 ") {
			last = "listeners: " + out
			return false
		}
		if mode == "transparent" {
			if out, err := tl.lb.Run("nft", "list", "table", "inet", "ikelb"); err != nil {
				last = "nft: " + out
				return false
			}
		}
		return true
	}, func() string { return "ikelbd not serving: " + last })
}

// TestTransparentAndNATWithStrongSwan runs real strongSwan clients through
// ikelbd to three real strongSwan responders, once per forwarding mode:
// every client's IKE SA (IKE_AUTH fragmented) and CHILD SA come up, a ping
// crosses every tunnel, clients sharing a public address share a
// responder, and the responders see the client's public address and port
// (transparent) or the balancer's address (nat).
func TestTransparentAndNATWithStrongSwan(t *testing.T) {
	netns.Require(t, "nft", "swanctl", "pki", "ping", "ss")
	start := time.Now()
	ca := swan.NewCA(t, swan.Bits(2048))
	ca.Prepare(7)
	t.Logf("timing: CA and 7 RSA 2048 keys: %v", time.Since(start).Round(time.Millisecond))
	Binaries(t)

	for _, mode := range []string{"nat", "transparent"} {
		t.Run(mode, func(t *testing.T) { testModeWithStrongSwan(t, ca, mode) })
	}
}

func testModeWithStrongSwan(t *testing.T, ca *swan.CA, mode string) {
	begin := time.Now()
	phase := func(what string, since time.Time) {
		t.Logf("timing: %s: %s: %v", mode, what, time.Since(since).Round(time.Millisecond))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	start := time.Now()
	tl := buildTPLab(t, ca, mode)
	tl.waitServing(t, mode)
	phase("lab, 7 charons and ikelbd up", start)

	start = time.Now()
	errs := make([]error, len(tl.clients))
	var wg sync.WaitGroup
	for i, c := range tl.clients {
		wg.Go(func() { errs[i] = c.charon.Initiate(ctx) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("client c%d: %v", i+1, err)
		}
	}
	phase("4 IKE+CHILD SAs initiated concurrently through the balancer", start)

	// Which responder has which client, and what it sees of it.
	type seen struct {
		resp *swan.Charon
		sa   swan.IKESA
	}
	byClient := map[string]seen{}
	for _, r := range tl.responders {
		sas, err := r.ListSAs()
		if err != nil {
			t.Fatal(err)
		}
		for _, sa := range sas {
			if !sa.Up() {
				continue
			}
			if prev, dup := byClient[sa.RemoteID]; dup {
				t.Errorf("%s has SAs on %s and %s", sa.RemoteID, prev.resp.Name(), r.Name())
			}
			byClient[sa.RemoteID] = seen{r, sa}
		}
	}
	ports := map[netip.AddrPort]string{}
	for _, c := range tl.clients {
		s, ok := byClient[c.charon.Name()]
		if !ok {
			t.Fatalf("no responder has an established SA with %s: %v", c.charon.Name(), byClient)
		}
		want := c.public
		if mode == "nat" {
			want = tpLBInside
		}
		if got := s.sa.Remote.Addr().String(); got != want {
			t.Errorf("%s: %s sees the client at %s, want %s (%s mode)", mode, s.resp.Name(), s.sa.Remote, want, mode)
		}
		if other, dup := ports[s.sa.Remote]; dup {
			t.Errorf("%s and %s reach the responders as the same peer %s", other, c.charon.Name(), s.sa.Remote)
		}
		ports[s.sa.Remote] = c.charon.Name()
		if s.sa.Local.Port() != 4500 || !s.sa.Children[0].Encap {
			t.Errorf("%s: SA with %s runs %s <-> %s encap=%v, want NAT-T on 4500", s.resp.Name(), c.charon.Name(), s.sa.Local, s.sa.Remote, s.sa.Children[0].Encap)
		}
		t.Logf("%s: %s (public %s) → %s, which sees %s", mode, c.charon.Name(), c.public, s.resp.Name(), s.sa.Remote)
	}
	// Affinity is by client address: the two clients behind one NAT share a responder.
	if a, b := byClient[tl.clients[0].charon.Name()].resp, byClient[tl.clients[1].charon.Name()].resp; a != b {
		t.Errorf("clients behind one NAT address went to %s and %s", a.Name(), b.Name())
	}

	start = time.Now()
	for _, c := range tl.clients {
		r := byClient[c.charon.Name()].resp
		if err := c.charon.Ping(ctx, r.Options().InnerAddr); err != nil {
			t.Fatal(err)
		}
	}
	phase("a ping through each of the 4 tunnels", start)
	for _, c := range tl.clients {
		s := byClient[c.charon.Name()]
		sas, err := s.resp.ListSAs()
		if err != nil {
			t.Fatal(err)
		}
		for _, sa := range sas {
			if sa.RemoteID == c.charon.Name() && sa.Up() {
				if ch := sa.Children[0]; ch.PacketsIn == 0 || ch.PacketsOut == 0 {
					t.Errorf("%s: CHILD SA with %s: packets in/out %d/%d", s.resp.Name(), c.charon.Name(), ch.PacketsIn, ch.PacketsOut)
				}
			}
		}
	}

	// IKE fragmentation both ways, through the balancer.
	for _, c := range tl.clients {
		if c.charon.CountLog("splitting IKE message") < 1 || c.charon.CountLog("reassembled fragmented IKE message") < 1 {
			t.Errorf("%s: IKE_AUTH not fragmented both ways", c.charon.Name())
		}
	}
	// Replies came back through ikelbd (in transparent mode: diverted by
	// TPROXY to the reply socket, since lb does not forward).
	out, err := tl.ctl("counters")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: ikelbctl counters:\n%s", mode, out)
	for line := range strings.Lines(out) {
		if f := strings.Fields(line); len(f) >= 5 && f[0] == "vpn" && f[1] == "*" && (f[4] == "0" || f[2] == "0") {
			t.Errorf("no packets or no replies through ikelbd: %s", line)
		}
	}

	if mode == "transparent" {
		// A clean exit removes the host setup.
		start = time.Now()
		tl.daemon.Stop()
		if out, err := tl.lb.Run("nft", "list", "table", "inet", "ikelb"); err == nil {
			t.Errorf("nft table left after a clean exit:\n%s", out)
		}
		if out, _ := tl.lb.Run("ip", "rule", "show"); strings.Contains(out, "lookup 4500") {
			t.Errorf("ip rule left after a clean exit:\n%s", out)
		}
		phase("clean exit removed the host setup", start)
	}
	phase("whole subtest before cleanup", begin)
}
