package topo

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ikelb/ikelb/test/netns"
)

// Addresses of the VRRP shape.
var (
	// VRRPVIP is the VIP of the VRRP shape, on the edge LAN.
	VRRPVIP = netip.MustParseAddr("10.0.0.100")
	// VRRPGateway is the floating backend-side address that follows the
	// VIP: the backends' default gateway.
	VRRPGateway = netip.MustParseAddr("10.1.0.1")
)

// VRRPConfig configures NewVRRP. The zero value is a working shape: one
// client, three backends, keepalived with no track script.
type VRRPConfig struct {
	ClientSide
	// Backends is the number of backends (default 3).
	Backends int
	// TrackScript returns the track-script command for a balancer node,
	// e.g. "/path/ikelbctl --addr 10.0.0.11:7450 check ready"; nil or ""
	// for none (then only keepalived's own liveness moves the VIP).
	TrackScript func(n *Node) string
	// ReadyWatcher returns the command of a long-running readiness
	// watcher for balancer n, e.g. "/path/ikelbctl --addr A check ready";
	// topo appends "--track-file FILE", starts it with keepalived (before
	// it) and kills it with KillKeepalived, and keepalived tracks FILE
	// (track_file, weight 0: a non-zero value means FAULT, noticed at
	// once by inotify). nil: no track file.
	ReadyWatcher func(n *Node) []string
	// AdvertInterval, TrackInterval, TrackFall and TrackRise tune
	// keepalived; see Keepalived for their defaults and effect.
	AdvertInterval time.Duration
	TrackInterval  time.Duration
	TrackFall      int
	TrackRise      int
	// NoKeepalived builds the network only; StartKeepalived starts the
	// daemons later (e.g. after ikelbd, so the track script can pass).
	NoKeepalived bool
}

// VRRP is the HA-pair shape:
//
//	c1..cN ──┐                                 ┌─ lb1 ─┐
//	         ├─ inet ─ rt ─ edge 10.0.0.0/24 ──┼─ lb2 ─┼─ back 10.1.0.0/24 ─ be1..beM
//	nat ─────┘ (203.0.113.0/24)                └─ lbw  │  (default via 10.1.0.1)
//	 └─ home 192.168.0.0/24 ─ h1..hK                   │
//
// lb1 (10.0.0.11, 10.1.0.11) and lb2 (10.0.0.12, 10.1.0.12) run keepalived,
// which puts the VIP 10.0.0.100 on the master's eth0 and the gateway
// 10.1.0.1 on its back0. The witness lbw (10.0.0.13) is on the edge LAN only.
// The router rt forwards between the clients and the edge LAN; the nodes'
// default route is rt (10.0.0.1). Nothing turns on IP forwarding in the
// balancer nodes: that is the balancer's own business.
type VRRP struct {
	// Lab holds every namespace and process of the shape.
	Lab *netns.Lab
	// Router is rt, between the clients and the edge LAN.
	Router *netns.NS
	// NAT is the NAT namespace, nil without NAT clients.
	NAT *netns.NS
	// Clients are the clients, own-address ones first.
	Clients []*Client
	// LB1 and LB2 are the balancer pair; Witness is the third voter.
	LB1, LB2, Witness *Node
	// Backends sit on the backend LAN with their default route via Gateway.
	Backends []*Backend
	// VIP is VRRPVIP and Gateway is VRRPGateway.
	VIP, Gateway netip.Addr

	// set once
	cfg VRRPConfig
	dir map[*Node]string // keepalived's directory per balancer

	mu      sync.Mutex // guards the following
	kad     map[*Node]*netns.Proc
	watcher map[*Node]*netns.Proc
}

// NewVRRP builds the VRRP shape in lab and, unless cfg.NoKeepalived, starts
// keepalived in lb1 and lb2. It does not wait for a master: see WaitMaster.
func NewVRRP(lab *netns.Lab, cfg VRRPConfig) *VRRP {
	t := lab.TB()
	t.Helper()
	netns.Require(t, "nft", "keepalived")
	cs := buildClientSide(lab, cfg.ClientSide)
	v := &VRRP{
		Lab: lab, Router: cs.router, NAT: cs.nat, Clients: cs.clients,
		VIP: VRRPVIP, Gateway: VRRPGateway,
		cfg: cfg, dir: map[*Node]string{}, kad: map[*Node]*netns.Proc{}, watcher: map[*Node]*netns.Proc{},
	}
	back := lab.AddSwitch("back")
	v.LB1 = addNode(lab, "lb1", 0, cs.edge, back)
	v.LB2 = addNode(lab, "lb2", 1, cs.edge, back)
	v.Witness = addNode(lab, "lbw", 2, cs.edge, nil)
	v.Backends = addBackends(lab, cfg.Backends, back)
	for _, b := range v.Backends {
		b.NS.DefaultRoute(v.Gateway.String())
	}
	for _, n := range v.Balancers() {
		d := lab.MkDir("keepalived-" + n.Name)
		if err := os.Mkdir(filepath.Join(d, "run"), 0o755); err != nil {
			t.Fatalf("topo: %v", err)
		}
		v.dir[n] = d // before the conf: it names files in d
		if err := os.WriteFile(filepath.Join(d, "keepalived.conf"), []byte(v.KeepalivedConf(n)), 0o644); err != nil {
			t.Fatalf("topo: %v", err)
		}
	}
	if !cfg.NoKeepalived {
		for _, n := range v.Balancers() {
			v.StartKeepalived(n)
		}
	}
	return v
}

// Balancers returns lb1 and lb2.
func (v *VRRP) Balancers() []*Node { return []*Node{v.LB1, v.LB2} }

// Nodes returns every cluster node: lb1, lb2 and the witness.
func (v *VRRP) Nodes() []*Node { return []*Node{v.LB1, v.LB2, v.Witness} }

// Peer returns the other balancer of the pair.
func (v *VRRP) Peer(n *Node) *Node {
	if n == v.LB1 {
		return v.LB2
	}
	return v.LB1
}

// Keepalived returns the keepalived configuration of balancer n.
func (v *VRRP) Keepalived(n *Node) Keepalived {
	k := Keepalived{
		RouterID:         n.Name,
		Interface:        EdgeIf,
		Priority:         100,
		AdvertInterval:   v.cfg.AdvertInterval,
		Src:              n.Edge,
		Peers:            []netip.Addr{v.Peer(n).Edge},
		VIP:              v.VIP,
		Gateway:          v.Gateway,
		GatewayInterface: BackIf,
		TrackInterval:    v.cfg.TrackInterval,
		TrackFall:        v.cfg.TrackFall,
		TrackRise:        v.cfg.TrackRise,
	}
	if n == v.LB2 {
		k.Priority = 90
	}
	if v.cfg.TrackScript != nil {
		k.TrackScript = v.cfg.TrackScript(n)
	}
	if v.cfg.ReadyWatcher != nil {
		k.TrackFile = v.trackFile(n)
	}
	return k
}

// trackFile is the file balancer n's readiness watcher keeps.
func (v *VRRP) trackFile(n *Node) string {
	d := v.dir[n]
	if d == "" {
		panic("topo: no keepalived directory for " + n.Name)
	}
	return filepath.Join(d, "ready")
}

// KeepalivedConf returns the keepalived.conf text balancer n runs.
func (v *VRRP) KeepalivedConf(n *Node) string { return v.Keepalived(n).Conf() }

// StartKeepalived starts keepalived in balancer n (VRRP only, in the
// foreground, logging to its Lab log, with its pid files in a private
// /run). It fails the test if keepalived is already running there.
func (v *VRRP) StartKeepalived(n *Node) *netns.Proc {
	t := v.Lab.TB()
	t.Helper()
	v.mu.Lock()
	defer v.mu.Unlock()
	if p := v.kad[n]; p != nil {
		if exited, _ := p.Exited(); !exited {
			t.Fatalf("topo: keepalived already running in %s", n.Name)
		}
	}
	d := v.dir[n]
	if left := pidsNamed(n.NS, "keepalived"); len(left) > 0 {
		t.Fatalf("topo: keepalived pids %v already in %s", left, n.Name)
	}
	// A killed keepalived leaves its pid files; the new one would take a
	// pid that lives on (reused, or a zombie) for a running daemon.
	for _, f := range []string{"keepalived.pid", "vrrp.pid"} {
		if err := os.Remove(filepath.Join(d, "run", f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("topo: %v", err)
		}
	}
	if v.cfg.ReadyWatcher != nil { // v.mu is held
		args := append(v.cfg.ReadyWatcher(n), "--track-file", v.trackFile(n))
		v.watcher[n] = n.Start("ready-watcher-"+n.Name, netns.Spec{Args: args})
	}
	p := n.Start("keepalived-"+n.Name, netns.Spec{
		Args: []string{"keepalived",
			"--dont-fork", "--log-console", "--log-detail", "--no-syslog", "--vrrp",
			"--use-file", filepath.Join(d, "keepalived.conf"),
			"--pid", "/run/keepalived.pid", "--vrrp_pid", "/run/vrrp.pid"},
		Binds: []netns.Bind{netns.PrivateRun(filepath.Join(d, "run"))},
	})
	v.kad[n] = p
	return p
}

// KeepalivedProc returns the keepalived process of balancer n (nil if never
// started).
func (v *VRRP) KeepalivedProc(n *Node) *netns.Proc {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.kad[n]
}

// KillKeepalived kills keepalived in balancer n with SIGKILL (its parent
// and VRRP child together) and waits until no keepalived is left in n.
// Like a real SIGKILL it cleans nothing up: if n was master, the VIP and
// the gateway stay on its interfaces. The peer takes over within about
// three advert intervals and announces itself with gratuitous ARP, so the
// router and the backends follow it, but Master reports ErrSplitBrain
// until DropFloating(n) or a restarted keepalived (StartKeepalived, which
// removes them when it enters BACKUP) clears them.
func (v *VRRP) KillKeepalived(n *Node) {
	t := v.Lab.TB()
	t.Helper()
	v.mu.Lock()
	p := v.kad[n]
	v.mu.Unlock()
	if p == nil {
		t.Fatalf("topo: keepalived never started in %s", n.Name)
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	v.mu.Lock()
	w := v.watcher[n]
	v.mu.Unlock()
	if w != nil { // a dead node's watcher is dead too
		if err := w.Kill(); err != nil && !errors.Is(err, netns.ErrExited) {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		left := pidsNamed(n.NS, "keepalived")
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("topo: keepalived pids %v still in %s", left, n.Name)
		}
		for _, pid := range left { // a child that left the group
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case <-p.Done():
	case <-time.After(5 * time.Second):
		t.Fatalf("topo: keepalived in %s not reaped", n.Name)
	}
}

// StopKeepalived stops keepalived in balancer n with SIGTERM, the clean
// way: it releases the VIP (priority-0 advert, the peer takes over at
// once) before it exits.
func (v *VRRP) StopKeepalived(n *Node) {
	t := v.Lab.TB()
	t.Helper()
	v.mu.Lock()
	p := v.kad[n]
	v.mu.Unlock()
	if p == nil {
		t.Fatalf("topo: keepalived never started in %s", n.Name)
	}
	if err := p.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, netns.ErrExited) {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("topo: keepalived in %s did not stop on SIGTERM", n.Name)
	}
	v.mu.Lock()
	w := v.watcher[n]
	v.mu.Unlock()
	if w != nil { // StartKeepalived starts a new one
		if err := w.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, netns.ErrExited) {
			t.Fatal(err)
		}
		<-w.Done()
	}
}

// DropFloating removes the VIP and the gateway from balancer n if it holds
// them: what a dead host's addresses amount to after KillKeepalived.
func (v *VRRP) DropFloating(n *Node) {
	t := v.Lab.TB()
	t.Helper()
	for _, f := range []struct {
		ifname string
		a      netip.Addr
	}{{EdgeIf, v.VIP}, {BackIf, v.Gateway}} {
		has, err := hasAddr(n.NS, f.ifname, f.a)
		if err != nil {
			t.Fatal(err)
		}
		if has {
			n.NS.IP("addr", "del", f.a.String()+"/32", "dev", f.ifname)
		}
	}
}

// Holders returns the balancers that hold the VIP and those that hold the
// gateway address right now.
func (v *VRRP) Holders() (vip, gw []*Node, err error) {
	for _, n := range v.Balancers() {
		hv, err := hasAddr(n.NS, EdgeIf, v.VIP)
		if err != nil {
			return nil, nil, err
		}
		hg, err := hasAddr(n.NS, BackIf, v.Gateway)
		if err != nil {
			return nil, nil, err
		}
		if hv {
			vip = append(vip, n)
		}
		if hg {
			gw = append(gw, n)
		}
	}
	return vip, gw, nil
}

// Master returns the balancer that holds the VIP and the gateway now, or
// ErrNoMaster, ErrSplitBrain or ErrGatewayApart.
func (v *VRRP) Master() (*Node, error) {
	vip, gw, err := v.Holders()
	switch {
	case err != nil:
		return nil, err
	case len(vip) == 0:
		return nil, ErrNoMaster
	case len(vip) > 1:
		return nil, ErrSplitBrain
	case len(gw) != 1 || gw[0] != vip[0]:
		return nil, fmt.Errorf("%w: vip on %s, gateway on %v", ErrGatewayApart, vip[0].Name, names(gw))
	}
	return vip[0], nil
}

// WaitMaster polls Master every 10 ms until it names a node (any node if
// want is nil, else want) and returns it; it fails the test after timeout.
func (v *VRRP) WaitMaster(want *Node, timeout time.Duration) *Node {
	t := v.Lab.TB()
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		m, err := v.Master()
		if err == nil && (want == nil || m == want) {
			return m
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("master is %s", m.Name)
			}
			t.Fatalf("topo: no master%s within %v: %v", wantName(want), timeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Isolate cuts balancer or witness n off from the other cluster nodes: see
// the package function Isolate. Clients and backends still reach it, and
// VRRP adverts (unicast) are cut too, so isolating a balancer makes both
// balancers master (split brain) until Heal.
func (v *VRRP) Isolate(n *Node) { Isolate(n.NS, peerAddrs(n, v.Nodes())...) }

// Heal undoes Isolate.
func (v *VRRP) Heal(n *Node) { Heal(n.NS) }

func peerAddrs(n *Node, all []*Node) []netip.Addr {
	var a []netip.Addr
	for _, p := range all {
		if p != n {
			a = append(a, p.Addrs()...)
		}
	}
	return a
}

func names(ns []*Node) []string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = n.Name
	}
	return s
}

func wantName(n *Node) string {
	if n == nil {
		return ""
	}
	return " " + n.Name
}

// pidsNamed returns the pids of processes called comm inside ns.
func pidsNamed(ns *netns.NS, comm string) []int {
	out, _ := exec.Command("ip", "netns", "pids", ns.Name()).Output()
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + f + "/comm")
		if err == nil && strings.TrimSpace(string(b)) == comm {
			pids = append(pids, pid)
		}
	}
	return pids
}
