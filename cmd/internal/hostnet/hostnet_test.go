package hostnet

import (
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ikelb/ikelb/dataplane"
	"github.com/ikelb/ikelb/test/netns"
)

func TestSpecFor(t *testing.T) {
	be := func(a string) dataplane.Backend { return dataplane.Backend{ID: 1, Addr: netip.MustParseAddr(a)} }
	set := []dataplane.Service{
		{ID: 1, Mode: dataplane.ModeNAT, Ports: []uint16{500}, Backends: []dataplane.Backend{be("10.0.0.9")}},
		{ID: 2, Mode: dataplane.ModeTransparent, Ports: []uint16{4500, 500},
			Backends: []dataplane.Backend{be("10.0.0.12"), be("::ffff:10.0.0.11"), be("fd00::1")}},
	}
	got := SpecFor(set, 7001, 7002)
	want := Spec{ReplyPort4: 7001, ReplyPort6: 7002, Intercepts: []Intercept{
		{netip.MustParseAddr("10.0.0.11"), 500}, {netip.MustParseAddr("10.0.0.11"), 4500},
		{netip.MustParseAddr("10.0.0.12"), 500}, {netip.MustParseAddr("10.0.0.12"), 4500},
		{netip.MustParseAddr("fd00::1"), 500}, {netip.MustParseAddr("fd00::1"), 4500},
	}}
	if !specEqual(got, want) {
		t.Fatalf("SpecFor = %+v\nwant %+v", got, want)
	}
	if v4, v6 := (Spec{ReplyPort4: 1, Intercepts: want.Intercepts}).families(); !v4 || v6 {
		t.Fatalf("families without a v6 reply port: %v %v", v4, v6)
	}
	if k := keyBytes(Intercept{netip.MustParseAddr("10.0.0.11"), 4500}); !slices.Equal(k, []byte{10, 0, 0, 11, 0x11, 0x94, 0, 0}) {
		t.Fatalf("key % x", k)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, c := range []Config{{}, {Logger: discard(), Table: 254}, {Logger: discard(), RulePriority: 40000}} {
		if _, err := New(c); err == nil {
			t.Errorf("New(%+v) accepted", c)
		}
	}
}

// TestHostnet runs TestHostnetChild in a fresh network namespace (as its
// own process, so this one never changes namespace).
func TestHostnet(t *testing.T) {
	netns.Require(t, "nft")
	lab := netns.New(t, "hn")
	ns := lab.AddNS("h")
	t.Setenv("IKELB_HOSTNET_CHILD", "1")
	start := time.Now()
	out, err := ns.Run(os.Args[0], "-test.run=^TestHostnetChild$", "-test.v", "-test.count=1")
	t.Logf("child in %s (%v):\n%s", ns.Name(), time.Since(start).Round(time.Millisecond), out)
	if err != nil || !strings.Contains(out, "--- PASS: TestHostnetChild") {
		t.Fatalf("child failed: %v", err)
	}
}

func discard() *slogLogger { return slogDiscard }

func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// state is the host setup as nft and ip show it.
type state struct {
	nft            string // nft list table inet ikelb, "" if none
	rules4, rules6 []string
	routes4        string
	routes6        string
}

func readState(t *testing.T) state {
	t.Helper()
	var s state
	if out, err := exec.Command("nft", "list", "table", "inet", "ikelb").CombinedOutput(); err == nil {
		s.nft = string(out)
	}
	for _, l := range strings.Split(run(t, "ip", "-4", "rule", "show"), "\n") {
		if strings.Contains(l, "lookup 4500") {
			s.rules4 = append(s.rules4, strings.TrimSpace(l))
		}
	}
	for _, l := range strings.Split(run(t, "ip", "-6", "rule", "show"), "\n") {
		if strings.Contains(l, "lookup 4500") {
			s.rules6 = append(s.rules6, strings.TrimSpace(l))
		}
	}
	s.routes4 = strings.TrimSpace(run(t, "ip", "-4", "route", "show", "table", "4500"))
	s.routes6 = strings.TrimSpace(run(t, "ip", "-6", "route", "show", "table", "4500"))
	return s
}

var space = regexp.MustCompile(`\s+`)

func mustContain(t *testing.T, what, s string, subs ...string) {
	t.Helper()
	flat := space.ReplaceAllString(s, " ")
	for _, sub := range subs {
		if !strings.Contains(flat, sub) {
			t.Fatalf("%s lacks %q:\n%s", what, sub, s)
		}
	}
}

func TestHostnetChild(t *testing.T) {
	if os.Getenv("IKELB_HOSTNET_CHILD") != "1" {
		t.Skip("runs inside the namespace TestHostnet makes")
	}
	// A stale setup from a killed run: a table with other content, a rule
	// to our table with another mark, a route in it.
	nftIn := exec.Command("nft", "-f", "-")
	nftIn.Stdin = strings.NewReader("table inet ikelb {\n chain stale {\n  type filter hook input priority 0;\n }\n}\n")
	if out, err := nftIn.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v %s", err, out)
	}
	run(t, "ip", "rule", "add", "fwmark", "0x99", "lookup", "4500", "priority", "50")
	run(t, "ip", "route", "add", "unreachable", "192.0.2.0/24", "table", "4500")

	m, err := New(Config{Logger: slogDiscard})
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr
	spec := Spec{ReplyPort4: 7001, ReplyPort6: 7002, Intercepts: []Intercept{
		{a("10.0.0.11"), 500}, {a("10.0.0.11"), 4500}, {a("10.0.0.12"), 4500}, {a("fd00::11"), 4500},
	}}
	for range 2 { // the second Apply changes nothing
		if err := m.Apply(spec); err != nil {
			t.Fatal(err)
		}
		s := readState(t)
		mustContain(t, "nft table", s.nft,
			"chain prerouting { type filter hook prerouting priority mangle; policy accept;",
			"type ipv4_addr . inet_service", "10.0.0.11 . 500", "10.0.0.11 . 4500", "10.0.0.12 . 4500",
			"type ipv6_addr . inet_service", "fd00::11 . 4500",
			"fib daddr type != local ip saddr . udp sport @backends4 meta mark set 0x00004b45 tproxy ip to :7001 accept",
			"fib daddr type != local ip6 saddr . udp sport @backends6 meta mark set 0x00004b45 tproxy ip6 to :7002 accept",
		)
		if strings.Contains(s.nft, "stale") || strings.Contains(s.nft, "10.0.0.12 . 500") {
			t.Fatalf("stale or extra content:\n%s", s.nft)
		}
		if len(s.rules4) != 1 || !strings.Contains(s.rules4[0], "100:") || !strings.Contains(s.rules4[0], "fwmark 0x4b45 lookup 4500") {
			t.Fatalf("ipv4 rules %q", s.rules4)
		}
		if len(s.rules6) != 1 || !strings.Contains(s.rules6[0], "fwmark 0x4b45 lookup 4500") {
			t.Fatalf("ipv6 rules %q", s.rules6)
		}
		mustContain(t, "ipv4 table 4500", s.routes4, "local default dev lo")
		mustContain(t, "ipv6 table 4500", s.routes6, "local default dev lo")
	}

	// Reconcile: one backend gone, IPv6 gone, another reply port.
	spec = Spec{ReplyPort4: 7003, Intercepts: []Intercept{{a("10.0.0.12"), 4500}}}
	if err := m.Apply(spec); err != nil {
		t.Fatal(err)
	}
	s := readState(t)
	mustContain(t, "nft table", s.nft, "10.0.0.12 . 4500", "tproxy ip to :7003")
	if strings.Contains(s.nft, "10.0.0.11") || strings.Contains(s.nft, "backends6") || len(s.rules6) != 0 || s.routes6 != "" {
		t.Fatalf("reconcile left the old setup:\n%s\n%+v", s.nft, s)
	}
	if len(s.rules4) != 1 {
		t.Fatalf("ipv4 rules %q", s.rules4)
	}

	// No transparent service: everything goes.
	if err := m.Apply(Spec{ReplyPort4: 7003}); err != nil {
		t.Fatal(err)
	}
	if s := readState(t); s.nft != "" || len(s.rules4)+len(s.rules6) != 0 || s.routes4 != "" || s.routes6 != "" {
		t.Fatalf("empty spec left %+v", s)
	}

	// Close removes it too.
	if err := m.Apply(spec); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if s := readState(t); s.nft != "" || len(s.rules4)+len(s.rules6) != 0 || s.routes4 != "" {
		t.Fatalf("Close left %+v", s)
	}
}
