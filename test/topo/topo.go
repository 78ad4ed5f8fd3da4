package topo

import (
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"

	"github.com/ikelb/ikelb/test/netns"
)

// Sentinel errors.
var (
	// ErrNoMaster reports that no balancer holds the VIP.
	ErrNoMaster = errors.New("topo: no node holds the vip")
	// ErrSplitBrain reports that more than one balancer holds the VIP.
	ErrSplitBrain = errors.New("topo: more than one node holds the vip")
	// ErrGatewayApart reports that the floating gateway address is not on
	// the node that holds the VIP (a transition in progress, or a fault).
	ErrGatewayApart = errors.New("topo: gateway address not with the vip")
)

// Interface names, the same in every shape.
const (
	// EdgeIf is a node's interface on the edge LAN (toward the router and
	// the clients; also the cluster's own traffic: Raft, memberlist, VRRP).
	EdgeIf = "eth0"
	// BackIf is a node's interface on the backend LAN.
	BackIf = "back0"
	// ClientIf is a client's (and a backend's) only interface.
	ClientIf = "eth0"
)

// The address plan, the same in every shape (RFC 5737 and RFC 1918 ranges,
// all inside the test's own namespaces).
var (
	// InternetNet is the "internet" LAN between the router, the NAT and
	// the clients that have their own public address.
	InternetNet = netip.MustParsePrefix("203.0.113.0/24")
	// RouterInternet is the router's address on InternetNet, the clients'
	// (and the NAT's) default gateway.
	RouterInternet = netip.MustParseAddr("203.0.113.1")
	// NATPublic is the NAT's public address: what the balancer sees as the
	// source of every NAT client.
	NATPublic = netip.MustParseAddr("203.0.113.2")
	// HomeNet is the private LAN behind the NAT.
	HomeNet = netip.MustParsePrefix("192.168.0.0/24")
	// NATPrivate is the NAT's address on HomeNet, its clients' gateway.
	NATPrivate = netip.MustParseAddr("192.168.0.1")
	// EdgeNet is the LAN between the router and the balancer nodes.
	EdgeNet = netip.MustParsePrefix("10.0.0.0/24")
	// RouterEdge is the router's address on EdgeNet, the nodes' default
	// gateway.
	RouterEdge = netip.MustParseAddr("10.0.0.1")
	// BackNet is the backend LAN.
	BackNet = netip.MustParsePrefix("10.1.0.0/24")
)

// Host numbers within a LAN.
const (
	firstNodeHost    = 11 // node i (0-based) is .11+i on EdgeNet and BackNet
	firstClientHost  = 10 // client i is .10+i on InternetNet or HomeNet
	firstBackendHost = 21 // backend i is .21+i on BackNet
)

// host returns the address with the last byte h in the /24 net.
func host(net netip.Prefix, h int) netip.Addr {
	b := net.Addr().As4()
	b[3] = byte(h)
	return netip.AddrFrom4(b)
}

// cidr returns a as "a/bits" of net, the form netns wants.
func cidr(a netip.Addr, net netip.Prefix) string {
	return netip.PrefixFrom(a, net.Bits()).String()
}

// Node is a balancer node (or the witness): one namespace on the edge LAN
// and, unless it is the witness, on the backend LAN.
type Node struct {
	// Name is the short name ("lb1", "n2", "lbw"), also the suffix of the
	// namespace's name.
	Name string
	// NS is the node's namespace.
	NS *netns.NS
	// Edge is the node's own address on EdgeNet (on EdgeIf): its cluster
	// address and its VRRP source address.
	Edge netip.Addr
	// Back is the node's own address on BackNet (on BackIf); invalid for
	// the witness, which has no backend side.
	Back netip.Addr
}

// Addrs returns the node's own addresses (not the floating ones).
func (n *Node) Addrs() []netip.Addr {
	a := []netip.Addr{n.Edge}
	if n.Back.IsValid() {
		a = append(a, n.Back)
	}
	return a
}

// Start starts a long-running process in the node's namespace; see
// netns.Lab.StartSpec (own process group, log file, killed at cleanup).
func (n *Node) Start(name string, spec netns.Spec) *netns.Proc {
	n.NS.Lab().TB().Helper()
	return n.NS.Lab().StartSpec(n.NS, name, spec)
}

// Exec returns the command prefix that runs a program in the node's
// namespace (`ip netns exec NS`), for callers that manage the process
// themselves, e.g. e2e.StartDaemon(t, name, admin, conf, node.Exec()...).
func (n *Node) Exec() []string { return []string{"ip", "netns", "exec", n.NS.Name()} }

// Client is a client namespace.
type Client struct {
	// Name is the short name ("c1" for a client with its own public
	// address, "h1" for one behind the NAT).
	Name string
	// NS is the client's namespace.
	NS *netns.NS
	// Addr is the client's own address on ClientIf.
	Addr netip.Addr
	// Public is the source address the balancer sees: Addr, or NATPublic
	// for a client behind the NAT.
	Public netip.Addr
	// BehindNAT reports whether the client sits behind the NAT namespace.
	BehindNAT bool
}

// Backend is a backend (VPN server) namespace on the backend LAN.
type Backend struct {
	// Name is the short name ("be1"...).
	Name string
	// NS is the backend's namespace.
	NS *netns.NS
	// Addr is the backend's address on BackNet (on ClientIf).
	Addr netip.Addr
}

// ClientSide configures the client half that both shapes share.
type ClientSide struct {
	// Clients is the number of clients with their own public address
	// (c1, c2, ... at 203.0.113.10+i). Default 1 unless NATClients is set.
	Clients int
	// NATClients is the number of clients behind one NAT namespace (h1,
	// h2, ... at 192.168.0.10+i, all seen as NATPublic).
	NATClients int
	// NATFlags are nft masquerade flags for the NAT ("fully-random",
	// "random", "persistent"); none keeps the source port where it can.
	NATFlags []string
}

// clientSide is what buildClientSide made.
type clientSide struct {
	router  *netns.NS
	nat     *netns.NS
	clients []*Client
	edge    *netns.Switch
}

// buildClientSide makes the router (rt) with the internet switch (inet) of
// clients and, with NATClients, the NAT (nat) with its home switch; and the
// edge switch (edge) with the router on it at RouterEdge.
func buildClientSide(lab *netns.Lab, cs ClientSide) clientSide {
	t := lab.TB()
	t.Helper()
	n := cs.Clients
	if n == 0 && cs.NATClients == 0 {
		n = 1
	}
	if n+cs.NATClients > 200 {
		t.Fatalf("topo: %d clients: at most 200", n+cs.NATClients)
	}
	var s clientSide
	s.router = lab.AddNS("rt")
	s.router.Forward()
	inet := lab.AddSwitch("inet")
	inet.Attach(s.router, "inet0", cidr(RouterInternet, InternetNet))
	s.edge = lab.AddSwitch("edge")
	s.edge.Attach(s.router, "edge0", cidr(RouterEdge, EdgeNet))
	for i := range n {
		c := &Client{Name: fmt.Sprintf("c%d", i+1), Addr: host(InternetNet, firstClientHost+i)}
		c.Public = c.Addr
		c.NS = lab.AddNS(c.Name)
		inet.Attach(c.NS, ClientIf, cidr(c.Addr, InternetNet))
		c.NS.DefaultRoute(RouterInternet.String())
		s.clients = append(s.clients, c)
	}
	if cs.NATClients > 0 {
		s.nat = lab.AddNS("nat")
		inet.Attach(s.nat, "out0", cidr(NATPublic, InternetNet))
		s.nat.DefaultRoute(RouterInternet.String())
		home := lab.AddSwitch("home")
		home.Attach(s.nat, "in0", cidr(NATPrivate, HomeNet))
		s.nat.Masquerade("out0", cs.NATFlags...)
		for i := range cs.NATClients {
			c := &Client{Name: fmt.Sprintf("h%d", i+1), Addr: host(HomeNet, firstClientHost+i), Public: NATPublic, BehindNAT: true}
			c.NS = lab.AddNS(c.Name)
			home.Attach(c.NS, ClientIf, cidr(c.Addr, HomeNet))
			c.NS.DefaultRoute(NATPrivate.String())
			s.clients = append(s.clients, c)
		}
	}
	return s
}

// addNode makes node i (0-based) named name on the edge switch and, if back
// is not nil, on the backend switch; its default route goes to the router.
func addNode(lab *netns.Lab, name string, i int, edge, back *netns.Switch) *Node {
	lab.TB().Helper()
	n := &Node{Name: name, NS: lab.AddNS(name), Edge: host(EdgeNet, firstNodeHost+i)}
	edge.Attach(n.NS, EdgeIf, cidr(n.Edge, EdgeNet))
	if back != nil {
		n.Back = host(BackNet, firstNodeHost+i)
		back.Attach(n.NS, BackIf, cidr(n.Back, BackNet))
	}
	n.NS.DefaultRoute(RouterEdge.String())
	// Asymmetric paths are the point of these shapes (replies from the
	// backends reach a node that did not forward the request).
	n.NS.RPFilterOff()
	return n
}

// addBackends makes count backends (default 3) on the backend switch.
func addBackends(lab *netns.Lab, count int, back *netns.Switch) []*Backend {
	lab.TB().Helper()
	if count == 0 {
		count = 3
	}
	var bs []*Backend
	for i := range count {
		b := &Backend{Name: fmt.Sprintf("be%d", i+1), Addr: host(BackNet, firstBackendHost+i)}
		b.NS = lab.AddNS(b.Name)
		back.Attach(b.NS, ClientIf, cidr(b.Addr, BackNet))
		bs = append(bs, b)
	}
	return bs
}

// hasAddr reports whether ns has a on ifname.
func hasAddr(ns *netns.NS, ifname string, a netip.Addr) (bool, error) {
	out, err := exec.Command("ip", "-n", ns.Name(), "-4", "-o", "addr", "show", "dev", ifname).CombinedOutput()
	if err != nil {
		return false, fmt.Errorf("topo: ip addr show in %s: %w: %s", ns.Name(), err, strings.TrimSpace(string(out)))
	}
	for _, f := range strings.Fields(string(out)) {
		if p, err := netip.ParsePrefix(f); err == nil && p.Addr() == a {
			return true, nil
		}
	}
	return false, nil
}
