package e2e

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ikelb/ikelb/test/netns"
)

// The stateless transparent fast path lab (two balancers, anycast-style):
//
//	c 198.51.100.101… ── pub 198.51.100.0/24 ── lb1 up0 198.51.100.1, lb2 up0 198.51.100.3
//	                                             (VIP 203.0.113.10 on both, on lo; both ikelbd, ip forwarding on)
//	lb1 lan0 10.0.0.1, lb2 lan0 10.0.0.2 ── blan 10.0.0.0/24 ── r1 10.0.0.11, r2 10.0.0.12 (ikesim responders)
//
// The client's route to the VIP goes through lb1; the backends' default
// route is lb1 at first, then flipped to lb2, which never saw a request.
// The VIP is off the client's subnet, so the client routes it via lb1 (on
// the subnet both balancers would answer ARP for it).
const fptVIP = "203.0.113.10"

// TestFastPathTransparent: a committed client's datagrams are forwarded
// by lb1's kernel (nft counter rises, the userspace listener's deliveries
// do not), the backends see the clients' own addresses and ports, replies
// reach the clients from VIP:4500, and after the backends' route is
// flipped to lb2 — a node with no affinity for these clients and no
// conntrack entry of theirs — replies keep reaching them from VIP:4500.
func TestFastPathTransparent(t *testing.T) {
	netns.Require(t, "nft")
	ikesim := IkesimBinary(t)
	_, ctl := Binaries(t)

	lab := netns.New(t, "fpt")
	c := lab.AddNS("c")
	pub, blan := lab.AddSwitch("pub"), lab.AddSwitch("blan")
	pub.Attach(c, "eth0", "198.51.100.2/24")
	c.DefaultRoute("198.51.100.1")
	var lbs []*netns.NS
	for i, up := range []string{"198.51.100.1", "198.51.100.3"} {
		lb := lab.AddNS(fmt.Sprintf("lb%d", i+1))
		pub.Attach(lb, "up0", up+"/24")
		blan.Attach(lb, "lan0", fmt.Sprintf("10.0.0.%d/24", i+1))
		lb.AddAddr("lo", fptVIP+"/32")
		lb.Forward()
		lbs = append(lbs, lb)
	}
	lb1, lb2 := lbs[0], lbs[1]
	var rs []*netns.NS
	for i, addr := range []string{"10.0.0.11", "10.0.0.12"} {
		name := fmt.Sprintf("r%d", i+1)
		r := lab.AddNS(name)
		blan.Attach(r, "eth0", addr+"/24")
		r.DefaultRoute("10.0.0.1")
		// What the backend sees: the sources of NAT-T datagrams.
		// ... and the reassembled IP-fragmented datagrams.
		r.NFT(`table ip seen {
	set sources { type ipv4_addr . inet_service; flags dynamic; size 65535; }
	counter big { }
	chain input { type filter hook input priority 0; policy accept;
		udp dport 4500 add @sources { ip saddr . udp sport }
		udp dport 4500 meta length > 2000 counter name "big"
	}
}`)
		lab.Start(r, "responder-"+name, ikesim, "responder", "--name", name, "--ike", addr+":500", "--natt", addr+":4500")
		rs = append(rs, r)
	}
	// lb1's userspace deliveries: datagrams to VIP:500/4500 that reach the
	// local listener instead of being forwarded by the kernel.
	lb1.NFT(`table ip userspace {
	chain input { type filter hook input priority 0; policy accept;
		ip daddr ` + fptVIP + ` udp dport { 500, 4500 } counter
	}
}`)

	var daemons []*Daemon
	for i, lb := range lbs {
		cfg := fastPathConfig(fmt.Sprintf("lb%d", i+1), "transparent", fptVIP, "ingress")
		daemons = append(daemons, StartDaemon(t, fmt.Sprintf("ikelbd-fpt%d", i+1), fpAdmin, cfg, "ip", "netns", "exec", lb.Name()))
	}
	var last string
	for i, lb := range lbs {
		d := daemons[i]
		Eventually(t, 20*time.Second, func() bool {
			if !d.Running() {
				t.Fatalf("ikelbd on %s exited:\n%s", lb.Name(), d.Log())
			}
			if out, err := lb.Run(ctl, "--addr", fpAdmin, "check", "ready"); err != nil {
				last = "ready: " + out
				return false
			}
			out, err := lb.Run("nft", "list", "chain", "ip", "ikelb_fast", "forward")
			last = "nft: " + out
			return err == nil && strings.Contains(out, "ip saddr set "+fptVIP)
		}, func() string { return lb.Name() + ": ikelbd not serving with the transparent fast path: " + last })
		// The kernel re-addresses the replies: the TPROXY table is gone.
		if out := lb.MustRun("nft", "list", "tables"); strings.Contains(out, "inet ikelb") {
			t.Fatalf("%s: TPROXY table still installed beside the fast path:\n%s", lb.Name(), out)
		}
	}
	userspace := func() uint64 { return nftCounter(t, lb1, "chain", "ip", "userspace", "input") }
	// Requests the kernel forwards: at ingress (the netdev stage), or in
	// the IP stack's raw-prerouting rewrite (what ingress passes on).
	ingress := func(lb *netns.NS) uint64 { return nftCounter(t, lb, "counter", "netdev", "ikelb_fast", "in_1") }
	raw := func(lb *netns.NS) uint64 { return nftCounter(t, lb, "counter", "ip", "ikelb_fast", "fwd_1") }
	fwd := func(lb *netns.NS) uint64 { return ingress(lb) + raw(lb) }
	rep := func(lb *netns.NS) uint64 { return nftCounter(t, lb, "counter", "ip", "ikelb_fast", "rep_1") }

	const clients = 20
	for i := 1; i <= clients; i++ {
		c.MustRun("ip", "addr", "add", fmt.Sprintf("198.51.100.%d/24", 100+i), "dev", "eth0")
	}
	p := lab.Start(c, "sessions", ikesim, "sessions", "--vip", fptVIP, "--clients", strconv.Itoa(clients),
		"--source-base", "198.51.100.100", "--interval", "100ms", "--duration", "12s")
	Eventually(t, 10*time.Second, func() bool {
		out, _ := lb1.Run("nft", "list", "map", "ip", "ikelb_fast", "aff_1")
		last = out
		return strings.Count(out, " : 10.0.0.1") == clients
	}, func() string { return "not every client in lb1's map: " + last })
	u1, k1 := userspace(), fwd(lb1)
	Eventually(t, 5*time.Second, func() bool { return fwd(lb1) > k1+uint64(clients)*5 },
		func() string { return fmt.Sprintf("lb1's kernel counter not rising: %d → %d", k1, fwd(lb1)) })
	u2, k2 := userspace(), fwd(lb1)
	if u2 != u1 {
		t.Fatalf("userspace deliveries rose from %d to %d while every client was in the map (kernel %d → %d)", u1, u2, k1, k2)
	}
	// Every one of these fits the MTU, is no fragment and arrives on a
	// hooked interface: the ingress stage takes them all, the IP stack's
	// rules none.
	r1, i1 := raw(lb1), ingress(lb1)
	Eventually(t, 5*time.Second, func() bool { return ingress(lb1) > i1+uint64(clients)*5 },
		func() string { return fmt.Sprintf("lb1's ingress counter not rising: %d → %d", i1, ingress(lb1)) })
	if r := raw(lb1); r != r1 {
		t.Fatalf("the IP stack's rewrite forwarded %d requests the ingress stage should have taken", r-r1)
	}
	if r := rep(lb1); r == 0 {
		t.Fatal("no reply re-addressed by lb1's kernel")
	}
	t.Logf("all %d clients in lb1's map: userspace deliveries stayed at %d while the kernel forwarded %d → %d", clients, u1, k1, k2)

	// Clients only the kernel forwards are touched (their map elements'
	// counters move with the rewrite's lookup): last-seen moves on.
	waitTouchedSince(t, lb1, ctl, "vpn", clients, time.Now())

	// Anycast: the backends now reply through lb2, which has no affinity
	// and no conntrack entry for any of these clients.
	for _, r := range rs {
		r.MustRun("ip", "route", "replace", "default", "via", "10.0.0.2")
	}
	r2a := rep(lb2)
	Eventually(t, 5*time.Second, func() bool { return rep(lb2) > r2a+uint64(clients)*5 },
		func() string { return fmt.Sprintf("lb2 re-addresses no replies: %d → %d", r2a, rep(lb2)) })

	lines := finishedSessions(t, p, clients, 40*time.Second)
	seen := map[string]string{}
	for i, r := range rs {
		seen["r"+strconv.Itoa(i+1)] = r.MustRun("nft", "list", "set", "ip", "seen", "sources")
	}
	for _, l := range lines {
		// Kept includes ReachedEnd: answered (ikesim takes answers only
		// from VIP:4500) during the last second, i.e. through lb2.
		if l.Err != "" || !l.Kept || l.Answered == 0 || l.IKEResponder != l.NATTResponder || l.Checks < 20 {
			t.Errorf("client %s: %+v", l.Client, l)
		}
		// The backend saw the client's own address and NAT-T port.
		src := strings.Replace(l.NATTSource, ":", " . ", 1)
		if !strings.Contains(seen[l.NATTResponder], src) {
			t.Errorf("%s did not see the client's own source %s:\n%s", l.NATTResponder, src, seen[l.NATTResponder])
		}
	}
	if f2 := fwd(lb2); f2 != 0 {
		t.Errorf("lb2 forwarded %d requests; the client's route is lb1", f2)
	}
	if out := lb2.MustRun("nft", "list", "map", "ip", "ikelb_fast", "aff_1"); strings.Contains(out, "198.51.100.") {
		t.Errorf("lb2 has affinities it should not need:\n%s", out)
	}
	t.Logf("after the flip lb2 re-addressed %d replies (lb1 %d); lb1 forwarded %d requests in the kernel, userspace delivered %d",
		rep(lb2), rep(lb1), fwd(lb1), userspace())

	// An IP-fragmented datagram (3,000 bytes over a 1,500 MTU) of a
	// committed client: conntrack's defrag hook reassembles it before the
	// raw rules (a non-first fragment has no UDP header to match), so the
	// kernel forwards it whole and the backend receives it.
	c.MustRun("ip", "route", "add", fptVIP+"/32", "via", "198.51.100.1", "src", lines[0].NATTSource[:strings.IndexByte(lines[0].NATTSource, ':')])
	big := func() (n uint64) {
		for _, r := range rs {
			n += nftCounter(t, r, "counter", "ip", "seen", "big")
		}
		return n
	}
	// The ingress stage leaves fragments to the IP stack.
	u3, k3, i3 := userspace(), raw(lb1), ingress(lb1)
	c.MustRun("bash", "-c", "printf '%03000d' 0 > /dev/udp/"+fptVIP+"/4500")
	Eventually(t, 5*time.Second, func() bool { return big() == 1 },
		func() string {
			return fmt.Sprintf("the fragmented datagram did not reach a backend whole (big %d, kernel %d → %d)", big(), k3, raw(lb1))
		})
	if u, k, i := userspace(), raw(lb1), ingress(lb1); u != u3 || k != k3+1 || i != i3 {
		t.Fatalf("fragmented datagram: userspace %d → %d, raw rewrite %d → %d, ingress %d → %d; want only the raw rewrite's +1", u3, u, k3, k, i3, i)
	}

	// The admin API counts the kernel's packets with the service's (as of
	// the fast path's last poll, every second).
	kNow := fwd(lb1)
	Eventually(t, 5*time.Second, func() bool {
		out, err := lb1.Run(ctl, "--addr", fpAdmin, "-o", "json", "counters", "vpn")
		last = out
		var resp struct {
			Services []struct {
				Packets json.RawMessage `json:"packets"`
			} `json:"services"`
		}
		if err != nil || json.Unmarshal([]byte(out), &resp) != nil || len(resp.Services) != 1 {
			return false
		}
		total, _ := strconv.ParseUint(strings.Trim(string(resp.Services[0].Packets), `"`), 10, 64)
		return total >= kNow
	}, func() string { return fmt.Sprintf("admin counters below the kernel's %d: %s", kNow, last) })

	for _, d := range daemons {
		d.Stop()
	}
	for _, lb := range lbs {
		if out, err := lb.Run("nft", "list", "tables"); err != nil || strings.Contains(out, "ikelb") {
			t.Fatalf("%s after stop: %v %s", lb.Name(), err, out)
		}
	}
}
