package topo

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/ikelb/ikelb/test/netns"
)

// AnycastVIP is the VIP of the anycast shape, on every node's loopback.
var AnycastVIP = netip.MustParseAddr("192.0.2.10")

// AnycastConfig configures NewAnycast. The zero value is a working shape:
// one client, three nodes, three backends.
type AnycastConfig struct {
	ClientSide
	// Nodes is the number of balancer nodes (default 3, at most 9).
	Nodes int
	// Backends is the number of backends (default 3).
	Backends int
}

// Anycast is the ECMP shape:
//
//	c1..cN ──┐                                 ┌─ n1 ─┐
//	         ├─ inet ─ rt ─ edge 10.0.0.0/24 ──┼─ n2 ─┼─ back 10.1.0.0/24 ─ be1..beM
//	nat ─────┘  (ECMP 192.0.2.10/32 via        └─ n3 ─┘  (ECMP default via
//	 └─ home ─ h1..hK   .11 .12 .13, L4 hash)              10.1.0.11 .12 .13)
//
// Each node n1..nK (10.0.0.11+i on eth0, 10.1.0.11+i on back0) has the VIP
// 192.0.2.10/32 on its loopback. The router rt holds one multipath route to
// the VIP over every node's edge address with
// net.ipv4.fib_multipath_hash_policy=1, so the next hop is a hash of the
// 5-tuple (source and destination address and port, protocol): the UDP 500
// and 4500 halves of one client, which come from different source ports,
// often reach different nodes. The backends' default route is the same kind
// of multipath route over the nodes' backend addresses, so a backend's
// replies (transparent mode) reach some node, not necessarily the one that
// forwarded the request. RemoveNexthop and RestoreNexthop change both
// routes, as a routing protocol (BGP with BFD) would when a node dies.
// Nothing turns on IP forwarding in the nodes: that is the balancer's own
// business.
type Anycast struct {
	// Lab holds every namespace and process of the shape.
	Lab *netns.Lab
	// Router is rt, the ECMP router between the clients and the nodes.
	Router *netns.NS
	// NAT is the NAT namespace, nil without NAT clients.
	NAT *netns.NS
	// Clients are the clients, own-address ones first.
	Clients []*Client
	// Nodes are the balancer nodes n1..nK.
	Nodes []*Node
	// Backends sit on the backend LAN.
	Backends []*Backend
	// VIP is AnycastVIP.
	VIP netip.Addr

	mu     sync.Mutex // guards the following
	active map[*Node]bool
}

// NewAnycast builds the anycast shape in lab, every node's next hop active.
func NewAnycast(lab *netns.Lab, cfg AnycastConfig) *Anycast {
	t := lab.TB()
	t.Helper()
	netns.Require(t, "nft")
	if cfg.Nodes == 0 {
		cfg.Nodes = 3
	}
	if cfg.Nodes > 9 {
		t.Fatalf("topo: %d anycast nodes: at most 9", cfg.Nodes)
	}
	cs := buildClientSide(lab, cfg.ClientSide)
	a := &Anycast{
		Lab: lab, Router: cs.router, NAT: cs.nat, Clients: cs.clients,
		VIP: AnycastVIP, active: map[*Node]bool{},
	}
	back := lab.AddSwitch("back")
	for i := range cfg.Nodes {
		n := addNode(lab, fmt.Sprintf("n%d", i+1), i, cs.edge, back)
		n.NS.AddAddr("lo", a.VIP.String()+"/32")
		a.Nodes = append(a.Nodes, n)
		a.active[n] = true
	}
	a.Backends = addBackends(lab, cfg.Backends, back)
	for _, ns := range a.hashers() {
		ns.Sysctl("net.ipv4.fib_multipath_hash_policy", "1")
	}
	a.program()
	return a
}

// hashers are the namespaces that hold a multipath route.
func (a *Anycast) hashers() []*netns.NS {
	h := []*netns.NS{a.Router}
	for _, b := range a.Backends {
		h = append(h, b.NS)
	}
	return h
}

// Active returns the nodes whose next hop is in the routes now.
func (a *Anycast) Active() []*Node {
	a.mu.Lock()
	defer a.mu.Unlock()
	var act []*Node
	for _, n := range a.Nodes {
		if a.active[n] {
			act = append(act, n)
		}
	}
	return act
}

// RemoveNexthop withdraws node n from the router's route to the VIP and
// from the backends' default route, as BGP/BFD would for a dead node.
// Removing the last one leaves no route at all.
func (a *Anycast) RemoveNexthop(n *Node) { a.setActive(n, false) }

// RestoreNexthop puts node n back into both routes.
func (a *Anycast) RestoreNexthop(n *Node) { a.setActive(n, true) }

func (a *Anycast) setActive(n *Node, on bool) {
	a.Lab.TB().Helper()
	if !slices.Contains(a.Nodes, n) {
		a.Lab.TB().Fatalf("topo: %v is not a node of this shape", n)
	}
	a.mu.Lock()
	a.active[n] = on
	a.mu.Unlock()
	a.program()
}

// program installs the routes for the active nodes.
func (a *Anycast) program() {
	a.Lab.TB().Helper()
	var edge, back []netip.Addr
	for _, n := range a.Active() {
		edge, back = append(edge, n.Edge), append(back, n.Back)
	}
	setMultipath(a.Router, netip.PrefixFrom(a.VIP, 32).String(), edge)
	for _, b := range a.Backends {
		setMultipath(b.NS, "default", back)
	}
}

// setMultipath replaces the route to dst with one over vias, or deletes it
// when vias is empty.
func setMultipath(ns *netns.NS, dst string, vias []netip.Addr) {
	ns.Lab().TB().Helper()
	if len(vias) > 0 {
		ns.IP(multipathArgs(dst, vias)...)
		return
	}
	if _, err := ns.Run("ip", "route", "del", dst); err != nil && !strings.Contains(err.Error(), "No such process") {
		ns.Lab().TB().Fatal(err)
	}
}

// multipathArgs returns the `ip` arguments of an equal-cost multipath route.
func multipathArgs(dst string, vias []netip.Addr) []string {
	args := []string{"route", "replace", dst}
	for _, v := range vias {
		args = append(args, "nexthop", "via", v.String())
	}
	return args
}

// RouterSetup returns, as shell commands, what an anycast deployment needs
// for a VIP served by nodes at nodeAddrs (their addresses on the router's
// LAN) and backends whose replies go back through nodeBackAddrs (nil for
// none): the router, each node and each backend. NewAnycast configures its
// namespaces with the same commands (the VIP on each node's loopback, the
// router's multipath route with an L4 hash, the backends' multipath
// default), so the README's example can be checked against this text. In
// production a routing protocol (BGP, with BFD for fast failure detection)
// installs the router's route from each node's announcement instead of a
// static one; the L4 hash policy is what makes the 500 and 4500 halves of
// one client land on different nodes, which ikelb's shared table absorbs.
func RouterSetup(vip netip.Addr, nodeAddrs, nodeBackAddrs []netip.Addr) string {
	var b strings.Builder
	b.WriteString("# router: forward, hash on the 5-tuple, one multipath route to the VIP\n")
	b.WriteString("sysctl -w net.ipv4.ip_forward=1\n")
	b.WriteString("sysctl -w net.ipv4.fib_multipath_hash_policy=1\n")
	b.WriteString("ip " + strings.Join(multipathArgs(netip.PrefixFrom(vip, 32).String(), nodeAddrs), " ") + "\n")
	b.WriteString("# each node: the VIP on loopback\n")
	b.WriteString("ip addr add " + netip.PrefixFrom(vip, 32).String() + " dev lo\n")
	if len(nodeBackAddrs) > 0 {
		b.WriteString("# each backend (transparent mode): replies to any node\n")
		b.WriteString("sysctl -w net.ipv4.fib_multipath_hash_policy=1\n")
		b.WriteString("ip " + strings.Join(multipathArgs("default", nodeBackAddrs), " ") + "\n")
	}
	return b.String()
}

// RouterSetup returns RouterSetup for this shape's addresses.
func (a *Anycast) RouterSetup() string {
	var edge, back []netip.Addr
	for _, n := range a.Nodes {
		edge, back = append(edge, n.Edge), append(back, n.Back)
	}
	return RouterSetup(a.VIP, edge, back)
}

// Isolate cuts node n off from the other nodes: see the package function
// Isolate. The router and the backends still reach it.
func (a *Anycast) Isolate(n *Node) { Isolate(n.NS, peerAddrs(n, a.Nodes)...) }

// Heal undoes Isolate.
func (a *Anycast) Heal(n *Node) { Heal(n.NS) }
