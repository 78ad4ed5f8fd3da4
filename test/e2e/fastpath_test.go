package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	"github.com/ikelb/ikelb/test/netns"
)

// The fast path lab:
//
//	c 198.51.100.2 (+ .101….) ── up0 198.51.100.1 + VIP 198.51.100.10 lb (ikelbd, ip forwarding on)
//	lb lan0 10.0.0.1 ── blan 10.0.0.0/24 ── r1 10.0.0.11, r2 10.0.0.12 (ikesim responders)
const (
	fpVIP   = "198.51.100.10"
	fpAdmin = "127.0.0.1:7450" // inside lb's namespace
)

var nftPackets = regexp.MustCompile(`packets (\d+) bytes (\d+)`)

// nftCounter reads a named counter (or the first counter of a chain).
func nftCounter(t *testing.T, ns *netns.NS, args ...string) uint64 {
	t.Helper()
	out, err := ns.Run(append([]string{"nft", "list"}, args...)...)
	if err != nil {
		t.Fatalf("nft list %v: %v %s", args, err, out)
	}
	m := nftPackets.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no counter in nft list %v:\n%s", args, out)
	}
	n, _ := strconv.ParseUint(m[1], 10, 64)
	return n
}

// TestFastPathNAT runs ikesim clients through ikelbd in nat mode with the
// kernel fast path on: a new client's first packets go through userspace;
// once its binding commits, the kernel forwards it (the userspace
// listener's deliveries stop rising while the nft counter rises), replies
// come back from VIP:port, the backends see the clients' own NAT-T source
// ports (masquerade kept them), and disabling a backend sends its clients
// back through userspace to be re-picked.
func TestFastPathNAT(t *testing.T) {
	netns.Require(t, "nft", "ss")
	ikesim := IkesimBinary(t)
	_, ctl := Binaries(t)
	fl := newFastPathLab(t, "fp", "conntrack", `table ip seen {
	set sports { type inet_service; flags dynamic; }
	chain input { type filter hook input priority 0; policy accept;
		udp dport 4500 add @sports { udp sport }
	}
}`, "ikelb_fast aff_1")
	lab, c, lb, rs, d, ctlRun := fl.lab, fl.c, fl.lb, fl.rs, fl.d, fl.ctl
	var last string
	userspace := func() uint64 { return nftCounter(t, lb, "chain", "ip", "userspace", "input") }
	// What the kernel forwards (nat mode evaluates no rule of its own per
	// packet: the test counts in a forward chain of its own).
	lb.NFT(`table ip kernel {
	counter requests { }
	counter replies { }
	chain forward { type filter hook forward priority 0; policy accept;
		ip daddr { 10.0.0.11, 10.0.0.12 } udp dport { 500, 4500 } counter name "requests"
		ip saddr { 10.0.0.11, 10.0.0.12 } udp sport { 500, 4500 } counter name "replies"
	}
}`)
	kernel := func() uint64 { return nftCounter(t, lb, "counter", "ip", "kernel", "requests") }
	kernelReplies := func() uint64 { return nftCounter(t, lb, "counter", "ip", "kernel", "replies") }

	// 20 clients, each with its own address, for 14 s (a datagram every
	// 100 ms each after connecting).
	const clients = 20
	for i := 1; i <= clients; i++ {
		c.MustRun("ip", "addr", "add", fmt.Sprintf("198.51.100.%d/24", 100+i), "dev", "eth0")
	}
	p := lab.Start(c, "sessions", ikesim, "sessions", "--vip", fpVIP, "--clients", strconv.Itoa(clients),
		"--source-base", "198.51.100.100", "--interval", "100ms", "--duration", "14s")
	// Once every client is in the map, userspace sees nothing more of them.
	Eventually(t, 10*time.Second, func() bool {
		out, _ := lb.Run("nft", "list", "map", "ip", "ikelb_fast", "aff_1")
		last = out
		return strings.Count(out, " : 10.0.0.1") == clients
	}, func() string { return "not every client in the map: " + last })
	// Their datagrams still reach the listener through the conntrack
	// entries their first ones made, until the engine's sweep (every
	// second) hands each flow over and its entry is deleted: then the
	// kernel carries everything and userspace sees nothing more.
	var u1, k1, u2, k2 uint64
	Eventually(t, 10*time.Second, func() bool {
		u1, k1 = userspace(), kernel()
		time.Sleep(time.Second) // a window of 10 datagrams per client
		u2, k2 = userspace(), kernel()
		return u2 == u1 && k2 >= k1+uint64(clients)*5
	}, func() string {
		return fmt.Sprintf("not handed over to the kernel: userspace deliveries %d → %d, kernel %d → %d in a second", u1, u2, k1, k2)
	})
	t.Logf("all %d clients in the map: userspace deliveries stayed at %d while the kernel forwarded %d → %d", clients, u1, k1, k2)

	// Clients only the kernel forwards are touched (from their conntrack
	// entries' packet counts): their last-seen moves past this point
	// while userspace sees none of their packets.
	waitTouchedSince(t, lb, ctl, "vpn", clients, time.Now())
	if u := userspace(); u != u1 {
		t.Fatalf("userspace deliveries rose from %d to %d while every client was in the map", u1, u)
	}

	// A SNAT address (the one masquerade chose) rebuilds the rules under
	// traffic: the rebuild deletes every conntrack entry to the VIP, whose
	// counts since the last read must carry over (the exact count below).
	if out, err := ctlRun("service", "update", "vpn", "--snat", "10.0.0.1"); err != nil {
		t.Fatalf("service update --snat: %v %s", err, out)
	}
	Eventually(t, 5*time.Second, func() bool {
		out, _ := lb.Run("nft", "list", "chain", "ip", "ikelb_fast", "nat_postrouting")
		last = out
		return strings.Contains(out, "snat to 10.0.0.1")
	}, func() string { return "not rebuilt with the SNAT address: " + last })

	lines := finishedSessions(t, p, clients, 30*time.Second)
	nattPorts := map[string][]string{} // backend → client NAT-T ports
	for _, l := range lines {
		// Answered counts DPD replies that came from VIP:4500 (ikesim
		// ignores datagrams from any other source). With the fast path
		// off the same run shows the same counts (10 of 41 answered, a
		// 2.1 s max gap: ikesim's own pacing), so they are not compared.
		if l.Err != "" || !l.Kept || l.Answered == 0 || l.IKEResponder != l.NATTResponder || l.Checks < 20 {
			t.Errorf("client %s: %+v", l.Client, l)
		}
		ap, err := netip.ParseAddrPort(l.NATTSource)
		if err != nil {
			t.Fatalf("client %s: natt source %q", l.Client, l.NATTSource)
		}
		nattPorts[l.NATTResponder] = append(nattPorts[l.NATTResponder], strconv.Itoa(int(ap.Port())))
	}
	if kr := kernelReplies(); kr == 0 {
		t.Fatal("no replies through the kernel path")
	}
	// The backends saw each client's own NAT-T source port (masquerade
	// kept it; the userspace path would show an ephemeral port of lb).
	for i, r := range rs {
		out := r.MustRun("nft", "list", "set", "ip", "seen", "sports")
		for _, port := range nattPorts["r"+strconv.Itoa(i+1)] {
			if !regexp.MustCompile(`\b` + port + `\b`).MatchString(out) {
				t.Errorf("%s did not see source port %s:\n%s", r.Name(), port, out)
			}
		}
	}

	// The admin API counts the kernel's packets with the service's (read
	// from conntrack's accounting at most every 5 s).
	kNow := kernel()
	var total uint64
	Eventually(t, 10*time.Second, func() bool {
		out, err := ctlRun("-o", "json", "counters", "vpn")
		last = out
		if err != nil {
			return false
		}
		var resp struct {
			Services []struct {
				Name    string          `json:"name"`
				Packets json.RawMessage `json:"packets"`
			} `json:"services"`
		}
		if json.Unmarshal([]byte(out), &resp) != nil || len(resp.Services) != 1 {
			return false
		}
		total, _ = strconv.ParseUint(strings.Trim(string(resp.Services[0].Packets), `"`), 10, 64)
		// Every packet once, never more. The rebuild deletes the entries
		// after its last read of them, and what they counted in between
		// is lost: up to 2.3 % in 10 runs, exact in most, and 5.07 % in
		// one clean-clone CI run (ikelbd starved between the read and
		// the delete while the other e2e packages ran). Without the
		// carry-over of the counts not yet reported it lost 8 %.
		want := kNow + userspace()
		return total <= want && total >= want-want*7/100
	}, func() string {
		return fmt.Sprintf("admin counters not the kernel's %d + userspace's %d (every packet once, 7 %% less at most): %s", kNow, userspace(), last)
	})
	t.Logf("admin API: %d packets for vpn (kernel path %d, userspace deliveries %d)", total, kNow, userspace())

	// Disable r1: its clients leave the map at once and, sending again, go
	// through userspace, which re-picks them (to r2).
	if out, err := ctlRun("backend", "set", "vpn", "10.0.0.11", "--state", "disabled"); err != nil {
		t.Fatalf("disable: %v %s", err, out)
	}
	Eventually(t, 10*time.Second, func() bool {
		out, _ := lb.Run("nft", "list", "map", "ip", "ikelb_fast", "aff_1")
		last = out
		return !strings.Contains(out, ": 10.0.0.11")
	}, func() string { return "r1's clients still in the map: " + last })
	u3 := userspace()
	p2 := lab.Start(c, "sessions-2", ikesim, "sessions", "--vip", fpVIP, "--clients", strconv.Itoa(clients),
		"--source-base", "198.51.100.100", "--interval", "100ms", "--duration", "2s")
	select {
	case <-p2.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("second sessions did not finish")
	}
	if u4 := userspace(); u4 <= u3 {
		t.Fatalf("re-picked clients did not go through userspace (deliveries %d → %d)", u3, u4)
	}
	after := parseSessions(p2.Log())
	for _, l := range after {
		if l.Err != "" || !l.Kept || l.NATTResponder != "r2" || l.Answered == 0 {
			t.Errorf("after disabling r1, client %s: %+v", l.Client, l)
		}
	}
	if n := len(after); n != clients {
		t.Fatalf("%d session lines after disable:\n%s", n, p2.Log())
	}
	Eventually(t, 10*time.Second, func() bool {
		out, _ := lb.Run("nft", "list", "map", "ip", "ikelb_fast", "aff_1")
		last = out
		return strings.Count(out, " : 10.0.0.12") == clients
	}, func() string { return "re-picked clients not back in the map: " + last })

	// A clean stop removes the fast path's table.
	d.Stop()
	if out, err := lb.Run("nft", "list", "tables"); err != nil || strings.Contains(out, "ikelb_fast") {
		t.Fatalf("after stop: %v %s", err, out)
	}
}

// waitTouchedSince waits (8 s at most) until each of the service's n
// affinities on ns's ikelbd has a last-seen after since: clients the
// kernel fast path forwards are still touched.
func waitTouchedSince(t *testing.T, ns *netns.NS, ctl, service string, n int, since time.Time) {
	t.Helper()
	var last string
	Eventually(t, 8*time.Second, func() bool {
		out, err := ns.Run(ctl, "--addr", fpAdmin, "-o", "json", "affinity", "list", "--service", service, "--all")
		last = out
		if err != nil {
			return false
		}
		resp := &ikelbv1.ListAffinitiesResponse{}
		if protojson.Unmarshal([]byte(out), resp) != nil || len(resp.GetAffinities()) != n {
			return false
		}
		for _, a := range resp.GetAffinities() {
			if !a.GetLastSeen().AsTime().After(since) {
				return false
			}
		}
		return true
	}, func() string { return "kernel-forwarded clients not touched: " + last })
}

// fastPathConfig is the ikelbd config of a fast path test node: one
// service of the mode on vip with the two responders, the kernel fast
// path on, and a persistence timeout short enough that kernel-forwarded
// clients are touched every 4 s.
func fastPathConfig(node, mode, vip, natPath string) string {
	return fmt.Sprintf(`node: %s
data_dir: ./data
admin_address: %s
metrics_address: ""
log_level: debug
raft:
  bind_address: 127.0.0.1:0
dataplane:
  kernel_fast_path: true
  nat_fast_path: %s
services:
  - name: vpn
    vip: %s
    forwarding_mode: %s
    persistence_timeout: 16s # touches every 4 s
    health_check: {type: none}
    backends: [{address: 10.0.0.11}, {address: 10.0.0.12}]
`, node, fpAdmin, natPath, vip, mode)
}

// fastPathLab is the fast path lab with ikelbd serving one nat service
// on lb: seen is each responder's nft ruleset (what it sees), ready the
// "table map" ikelbd's fast path must list before the test starts.
type fastPathLab struct {
	lab   *netns.Lab
	c, lb *netns.NS
	rs    []*netns.NS
	d     *Daemon
	ctl   func(args ...string) (string, error)
}

// wrap, if any, goes between "ip netns exec lb" and ikelbd (e.g. prlimit).
func newFastPathLab(t *testing.T, prefix, natPath, seen, ready string, wrap ...string) *fastPathLab {
	t.Helper()
	ikesim := IkesimBinary(t)
	_, ctl := Binaries(t)
	fl := &fastPathLab{lab: netns.New(t, prefix)}
	lab := fl.lab
	fl.c, fl.lb = lab.AddNS("c"), lab.AddNS("lb")
	c, lb := fl.c, fl.lb
	lab.Link(c, "eth0", "198.51.100.2/24", lb, "up0", "198.51.100.1/24")
	lb.AddAddr("up0", fpVIP+"/32")
	c.DefaultRoute("198.51.100.1")
	lb.Forward()
	blan := lab.AddSwitch("blan")
	blan.Attach(lb, "lan0", "10.0.0.1/24")
	names := map[string]string{"10.0.0.11": "r1", "10.0.0.12": "r2"}
	for _, addr := range []string{"10.0.0.11", "10.0.0.12"} {
		r := lab.AddNS(names[addr])
		blan.Attach(r, "eth0", addr+"/24")
		r.DefaultRoute("10.0.0.1")
		r.NFT(seen)
		lab.Start(r, "responder-"+names[addr], ikesim, "responder", "--name", names[addr], "--ike", addr+":500", "--natt", addr+":4500")
		fl.rs = append(fl.rs, r)
	}
	// The userspace path's deliveries: datagrams to VIP:500/4500 that reach
	// the local listener instead of being forwarded.
	lb.NFT(`table ip userspace {
	chain input { type filter hook input priority 0; policy accept;
		ip daddr ` + fpVIP + ` udp dport { 500, 4500 } counter
	}
}`)
	fl.d = StartDaemon(t, "ikelbd-"+prefix, fpAdmin, fastPathConfig("lb1", "nat", fpVIP, natPath), append([]string{"ip", "netns", "exec", lb.Name()}, wrap...)...)
	fl.ctl = func(args ...string) (string, error) {
		return lb.Run(append([]string{ctl, "--addr", fpAdmin}, args...)...)
	}
	var last string
	Eventually(t, 20*time.Second, func() bool {
		if !fl.d.Running() {
			t.Fatalf("ikelbd exited:\n%s", fl.d.Log())
		}
		if out, err := fl.ctl("check", "ready"); err != nil {
			last = "ready: " + out
			return false
		}
		args := append([]string{"nft", "list", "map", "ip"}, strings.Fields(ready)...)
		if out, err := lb.Run(args...); err != nil {
			last = "nft: " + out
			return false
		}
		return true
	}, func() string { return "ikelbd not serving with the fast path: " + last })
	return fl
}

// finishedSessions waits up to timeout for the ikesim sessions process p
// and returns its lines, failing the test unless there is one per client.
func finishedSessions(t *testing.T, p *netns.Proc, clients int, timeout time.Duration) []sessionLine {
	t.Helper()
	select {
	case <-p.Done():
	case <-time.After(timeout):
		t.Fatalf("%s did not finish", p.Name())
	}
	lines := parseSessions(p.Log())
	if len(lines) != clients {
		t.Fatalf("%d session lines, want %d:\n%s", len(lines), clients, p.Log())
	}
	return lines
}
