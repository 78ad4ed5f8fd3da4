package hostnet

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ikelb/ikelb/dataplane"
	"github.com/ikelb/ikelb/test/netns"
)

func TestFastServices(t *testing.T) {
	a := netip.MustParseAddr
	set := []dataplane.Service{
		{ID: 1, Mode: dataplane.ModeNAT, VIP: a("10.0.100.1"), Ports: []uint16{4500, 500, 4500}, Timeout: time.Minute,
			Backends: []dataplane.Backend{
				{ID: 1, Addr: a("::ffff:10.0.0.11"), State: dataplane.StateActive},
				{ID: 2, Addr: a("10.0.0.12"), State: dataplane.StateDrain},                                // usable
				{ID: 3, Addr: a("10.0.0.13"), State: dataplane.StateDisabled},                             // not
				{ID: 4, Addr: a("10.0.0.14"), State: dataplane.StateActive, Health: dataplane.HealthDown}, // not
				{ID: 5, Addr: a("fd00::5"), State: dataplane.StateActive},                                 // other family
			}},
		{ID: 2, Mode: dataplane.ModeTransparent, VIP: a("10.0.100.2"), Ports: []uint16{500},
			Backends: []dataplane.Backend{
				{ID: 1, Addr: a("10.0.0.22"), State: dataplane.StateDisabled}, // replies still re-addressed
				{ID: 2, Addr: a("::ffff:10.0.0.21"), State: dataplane.StateActive},
				{ID: 3, Addr: a("fd00::3"), State: dataplane.StateActive},
			}},
		{ID: 3, Mode: dataplane.ModeNAT, VIP: a("10.0.100.3"), Ports: []uint16{500}, SNAT: a("fd00::1")},
		{ID: 4, Mode: dataplane.ModeTransparent, VIP: a("fd00::100"), Ports: []uint16{500}},
	}
	got := fastServices(set, false)
	if len(got) != 2 || got[1] == nil || got[2] == nil {
		t.Fatalf("services %v, want 1 and 2 (IPv6 transparent and a cross-family SNAT stay in userspace)", got)
	}
	if tr := got[2]; !tr.transparent || got[1].transparent || !slices.Equal(tr.replyFrom, []netip.Addr{a("10.0.0.21"), a("10.0.0.22")}) ||
		len(tr.backends) != 1 || tr.backends[2] != a("10.0.0.21") {
		t.Fatalf("transparent service %+v", tr)
	}
	s := got[1]
	if !slices.Equal(s.ports, []uint16{500, 4500}) || s.touchEvery != 15*time.Second || s.vip != a("10.0.100.1") {
		t.Fatalf("service %+v", s)
	}
	want := map[uint32]netip.Addr{1: a("10.0.0.11"), 2: a("10.0.0.12")}
	if len(s.backends) != len(want) || s.backends[1] != want[1] || s.backends[2] != want[2] {
		t.Fatalf("backends %v, want %v", s.backends, want)
	}
}

// TestFastPath runs TestFastPathChild in a fresh network namespace.
func TestFastPath(t *testing.T) {
	netns.Require(t, "nft")
	lab := netns.New(t, "fp")
	ns := lab.AddNS("h")
	t.Setenv("IKELB_FASTPATH_CHILD", "1")
	start := time.Now()
	out, err := ns.Run(os.Args[0], "-test.run=^TestFastPath(NATListener|RouteEvents)?Child$", "-test.v", "-test.count=1")
	t.Logf("child in %s (%v):\n%s", ns.Name(), time.Since(start).Round(time.Millisecond), out)
	for _, name := range []string{"TestFastPathChild", "TestFastPathNATListenerChild", "TestFastPathRouteEventsChild"} {
		if err != nil || !strings.Contains(out, "--- PASS: "+name+" ") {
			t.Fatalf("child %s failed: %v", name, err)
		}
	}
}

// touches records proposals.
type touches struct {
	mu   sync.Mutex
	keys map[dataplane.ClientKey]int
}

func (p *touches) Propose(pr dataplane.Proposal) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pr.Kind == dataplane.ProposeTouch {
		p.keys[pr.Key]++
	}
	return true
}

// elemCounter is an element's counter in nft's listing.
var elemCounter = regexp.MustCompile(` counter packets \d+ bytes \d+`)

// nftMap returns the map's elements as "client : backend" strings, and
// ["absent"] when there is no such map.
func nftMap(name string) []string {
	out, err := exec.Command("nft", "list", "map", "ip", DefaultFastNFTTable, name).CombinedOutput()
	if err != nil {
		return []string{"absent"}
	}
	flat := elemCounter.ReplaceAllString(space.ReplaceAllString(string(out), " "), "")
	i := strings.Index(flat, "elements = {")
	if i < 0 {
		return nil
	}
	body := flat[i+len("elements = {"):]
	body = body[:strings.Index(body, "}")]
	var els []string
	for _, e := range strings.Split(body, ",") {
		if e = strings.TrimSpace(e); e != "" {
			els = append(els, e)
		}
	}
	slices.Sort(els)
	return els
}

// waitMapLen polls until the map holds n elements.
func waitMapLen(t *testing.T, name string, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var got int
	for time.Now().Before(deadline) {
		if got = len(nftMap(name)); got == n {
			return
		}
		time.Sleep(50 * time.Millisecond) // polling the kernel's state, with a deadline
	}
	t.Fatalf("map %s holds %d elements, want %d", name, got, n)
}

// waitMap polls until the map holds exactly want.
func waitMap(t *testing.T, name string, want ...string) {
	t.Helper()
	slices.Sort(want)
	deadline := time.Now().Add(5 * time.Second)
	var got []string
	for time.Now().Before(deadline) {
		if got = nftMap(name); slices.Equal(got, want) {
			return
		}
		time.Sleep(10 * time.Millisecond) // polling the kernel's state, with a deadline
	}
	t.Fatalf("map %s = %q, want %q", name, got, want)
}

func TestFastPathChild(t *testing.T) {
	if os.Getenv("IKELB_FASTPATH_CHILD") != "1" {
		t.Skip("runs inside the namespace TestFastPath makes")
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/conf/all/forwarding", []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	// A stale table from a killed run.
	nftIn := exec.Command("nft", "-f", "-")
	nftIn.Stdin = strings.NewReader("table ip ikelb_fast {\n chain stale {\n  type filter hook input priority 0;\n }\n}\n")
	if out, err := nftIn.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v %s", err, out)
	}

	// Two interfaces, and the transparent backends on lan0's subnet:
	// the ingress stage hooks both and sends to the backends directly.
	runIP(t, [][]string{
		{"link", "add", "name", "lan0", "type", "veth", "peer", "name", "lan1"},
		{"addr", "add", "10.0.0.1/24", "dev", "lan0"},
		{"link", "set", "lan0", "up"},
		{"link", "set", "lan1", "up"},
	})

	a := netip.MustParseAddr
	tb := dataplane.NewTable()
	key := func(c string) dataplane.ClientKey {
		return dataplane.ClientKey{Service: 7, Client: dataplane.AddrFrom(a(c))}
	}
	tb.Put(key("10.1.0.1"), dataplane.Entry{Backend: 1}) // before the fast path exists
	prop := &touches{keys: map[dataplane.ClientKey]int{}}
	fp, err := NewFastPath(FastPathConfig{Logger: slogDiscard, Table: tb, Proposer: prop, Poll: 20 * time.Millisecond, QueueSize: 8, ConntrackNAT: true})
	if err != nil {
		t.Fatal(err)
	}
	defer fp.Close()
	if out, err := exec.Command("nft", "list", "table", "ip", DefaultFastNFTTable).CombinedOutput(); err == nil {
		t.Fatalf("stale table not removed, or installed before any service:\n%s", out)
	}

	svc := func(b1 dataplane.BackendState, snat string) []dataplane.Service {
		s := dataplane.Service{ID: 7, Name: "vpn", Mode: dataplane.ModeNAT, VIP: a("10.0.100.1"), Ports: []uint16{500, 4500},
			Timeout: 4 * time.Millisecond, // touches due at every poll
			Backends: []dataplane.Backend{
				{ID: 1, Addr: a("10.0.0.11"), Weight: 1, State: b1},
				{ID: 2, Addr: a("10.0.0.12"), Weight: 1, State: dataplane.StateActive},
				{ID: 3, Addr: a("10.0.0.13"), Weight: 1, State: dataplane.StateDisabled},
				{ID: 4, Addr: a("fd00::4"), Weight: 1, State: dataplane.StateActive},
			}}
		if snat != "" {
			s.SNAT = a(snat)
		}
		return []dataplane.Service{s, {ID: 8, Name: "t", Mode: dataplane.ModeTransparent, VIP: a("10.0.100.2"), Ports: []uint16{500, 4500},
			Timeout: 4 * time.Millisecond, // touches due at every poll
			Backends: []dataplane.Backend{
				{ID: 1, Addr: a("10.0.0.21"), Weight: 1, State: dataplane.StateActive},
				{ID: 2, Addr: a("10.0.0.22"), Weight: 1, State: dataplane.StateDisabled},
			}}}
	}
	gen := fp.setServices(svc(dataplane.StateActive, ""))
	tb.Put(key("10.1.0.2"), dataplane.Entry{Backend: 2})
	tb.Put(key("10.1.0.3"), dataplane.Entry{Backend: 3}) // disabled: not in the map
	tb.Put(key("10.1.0.4"), dataplane.Entry{Backend: 4}) // IPv6 backend: not in the map
	tkey := func(c string) dataplane.ClientKey {
		return dataplane.ClientKey{Service: 8, Client: dataplane.AddrFrom(a(c))}
	}
	tb.Put(tkey("10.1.0.9"), dataplane.Entry{Backend: 1})  // transparent
	tb.Put(tkey("10.1.0.10"), dataplane.Entry{Backend: 2}) // transparent, disabled backend: not in the map
	waitMap(t, "aff_7", "10.1.0.1 : 10.0.0.11", "10.1.0.2 : 10.0.0.12")
	waitMap(t, "aff_8", "10.1.0.9 : 10.0.0.21")
	if cov := fp.transparent(gen, 5*time.Second); len(cov) != 1 || !cov[8] {
		t.Fatalf("transparent services covered %v, want 8", cov)
	}

	out, err := exec.Command("nft", "list", "table", "ip", DefaultFastNFTTable).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list table: %v %s", err, out)
	}
	t.Logf("installed:\n%s", out)
	// The nat service: only the DNAT and SNAT rules, which conntrack
	// consults once per flow; no rule of its own sees its later packets.
	mustContain(t, "nft table", string(out),
		"set ports_7 { type inet_service elements = { 500, 4500 } }",
		"map aff_7 { type ipv4_addr : ipv4_addr counter elements = {",
		"chain nat_prerouting { type nat hook prerouting priority dstnat; policy accept; ip daddr 10.0.100.1 udp dport @ports_7 dnat to ip saddr map @aff_7 }",
		"chain nat_postrouting { type nat hook postrouting priority srcnat; policy accept; meta l4proto udp ct status dnat ct original ip daddr 10.0.100.1 ct original proto-dst @ports_7 masquerade }",
	)
	if n := strings.Count(string(out), "10.0.100.1"); n != 2 || strings.Contains(string(out), "raw_output") || strings.Contains(string(out), "fwd_7") {
		t.Fatalf("the nat service in %d places (want the DNAT and SNAT rules), or a raw output chain or counter of its own:\n%s", n, out)
	}
	// The transparent service: stateless rules, no DNAT/SNAT.
	mustContain(t, "nft table", string(out),
		"set bk_8 { type ipv4_addr elements = { 10.0.0.21, 10.0.0.22 } }",
		"ip daddr 10.0.100.2 udp dport @ports_8 ip daddr set ip saddr map @aff_8 notrack counter name \"fwd_8\" accept",
		"ip saddr @bk_8 udp sport @ports_8 fib daddr type != local notrack",
		"ip saddr @bk_8 udp sport @ports_8 ct state untracked counter name \"rep_8\" ip saddr set 10.0.100.2",
	)
	if strings.Contains(string(out), "stale") || strings.Count(string(out), "10.0.100.2") != 2 {
		t.Fatalf("stale chain, or the transparent service in the nat rules:\n%s", out)
	}
	testIngress(t)

	// Delete, re-bind, a new binding.
	tb.Delete(key("10.1.0.1"))
	tb.Put(key("10.1.0.2"), dataplane.Entry{Backend: 1, Created: 5})
	tb.Put(key("10.1.0.5"), dataplane.Entry{Backend: 2})
	waitMap(t, "aff_7", "10.1.0.2 : 10.0.0.11", "10.1.0.5 : 10.0.0.12")

	// Backend 1 disabled: its clients leave the map at once. A SNAT
	// address replaces masquerade.
	fp.SetServices(svc(dataplane.StateDisabled, "10.0.0.1"))
	waitMap(t, "aff_7", "10.1.0.5 : 10.0.0.12")
	out, _ = exec.Command("nft", "list", "chain", "ip", DefaultFastNFTTable, "nat_postrouting").CombinedOutput()
	mustContain(t, "postrouting", string(out), "ct original proto-dst @ports_7 snat to 10.0.0.1")
	// And back.
	fp.SetServices(svc(dataplane.StateDrain, "10.0.0.1"))
	waitMap(t, "aff_7", "10.1.0.2 : 10.0.0.11", "10.1.0.5 : 10.0.0.12")

	// Overflow: far more changes than the queue holds, then a resync.
	resyncs := fp.queue.Resyncs()
	want := []string{"10.1.0.2 : 10.0.0.11", "10.1.0.5 : 10.0.0.12"}
	for i := range 200 {
		c := fmt.Sprintf("10.2.%d.%d", i/250, 1+i%250)
		tb.Put(key(c), dataplane.Entry{Backend: 2})
		want = append(want, c+" : 10.0.0.12")
	}
	waitMap(t, "aff_7", want...)
	if fp.queue.Resyncs() == resyncs {
		t.Fatal("the queue did not overflow: the test does not test the resync")
	}

	// Bulk: 20,000 bindings at once (a restore, a burst of new clients)
	// reach the map in transactions of 4,096 elements in messages of 512
	// (one message holds about 2,000 elements, one default-sized socket
	// buffer about 5,000), and so does a rebuild that installs them all.
	for i := range 20000 {
		tb.Put(key(fmt.Sprintf("10.3.%d.%d", i/250, 1+i%250)), dataplane.Entry{Backend: 2})
	}
	waitMapLen(t, "aff_7", len(want)+20000)
	fp.SetServices(svc(dataplane.StateDrain, "10.0.0.2")) // another SNAT address: new rules, the maps rebuilt
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, _ := exec.Command("nft", "list", "chain", "ip", DefaultFastNFTTable, "nat_postrouting").CombinedOutput()
		if strings.Contains(string(out), "snat to 10.0.0.2") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not rebuilt with the new SNAT address:\n%s", out)
		}
		time.Sleep(10 * time.Millisecond) // polling the kernel's state, with a deadline
	}
	waitMapLen(t, "aff_7", len(want)+20000)

	// Reset (a snapshot restore) then two entries, and two of the
	// transparent service.
	tb.Reset()
	tb.Put(key("10.1.0.7"), dataplane.Entry{Backend: 2})
	tb.Put(key("10.1.0.8"), dataplane.Entry{Backend: 1})
	tb.Put(tkey("10.1.0.7"), dataplane.Entry{Backend: 1})
	tb.Put(tkey("10.1.0.8"), dataplane.Entry{Backend: 1})
	waitMap(t, "aff_7", "10.1.0.7 : 10.0.0.12", "10.1.0.8 : 10.0.0.11")
	waitMap(t, "aff_8", "10.1.0.7 : 10.0.0.21", "10.1.0.8 : 10.0.0.21")

	// Touches of the transparent service's clients: those whose element
	// counted packets since the last read, if in the committed map. The
	// elements' counters are set as the kernel's lookups would bump them
	// (10.1.0.99 is no affinity). (nat clients' touches come from
	// conntrack: test/e2e TestFastPathNAT.)
	setCount := func(client string, packets int) {
		t.Helper()
		nft := exec.Command("nft", "-f", "-")
		nft.Stdin = strings.NewReader(fmt.Sprintf("delete element ip %[1]s aff_8 { %[2]s }\nadd element ip %[1]s aff_8 { %[2]s counter packets %[3]d bytes %[4]d : 10.0.0.21 }\n",
			DefaultFastNFTTable, client, packets, packets*100))
		if out, err := nft.CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
	}
	touched := func(c string) int {
		prop.mu.Lock()
		defer prop.mu.Unlock()
		return prop.keys[tkey(c)]
	}
	waitTouches := func(c string, n int) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for touched(c) < n {
			if time.Now().After(deadline) {
				t.Fatalf("%d touches of %s, want %d", touched(c), c, n)
			}
			time.Sleep(10 * time.Millisecond) // polling the fast path's poll, with a deadline
		}
	}
	if err := exec.Command("nft", "add", "element", "ip", DefaultFastNFTTable, "aff_8", "{ 10.1.0.99 : 10.0.0.21 }").Run(); err != nil {
		t.Fatal(err)
	}
	setCount("10.1.0.7", 3)
	setCount("10.1.0.99", 3)
	waitTouches("10.1.0.7", 1)
	before8 := touched("10.1.0.8")     // never counted: never touched
	time.Sleep(100 * time.Millisecond) // five polls: the same count is no activity
	if n := touched("10.1.0.7"); n != 1 {
		t.Fatalf("%d touches of 10.1.0.7 for one count, want 1", n)
	}
	setCount("10.1.0.7", 5)
	waitTouches("10.1.0.7", 2)
	if touched("10.1.0.99") != 0 || touched("10.1.0.8") != 0 || before8 != 0 {
		t.Fatalf("touched a client that sent nothing or has no affinity: %v", prop.keys)
	}
	if err := exec.Command("nft", "delete", "element", "ip", DefaultFastNFTTable, "aff_8", "{ 10.1.0.99 }").Run(); err != nil {
		t.Fatal(err)
	}

	// No nat service left: the table goes; then Close.
	if cov := fp.transparent(fp.setServices(nil), 5*time.Second); len(cov) != 0 {
		t.Fatalf("transparent services covered %v with no service", cov)
	}
	deadline = time.Now().Add(5 * time.Second)
	for exec.Command("nft", "list", "table", "ip", DefaultFastNFTTable).Run() == nil {
		if time.Now().After(deadline) {
			t.Fatal("table left with no nat service")
		}
		time.Sleep(10 * time.Millisecond)
	}
	fp.SetServices(svc(dataplane.StateActive, ""))
	waitMap(t, "aff_7", "10.1.0.7 : 10.0.0.12", "10.1.0.8 : 10.0.0.11")
	if err := fp.Close(); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("nft", "list", "ruleset").CombinedOutput(); err != nil || strings.Contains(string(out), "ikelb") {
		t.Fatalf("Close left: %v\n%s", err, out)
	}
	tb.Put(key("10.1.0.9"), dataplane.Entry{Backend: 2}) // no observer any more: must not block or panic
}

// nftFlat lists args with nft (empty if it fails), whitespace collapsed.
func nftFlat(args ...string) string {
	out, err := exec.Command("nft", append([]string{"list"}, args...)...).CombinedOutput()
	if err != nil {
		return ""
	}
	return space.ReplaceAllString(string(out), " ")
}

// waitNFT polls until nft list args shows every one of want.
func waitNFT(t *testing.T, args []string, want ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	var got string
	for time.Now().Before(deadline) {
		got = nftFlat(args...)
		if got != "" && !slices.ContainsFunc(want, func(w string) bool { return !strings.Contains(got, w) }) {
			return
		}
		time.Sleep(10 * time.Millisecond) // polling the kernel's state, with a deadline
	}
	t.Fatalf("nft list %v:\n%s\nwant %q", args, got, want)
}

// nftIfindex is how nft lists the odev value of interface name: in host
// order as fwd reads it, which nft (missing the set's data-byteorder
// userdata, which github.com/google/nftables cannot write) takes as big
// endian.
func nftIfindex(t *testing.T, name string) uint32 {
	t.Helper()
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint32(binary.NativeEndian.AppendUint32(nil, uint32(ifc.Index)))
}

// testIngress checks the transparent service's ingress stage (service 8
// of TestFastPathChild, client 10.1.0.9 → 10.0.0.21 on lan0): a chain per
// interface with the rule, the map copy, the next hops; then a route
// change and a new interface.
func testIngress(t *testing.T) {
	table := []string{"table", "netdev", DefaultFastNFTTable}
	rule := "udp dport @ports_8 meta pkttype host ip frag-off & 16383 == 0 ip ttl > 1 meta length <= 1500 " +
		"ip daddr set ip saddr map @aff_8 counter name \"in_8\" fwd ip to ip daddr map @nhop device ip daddr map @odev"
	waitNFT(t, table,
		"chain in_lan0 { type filter hook ingress device \"lan0\" priority filter; policy accept; ip daddr 10.0.100.2 "+rule,
		"chain in_lan1 { type filter hook ingress device \"lan1\" priority filter; policy accept; ip daddr 10.0.100.2 "+rule,
		"map aff_8 { type ipv4_addr : ipv4_addr counter elements = { 10.1.0.9 counter packets 0 bytes 0 : 10.0.0.21 }",
		"map nhop { type ipv4_addr : ipv4_addr elements = { 10.0.0.21 : 10.0.0.21 }",
		fmt.Sprintf("map odev { type ipv4_addr : iface_index elements = { 10.0.0.21 : %d }", nftIfindex(t, "lan0")),
		"counter in_8 {",
	)
	if out := nftFlat(table...); strings.Contains(out, "10.0.100.1") || strings.Contains(out, "chain in_lo") {
		t.Fatalf("ingress stage holds the nat service or hooks lo:\n%s", out)
	}
	// A route through a gateway: the next hop follows at the next poll.
	if out, err := exec.Command("ip", "route", "add", "10.0.0.21/32", "via", "10.0.0.5", "dev", "lan0").CombinedOutput(); err != nil {
		t.Fatalf("ip route: %v %s", err, out)
	}
	waitNFT(t, []string{"map", "netdev", DefaultFastNFTTable, "nhop"}, "10.0.0.21 : 10.0.0.5")
	// A new interface: hooked after a reinstall, the map still whole.
	runIP(t, [][]string{
		{"link", "add", "name", "up0", "type", "veth", "peer", "name", "up1"},
		{"link", "set", "up0", "mtu", "1400"},
		{"link", "set", "up0", "up"},
		{"link", "set", "up1", "up"},
	})
	waitNFT(t, table, "chain in_up0 { type filter hook ingress device \"up0\"", "chain in_up1 {",
		"10.1.0.9 counter packets 0 bytes 0 : 10.0.0.21", "10.0.0.21 : 10.0.0.5")
	// Only the routes' interfaces bound the length: up0 carries no route.
	if out := nftFlat(table...); !strings.Contains(out, "meta length <= 1500") {
		t.Fatalf("length bound changed by an interface no backend is routed through:\n%s", out)
	}
}

// runIP runs ip with each of cmds' arguments in turn.
func runIP(t *testing.T, cmds [][]string) {
	t.Helper()
	for _, args := range cmds {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v %s", args, err, out)
		}
	}
}

// TestFastPathNATListenerChild (in TestFastPath's namespace, after
// TestFastPathChild): with the ingress stage carrying a nat service, the
// datagrams between its clients and the listener are untracked, except
// from the backends, whose set follows the service's backends in place.
func TestFastPathNATListenerChild(t *testing.T) {
	if os.Getenv("IKELB_FASTPATH_CHILD") != "1" {
		t.Skip("runs inside the namespace TestFastPath makes")
	}
	a := netip.MustParseAddr
	svc := func(addrs ...string) []dataplane.Service {
		s := dataplane.Service{ID: 9, Mode: dataplane.ModeNAT, VIP: a("10.0.100.9"), Ports: []uint16{500, 4500}}
		for i, b := range addrs {
			s.Backends = append(s.Backends, dataplane.Backend{ID: uint32(i + 1), Addr: a(b), Weight: 1, State: dataplane.StateActive})
		}
		return []dataplane.Service{s}
	}
	fp, err := NewFastPath(FastPathConfig{Logger: slogDiscard, Table: dataplane.NewTable(), Poll: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer fp.Close()
	fp.transparent(fp.setServices(svc("10.0.0.31", "10.0.0.32")), 5*time.Second)
	list := func(args ...string) string {
		out, err := exec.Command("nft", append([]string{"list"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("nft list %v: %v %s", args, err, out)
		}
		return space.ReplaceAllString(string(out), " ")
	}
	if nd := list("table", "netdev", DefaultFastNFTTable); !strings.Contains(nd, "@np_9") {
		t.Fatalf("no ingress stage for the nat service:\n%s", nd)
	}
	pre, out := list("chain", "ip", DefaultFastNFTTable, "raw_prerouting"), list("chain", "ip", DefaultFastNFTTable, "raw_output")
	if !strings.Contains(pre, "ip daddr 10.0.100.9 udp dport @ports_9 ip saddr != @aff_9 ip saddr != @bk_9 notrack") {
		t.Fatalf("raw prerouting:\n%s", pre)
	}
	if !strings.Contains(out, "ip saddr 10.0.100.9 udp sport @ports_9 notrack") {
		t.Fatalf("raw output:\n%s", out)
	}
	if bk := list("set", "ip", DefaultFastNFTTable, "bk_9"); !strings.Contains(bk, "elements = { 10.0.0.31, 10.0.0.32 }") {
		t.Fatalf("backend set:\n%s", bk)
	}
	handle := func() string { // the table's rules' handles change when it is reinstalled
		return regexp.MustCompile(`# handle \d+`).FindString(
			func() string {
				o, _ := exec.Command("nft", "-a", "list", "chain", "ip", DefaultFastNFTTable, "raw_output").CombinedOutput()
				return string(o)
			}())
	}
	before := handle()
	fp.transparent(fp.setServices(svc("10.0.0.31", "10.0.0.32", "10.0.0.33")), 5*time.Second)
	if bk := list("set", "ip", DefaultFastNFTTable, "bk_9"); !strings.Contains(bk, "elements = { 10.0.0.31, 10.0.0.32, 10.0.0.33 }") {
		t.Fatalf("backend set after adding one:\n%s", bk)
	}
	if after := handle(); after != before || before == "" {
		t.Fatalf("the tables were reinstalled for a backend added (raw output rule %q, then %q)", before, after)
	}
}

// TestFastPathRouteEventsChild (in TestFastPath's namespace): a route
// added on the host is seen (routesChanged), once.
func TestFastPathRouteEventsChild(t *testing.T) {
	if os.Getenv("IKELB_FASTPATH_CHILD") != "1" {
		t.Skip("runs inside the namespace TestFastPath makes")
	}
	fk, err := newFastKernel("ikelb_route_events", slogDiscard, false) // its own table name: no other test's tables removed
	if err != nil {
		t.Fatal(err)
	}
	k := fk.(*nftFast)
	defer k.close()
	time.Sleep(100 * time.Millisecond) // nothing changes meanwhile
	if k.routesChanged() {
		t.Fatal("an IPv4 route change reported with none made")
	}
	for _, op := range []string{"add", "del"} {
		if out, err := exec.Command("ip", "route", op, "blackhole", "10.9.9.0/24").CombinedOutput(); err != nil {
			t.Fatalf("ip route %s: %v %s", op, err, out)
		}
		deadline := time.Now().Add(5 * time.Second)
		for !k.routesChanged() {
			if time.Now().After(deadline) {
				t.Fatalf("no route change reported after a route %s", op)
			}
			time.Sleep(10 * time.Millisecond) // polling the subscription's flag, with a deadline
		}
	}
}
