package topo

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/ikelb/ikelb/test/netns"
)

// anycastRound sends, for each of the client's source addresses, perAddr
// "clients": one datagram to VIP:500 and then one to VIP:4500 from a new
// source port (as IKEv2 does behind NAT). It returns the node that answered
// each half, per client, and fails the test if any datagram went
// unanswered.
func anycastRound(t *testing.T, a *Anycast, c *Client, srcs []netip.Addr, perAddr int) (ike, natt []probeResult) {
	t.Helper()
	var pairs []string
	for _, s := range srcs {
		for range perAddr {
			pairs = append(pairs,
				netip.AddrPortFrom(s, 0).String()+">"+netip.AddrPortFrom(a.VIP, 500).String(),
				netip.AddrPortFrom(s, 0).String()+">"+netip.AddrPortFrom(a.VIP, 4500).String())
		}
	}
	res := probe(t, c.NS, pairs...)
	for i := 0; i < len(res); i += 2 {
		ike, natt = append(ike, res[i]), append(natt, res[i+1])
	}
	for _, r := range res {
		if r.node == "-" {
			t.Fatalf("datagram %v>%s unanswered", r.src, r.dst)
		}
	}
	return ike, natt
}

func count(rs []probeResult) map[string]int {
	m := map[string]int{}
	for _, r := range rs {
		m[r.node]++
	}
	return m
}

func TestAnycastSpread(t *testing.T) {
	lab := netns.New(t, "any")
	a := NewAnycast(lab, AnycastConfig{})
	c := a.Clients[0]
	// Ten source addresses, five clients each: fifty (address, port)
	// clients, each with a 500 half and a 4500 half from another port.
	var srcs []netip.Addr
	for i := range 10 {
		s := host(InternetNet, 100+i)
		c.NS.AddAddr(ClientIf, cidr(s, InternetNet))
		srcs = append(srcs, s)
	}
	listeners := map[string]*netns.Proc{}
	for _, n := range a.Nodes {
		listeners[n.Name] = startListener(t, lab, n.NS, n.Name,
			netip.AddrPortFrom(a.VIP, 500), netip.AddrPortFrom(a.VIP, 4500))
	}

	ike, natt := anycastRound(t, a, c, srcs, 5)
	split := 0
	for i := range ike {
		if ike[i].node != natt[i].node {
			split++
		}
	}
	all := count(append(append([]probeResult(nil), ike...), natt...))
	t.Logf("%d clients: port 500 by node %v, port 4500 by node %v; the two halves on different nodes for %d/%d clients (%.0f%%)",
		len(ike), count(ike), count(natt), split, len(ike), 100*float64(split)/float64(len(ike)))
	for _, n := range a.Nodes {
		if all[n.Name] == 0 {
			t.Errorf("node %s received none of %d datagrams: %v", n.Name, 2*len(ike), all)
		}
	}
	if split == 0 {
		t.Errorf("the 500 and 4500 halves of all %d clients reached the same node: no L4 hash?", len(ike))
	}
	// Each node's responder saw exactly the sources that it answered.
	for _, r := range append(ike, natt...) {
		want := fmt.Sprintf("recv %s %s %s", r.node, r.dst, r.src)
		if !strings.Contains(listeners[r.node].Log(), want) {
			t.Errorf("%s's log lacks %q", r.node, want)
		}
	}

	// The router withdraws n1 (a dead node): no traffic reaches it, all
	// of it is answered by the others; then n1 comes back.
	gone := a.Nodes[0]
	a.RemoveNexthop(gone)
	ike, natt = anycastRound(t, a, c, srcs, 5)
	all = count(append(ike, natt...))
	t.Logf("%s withdrawn: %d datagrams answered by %v", gone.Name, 2*len(ike), all)
	if all[gone.Name] != 0 {
		t.Errorf("withdrawn node %s still answered %d datagrams", gone.Name, all[gone.Name])
	}
	// The backends' multipath default route no longer names it either.
	for _, b := range a.Backends {
		if out := b.NS.MustRun("ip", "route", "show", "default"); strings.Contains(out, gone.Back.String()+" ") || !strings.Contains(out, a.Nodes[1].Back.String()) {
			t.Errorf("%s default route after withdrawing %s:\n%s", b.Name, gone.Name, out)
		}
	}
	a.RestoreNexthop(gone)
	ike, natt = anycastRound(t, a, c, srcs, 5)
	all = count(append(ike, natt...))
	t.Logf("%s restored: %d datagrams answered by %v", gone.Name, 2*len(ike), all)
	if all[gone.Name] == 0 {
		t.Errorf("restored node %s answered nothing: %v", gone.Name, all)
	}
}

func TestAnycastIsolate(t *testing.T) {
	lab := netns.New(t, "iso")
	a := NewAnycast(lab, AnycastConfig{ClientSide: ClientSide{NATClients: 1}})
	n1, n2, n3 := a.Nodes[0], a.Nodes[1], a.Nodes[2]
	reach := func(from *netns.NS, to netip.Addr) bool {
		_, err := from.Run("ping", "-c1", "-W0.5", to.String())
		return err == nil
	}
	check := func(when string, peersReach bool) {
		t.Helper()
		for _, p := range []*Node{n2, n3} {
			for _, dst := range n1.Addrs() {
				if got := reach(p.NS, dst); got != peersReach {
					t.Errorf("%s: %s reaches %s of %s: %v, want %v", when, p.Name, dst, n1.Name, got, peersReach)
				}
			}
			if got := reach(n1.NS, p.Edge); got != peersReach {
				t.Errorf("%s: %s reaches %s: %v, want %v", when, n1.Name, p.Name, got, peersReach)
			}
		}
		// Clients (through the router and the NAT) and backends always do.
		for _, c := range a.Clients {
			if !reach(c.NS, n1.Edge) {
				t.Errorf("%s: client %s cannot reach %s", when, c.Name, n1.Name)
			}
		}
		if !reach(a.Backends[0].NS, n1.Back) {
			t.Errorf("%s: backend cannot reach %s", when, n1.Name)
		}
	}
	check("before", true)
	a.Isolate(n1)
	check("isolated", false)
	if !reach(n2.NS, n3.Edge) {
		t.Error("isolated: n2 cannot reach n3 (the majority must stay connected)")
	}
	a.Heal(n1)
	check("healed", true)
	a.Heal(n1) // healing twice is harmless

	// A pulled cable: everything on n1's edge link is cut, whoever it is.
	IsolateLinks(n1.NS, EdgeIf)
	if reach(a.Clients[0].NS, n1.Edge) || reach(n2.NS, n1.Edge) {
		t.Error("edge link cut: n1's edge address still answers")
	}
	if !reach(a.Backends[0].NS, n1.Back) {
		t.Error("edge link cut: backend side of n1 cut too")
	}
	Heal(n1.NS)
	check("link healed", true)
}
