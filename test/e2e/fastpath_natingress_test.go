package e2e

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ikelb/ikelb/test/netns"
)

// TestFastPathNATIngress runs ikesim clients through ikelbd in nat mode
// with the kernel fast path's ingress stage (the default): once a
// client's binding commits, its flows are handed over and NATed at
// netdev ingress with the flow socket's own address and port, both ways
// (userspace deliveries stop, the stage's counters rise, replies come
// back from VIP:port), the backends see one source port per client for
// the whole session (the handover does not change it), the clients are
// still touched, the admin counters include the stage's packets,
// disabling a backend takes its clients' flows out at once, and idle
// flows leave the maps when the engine closes them.
func TestFastPathNATIngress(t *testing.T) {
	netns.Require(t, "nft", "ss")
	ikesim := IkesimBinary(t)
	_, ctl := Binaries(t)

	// What the backend sees: the source addresses and ports of NAT-T datagrams.
	fl := newFastPathLab(t, "fpi", "ingress", `table ip seen {
	set sources { type ipv4_addr . inet_service; flags dynamic; }
	chain input { type filter hook input priority 0; policy accept;
		udp dport 4500 add @sources { ip saddr . udp sport }
	}
}`, "ikelb_fast aff_1")
	lab, c, lb, rs, d, ctlRun := fl.lab, fl.c, fl.lb, fl.rs, fl.d, fl.ctl
	var last string
	Eventually(t, 10*time.Second, func() bool {
		out, err := lb.Run("nft", "list", "table", "netdev", "ikelb_fast")
		last = out
		return err == nil && strings.Contains(out, "@np_1") && strings.Contains(out, "@na_1") && strings.Contains(out, "@ra_1") && strings.Contains(out, "@rp_1")
	}, func() string { return "no ingress stage for the nat service: " + last })
	userspace := func() uint64 { return nftCounter(t, lb, "chain", "ip", "userspace", "input") }
	requests := func() uint64 { return nftCounter(t, lb, "counter", "netdev", "ikelb_fast", "nin_1") }
	replies := func() uint64 { return nftCounter(t, lb, "counter", "netdev", "ikelb_fast", "nrep_1") }
	// A flow's address element: client . port . VIP port : socket address . backend.
	flows := func(backend string) int {
		out, _ := lb.Run("nft", "list", "map", "netdev", "ikelb_fast", "na_1")
		last = out
		return len(regexp.MustCompile(`: 10\.0\.0\.1 \. `+regexp.QuoteMeta(backend)+`\b`).FindAllString(out, -1))
	}

	// 20 clients, each with its own address, for 14 s (a datagram every
	// 100 ms each after connecting).
	const clients = 20
	for i := 1; i <= clients; i++ {
		c.MustRun("ip", "addr", "add", fmt.Sprintf("198.51.100.%d/24", 100+i), "dev", "eth0")
	}
	p := lab.Start(c, "sessions", ikesim, "sessions", "--vip", fpVIP, "--clients", strconv.Itoa(clients),
		"--source-base", "198.51.100.100", "--interval", "100ms", "--duration", "14s")
	// Every client's NAT-T flow in the stage's maps (its IKE flow too
	// if it still sent on 500 after its binding committed).
	Eventually(t, 10*time.Second, func() bool {
		return flows("10.0.0.11")+flows("10.0.0.12") >= clients
	}, func() string { return "not every client's flow in the maps: " + last })
	var u1, k1, u2, k2 uint64
	Eventually(t, 10*time.Second, func() bool {
		u1, k1 = userspace(), requests()
		time.Sleep(time.Second) // a window of 10 datagrams per client
		u2, k2 = userspace(), requests()
		return u2 == u1 && k2 >= k1+uint64(clients)*5
	}, func() string {
		return fmt.Sprintf("not handed over to the ingress stage: userspace deliveries %d → %d, stage %d → %d in a second", u1, u2, k1, k2)
	})
	t.Logf("all %d clients at ingress: userspace deliveries stayed at %d while the stage NATed %d → %d", clients, u1, k1, k2)
	waitTouchedSince(t, lb, ctl, "vpn", clients, time.Now())
	// The DNAT map holds only clients the engine had no flow for (none here).
	if out, _ := lb.Run("nft", "list", "map", "ip", "ikelb_fast", "aff_1"); strings.Contains(out, ": 10.0.0.1") {
		t.Fatalf("clients on the conntrack path although their flows are at ingress:\n%s", out)
	}

	// ESP-in-UDP without a UDP checksum, as the kernels' encapsulation
	// sends it: the stage's port rewrite leaves it at zero. (A
	// transport-header rewrite's checksum update writes a wrong non-zero
	// one, which a server's stack drops; veth itself checks nothing, so
	// the backends' tcpdump reads the field.)
	var dumps []*netns.Proc
	for _, r := range rs {
		dumps = append(dumps, lab.Start(r, "tcpdump-"+r.Name(), "tcpdump", "-l", "-n", "-vv", "-i", "eth0",
			"udp dst port 4500 and udp[8:4] = 0xdeadbeef"))
	}
	time.Sleep(time.Second) // tcpdump attaches
	esp := lab.Start(c, "esp", ikesim, "esp", "--from", "198.51.100.2:4600", "--to", fpVIP+":4500",
		"--count", "150", "--interval", "20ms", "--no-checksum")
	select {
	case <-esp.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("esp did not finish")
	}
	time.Sleep(500 * time.Millisecond) // the last datagrams reach the backends
	var noSum, badSum int
	for _, d := range dumps {
		_ = d.Signal(syscall.SIGINT)
		<-d.Done()
		noSum += d.CountLog("[no cksum]")
		badSum += d.CountLog("bad udp cksum")
	}
	// The first datagrams go through ikelbd's socket (with a checksum),
	// the rest through the stage.
	if noSum < 100 {
		t.Fatalf("%d of 150 checksum-less datagrams reached a backend without one (%d with a bad one):\n%s\n%s",
			noSum, badSum, dumps[0].Log(), dumps[1].Log())
	}
	t.Logf("checksum-less ESP-in-UDP: %d of 150 reached the backend without a checksum, %d with one", noSum, badSum)

	lines := finishedSessions(t, p, clients, 30*time.Second)
	perBackend := map[string]int{}
	for _, l := range lines {
		if l.Err != "" || !l.Kept || l.Answered == 0 || l.IKEResponder != l.NATTResponder || l.Checks < 20 {
			t.Errorf("client %s: %+v", l.Client, l)
		}
		perBackend[l.NATTResponder]++
	}
	if r := replies(); r == 0 {
		t.Fatal("no replies through the ingress stage")
	}
	// One source per client at each backend: the flow's socket, before
	// and after the handover (and one for the esp client's flow).
	source := regexp.MustCompile(`10\.0\.0\.1 \. \d+`)
	total := 0
	for i, r := range rs {
		out := r.MustRun("nft", "list", "set", "ip", "seen", "sources")
		n, want := len(source.FindAllString(out, -1)), perBackend["r"+strconv.Itoa(i+1)]
		if n < want || n > want+1 {
			t.Errorf("%s saw %d NAT-T sources for %d clients:\n%s", r.Name(), n, want, out)
		}
		total += n
	}
	if total != clients+1 {
		t.Errorf("the backends saw %d NAT-T sources for %d clients and the esp client", total, clients)
	}

	// The admin API counts the stage's packets with the service's.
	kNow := requests()
	Eventually(t, 10*time.Second, func() bool {
		out, err := ctlRun("-o", "json", "counters", "vpn")
		last = out
		m := regexp.MustCompile(`"packets":\s*"?(\d+)`).FindStringSubmatch(out)
		if err != nil || m == nil {
			return false
		}
		total, _ := strconv.ParseUint(m[1], 10, 64)
		return total >= kNow
	}, func() string { return fmt.Sprintf("admin counters below the stage's %d: %s", kNow, last) })

	// Disable r1: its clients' flows leave the maps at once and, sending
	// again, go through userspace, which re-picks them (to r2).
	if out, err := ctlRun("backend", "set", "vpn", "10.0.0.11", "--state", "disabled"); err != nil {
		t.Fatalf("disable: %v %s", err, out)
	}
	Eventually(t, 10*time.Second, func() bool { return flows("10.0.0.11") == 0 },
		func() string { return "r1's clients' flows still in the maps: " + last })
	p2 := lab.Start(c, "sessions-2", ikesim, "sessions", "--vip", fpVIP, "--clients", strconv.Itoa(clients),
		"--source-base", "198.51.100.100", "--interval", "100ms", "--duration", "3s")
	select {
	case <-p2.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("second sessions did not finish")
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

	// Idle flows close in the engine after the flow timeout (16 s, the
	// persistence timeout) past the kernel's last count, and leave the maps.
	Eventually(t, 40*time.Second, func() bool { return flows("10.0.0.11")+flows("10.0.0.12") == 0 },
		func() string { return "idle flows still in the maps: " + last })

	// A clean stop removes the fast path's tables.
	d.Stop()
	if out, err := lb.Run("nft", "list", "tables"); err != nil || strings.Contains(out, "ikelb_fast") {
		t.Fatalf("after stop: %v %s", err, out)
	}
}

// TestFastPathNATIngressOverflow runs more ikesim clients through ikelbd
// (nat, ingress stage) than its flow limit holds: with an open-file limit
// of 1,000 the engine opens 64 flow sockets, and 48 clients need 96 (one
// for IKE on 500, one for NAT-T on 4500). The flows the engine holds go
// to the ingress stage; the clients it has no flow for go into the DNAT
// map at their first dropped datagram and are DNATed from their next one
// on (their datagrams to the listener were never tracked, so no conntrack
// entry stands in the way). Every session completes with both ports on
// one server, and nothing reaches the listener once all are moved.
func TestFastPathNATIngressOverflow(t *testing.T) {
	netns.Require(t, "nft", "prlimit")
	ikesim := IkesimBinary(t)
	fl := newFastPathLab(t, "fpo", "ingress", `table ip seen {
	set sources { type ipv4_addr . inet_service; flags dynamic; }
	chain input { type filter hook input priority 0; policy accept;
		udp dport 4500 add @sources { ip saddr . udp sport }
	}
}`, "ikelb_fast aff_1", "prlimit", "--nofile=1000:1000")
	lab, c, lb, d := fl.lab, fl.c, fl.lb, fl.d
	// Datagrams that reach the listener with a conntrack entry: none
	// (listenerUntracked).
	lb.NFT(`table ip tracked {
	chain input { type filter hook input priority 0; policy accept;
		ip daddr ` + fpVIP + ` udp dport { 500, 4500 } ct state != untracked counter
	}
}`)
	if !strings.Contains(d.Log(), "max_flows=64") {
		t.Fatalf("ikelbd did not cap its flows at 64 under an open-file limit of 1,000:\n%s", d.Log())
	}
	var last string
	userspace := func() uint64 { return nftCounter(t, lb, "chain", "ip", "userspace", "input") }
	flows := func() int {
		out, _ := lb.Run("nft", "list", "map", "netdev", "ikelb_fast", "na_1")
		last = out
		return len(regexp.MustCompile(`: 10\.0\.0\.1 \. 10\.0\.0\.1[12]\b`).FindAllString(out, -1))
	}
	dnat := func() int {
		out, _ := lb.Run("nft", "list", "map", "ip", "ikelb_fast", "aff_1")
		last = out
		return len(regexp.MustCompile(`198\.51\.100\.\d+ [^,:]*: 10\.0\.0\.1[12]`).FindAllString(out, -1)) // "a counter packets n bytes m : b"
	}

	const clients = 48
	for i := 1; i <= clients; i++ {
		c.MustRun("ip", "addr", "add", fmt.Sprintf("198.51.100.%d/24", 100+i), "dev", "eth0")
	}
	p := lab.Start(c, "sessions", ikesim, "sessions", "--vip", fpVIP, "--clients", strconv.Itoa(clients),
		"--source-base", "198.51.100.100", "--interval", "100ms", "--duration", "12s")
	var nd string
	Eventually(t, 15*time.Second, func() bool {
		nd, _ = lb.Run("nft", "list", "table", "netdev", "ikelb_fast")
		return dnat() > 0 && flows() > 0
	}, func() string { return "no clients both at ingress and in the DNAT map: " + last + "\n" + nd })
	var u1, u2 uint64
	Eventually(t, 10*time.Second, func() bool {
		u1 = userspace()
		time.Sleep(time.Second) // 10 datagrams per client
		u2 = userspace()
		return u2 == u1
	}, func() string { return fmt.Sprintf("datagrams still reach the listener: %d → %d in a second", u1, u2) })
	nFlows, nDNAT := flows(), dnat()
	if nFlows > 64 {
		t.Fatalf("%d flows at ingress, more than the engine's 64 sockets:\n%s", nFlows, last)
	}
	t.Logf("%d flows at ingress, %d clients in the DNAT map; userspace deliveries stayed at %d", nFlows, nDNAT, u1)

	lines := finishedSessions(t, p, clients, 40*time.Second)
	for _, l := range lines {
		if l.Err != "" || !l.Kept || l.Answered == 0 || l.IKEResponder != l.NATTResponder || l.Checks < 20 {
			t.Errorf("client %s: %+v", l.Client, l)
		}
	}
	if n := nftCounter(t, lb, "chain", "ip", "tracked", "input"); n > 0 {
		t.Errorf("%d datagrams reached the listener tracked by conntrack", n)
	}
	if !strings.Contains(d.Log(), "clients beyond the engine's flow limit go through conntrack") {
		t.Error("ikelbd did not log that clients went beyond its flow limit")
	}
	if n := strings.Count(d.Log(), "conntrack entries failed"); n > 0 {
		t.Errorf("%d conntrack delete failures logged", n)
	}
}
