package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/ikelb/ikelb/cmd/internal/spec"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	"github.com/ikelb/ikelb/test/ikesim"
)

// The demo runs everything on loopback (Linux routes all of 127/8 to lo), so
// it needs no root: ports 500/4500 are replaced by two free high ports.
const (
	demoVIP = "127.0.0.1"
)

var demoBackends = []struct{ name, addr string }{
	{"vpn-a", "127.0.0.11"},
	{"vpn-b", "127.0.0.12"},
	{"vpn-c", "127.0.0.13"},
}

func newDemoCmd() *cobra.Command {
	var (
		clients int
		shared  int
		hold    bool
		verbose bool
	)
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run a self-contained demonstration on loopback (no root needed)",
		Long: `demo starts a three-node ikelb cluster in this process, three stand-in
IKEv2 servers (vpn-a, vpn-b, vpn-c on 127.0.0.11-13) and simulated VPN clients
that send IKE_SA_INIT to the "500" port and then IKE_AUTH, ESP and keepalives
to the "4500" port from a new source port, as a client behind NAT does. All
three nodes listen on the VIP with SO_REUSEPORT, so the kernel spreads the
clients' flows over them as an ECMP router would: the two halves of one client
often reach different nodes. It prints where each client landed and checks
that none was split, drains a server, stops the Raft leader during live
sessions and checks that every client keeps its server, then restarts the
stopped node and checks that it caught up.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return runDemo(ctx, cmd.OutOrStdout(), demoOptions{clients: clients, shared: shared, hold: hold, verbose: verbose})
		},
	}
	cmd.Flags().IntVar(&clients, "clients", 200, "simulated clients, each with its own source IP")
	cmd.Flags().IntVar(&shared, "shared", 50, "extra simulated clients behind one NAT address (one IP, many ports)")
	cmd.Flags().BoolVar(&hold, "hold", false, "keep the cluster running after the demo (Ctrl-C to stop) to explore it with ikelbctl or grpcurl")
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "show the nodes' logs")
	return cmd
}

type demoOptions struct {
	clients, shared int
	hold, verbose   bool
}

// demoNode is one node of the demo cluster.
type demoNode struct {
	cfg *Config
	d   *daemon
}

func (n *demoNode) name() string { return n.cfg.Node }

func runDemo(ctx context.Context, out io.Writer, o demoOptions) (err error) {
	if o.clients < 1 || o.clients > 20000 {
		return fmt.Errorf("--clients: must be 1..20000, got %d", o.clients)
	}
	if o.shared < 0 || o.shared > 5000 {
		return fmt.Errorf("--shared: must be 0..5000, got %d", o.shared)
	}
	say := func(format string, args ...any) { fmt.Fprintf(out, format+"\n", args...) }
	logw := io.Discard
	if o.verbose {
		logw = os.Stderr
	}

	ports, err := freeUDPPorts(2, append([]string{demoVIP}, backendAddrs()...)...)
	if err != nil {
		return err
	}
	p500, p4500 := uint16(ports[0]), uint16(ports[1])
	say("ikelb demo: VIP %s, IKE port %d (stands for 500), NAT-T port %d (stands for 4500)", demoVIP, p500, p4500)

	// Stand-in IKEv2 servers.
	var responders []*ikesim.Responder
	defer func() {
		for _, r := range responders {
			r.Close()
		}
	}()
	for _, b := range demoBackends {
		r, err := ikesim.Listen(b.name, net.JoinHostPort(b.addr, fmt.Sprint(p500)), net.JoinHostPort(b.addr, fmt.Sprint(p4500)))
		if err != nil {
			return fmt.Errorf("start stand-in server %s: %w", b.name, err)
		}
		responders = append(responders, r)
	}
	say("started stand-in IKEv2 servers: vpn-a 127.0.0.11, vpn-b 127.0.0.12, vpn-c 127.0.0.13")

	// The cluster: three nodes on loopback, node 1 bootstraps, 2 and 3 join it.
	dataRoot, err := os.MkdirTemp("", "ikelb-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dataRoot)
	var nodes []*demoNode
	defer func() {
		for _, n := range nodes {
			if n.d != nil {
				n.d.Close()
			}
		}
	}()
	for i := range 3 {
		cfg, err := demoConfig(filepath.Join(dataRoot, fmt.Sprintf("node%d", i+1)), i, p500, p4500, nodes)
		if err != nil {
			return err
		}
		n := &demoNode{cfg: cfg}
		logger := newLogger(logw, "info")
		if n.d, err = startDaemonWith(ctx, cfg, logger, daemonOptions{reusePort: true}); err != nil {
			return fmt.Errorf("start node %s: %w", cfg.Node, err)
		}
		nodes = append(nodes, n)
		say("started node %s: admin API on %s, gossip %s", cfg.Node, n.d.AdminAddr, cfg.Cluster.GossipAddress)
	}
	admin, closeAdmin, err := dialAdmin(nodes[0].d.AdminAddr.String())
	if err != nil {
		return err
	}
	defer func() { closeAdmin() }()
	if err := waitCluster(ctx, nodes, 3); err != nil {
		return err
	}
	if err := waitHealthy(ctx, admin, "vpn", len(demoBackends)); err != nil {
		return err
	}
	say("one Raft cluster of 3 voters; service \"vpn\" committed; IKEv2 health probes report all three servers up")
	say("every node listens on %s:%d and :%d with SO_REUSEPORT: the kernel spreads client flows over the nodes like an ECMP router", demoVIP, p500, p4500)

	vip := netip.MustParseAddr(demoVIP)
	sim := ikesim.Options{VIP: vip, IKEPort: p500, NATTPort: p4500, Fragments: 2, ESP: 3, Keepalives: 1, Concurrency: 32}

	// 1. Clients with their own addresses, and clients behind one NAT.
	say("\n== %d clients with their own IP, %d behind one NAT IP: IKE_SA_INIT on %d, then IKE_AUTH (2 fragments), ESP and a keepalive on %d from a new source port", o.clients, o.shared, p500, p4500)
	own := sim
	own.Clients, own.SourceBase = o.clients, netip.MustParseAddr("127.1.0.0")
	natted := sim
	natted.Clients, natted.SourceBase, natted.SharedSource = o.shared, netip.MustParseAddr("127.2.0.1"), true
	before0 := nodePackets(nodes)
	first, err := runClients(ctx, own, natted)
	if err != nil {
		return err
	}
	printLanding(out, first, 6)
	per := nodePackets(nodes)
	var parts []string
	for i, n := range nodes {
		parts = append(parts, fmt.Sprintf("%s %d", n.name(), per[i]-before0[i]))
	}
	say("datagrams forwarded per node: %s", strings.Join(parts, ", "))
	checks := []check{{"no client split across servers, whichever node got each half", first.split == 0 && first.failed == 0,
		fmt.Sprintf("%d clients, %d split, %d failed", first.total, first.split, first.failed)}}
	if first.failed > 0 {
		printErrors(out, first.rep)
	}
	if err := waitAffinities(ctx, admin, o.clients+min(o.shared, 1)); err != nil {
		return err
	}
	before, err := affinityMap(ctx, admin)
	if err != nil {
		return err
	}
	say("committed affinities: %d (one per client IP: the %d clients behind one NAT share one)", len(before), o.shared)

	// 2. Drain vpn-a: its clients stay, new clients go elsewhere.
	say("\n== drain vpn-a (ikelbctl backend drain vpn 127.0.0.11), then the same clients reconnect and %d new ones arrive", o.clients)
	if _, err := admin.SetBackend(ctx, &ikelbv1.SetBackendRequest{Service: "vpn", Address: "127.0.0.11", State: ikelbv1.BackendState_BACKEND_STATE_DRAIN}); err != nil {
		return fmt.Errorf("drain: %w", err)
	}
	again, err := runClients(ctx, own)
	if err != nil {
		return err
	}
	kept := sameBackends(again.rep, before)
	fresh := own
	fresh.SourceBase = netip.MustParseAddr("127.3.0.0")
	newcomers, err := runClients(ctx, fresh)
	if err != nil {
		return err
	}
	printLanding(out, newcomers, 0)
	for _, l := range []landing{again, newcomers} {
		if l.failed > 0 {
			printErrors(out, l.rep)
		}
	}
	checks = append(checks,
		check{"existing clients keep their server while it drains", kept == o.clients && again.split == 0,
			fmt.Sprintf("%d of %d on the same server as before", kept, o.clients)},
		check{"no new client lands on the drained server", newcomers.byServer["vpn-a"] == 0 && newcomers.split == 0 && newcomers.failed == 0,
			fmt.Sprintf("%d new clients on vpn-a", newcomers.byServer["vpn-a"])})
	if _, err := admin.SetBackend(ctx, &ikelbv1.SetBackendRequest{Service: "vpn", Address: "127.0.0.11", State: ikelbv1.BackendState_BACKEND_STATE_ACTIVE}); err != nil {
		return fmt.Errorf("undrain: %w", err)
	}
	if err := waitAffinities(ctx, admin, len(before)+o.clients); err != nil {
		return err
	}
	committed, err := affinityMap(ctx, admin)
	if err != nil {
		return err
	}

	// 3. Lose the leader while clients are connected.
	leader := leaderNode(nodes)
	if leader < 0 {
		return errors.New("no leader")
	}
	sessions := min(o.clients, 100)
	say("\n== %d clients stay connected (DPD, ESP and keepalives every 100 ms); the leader, %s, is stopped mid-session without leaving the cluster", sessions, nodes[leader].name())
	sess := own
	sess.Clients = sessions
	type sessOut struct {
		res []ikesim.SessionResult
		err error
	}
	done := make(chan sessOut, 1)
	go func() {
		r, err := ikesim.RunSessions(ctx, sess, 100*time.Millisecond, 4*time.Second)
		done <- sessOut{r, err}
	}()
	select {
	case <-time.After(1500 * time.Millisecond):
	case <-ctx.Done():
		return ctx.Err()
	}
	stoppedAt := time.Now()
	if leader == 0 {
		closeAdmin()
	}
	if err := nodes[leader].d.Close(); err != nil {
		return fmt.Errorf("stop %s: %w", nodes[leader].name(), err)
	}
	nodes[leader].d = nil
	survivors := []*demoNode{}
	for i, n := range nodes {
		if i != leader {
			survivors = append(survivors, n)
		}
	}
	if err := waitCluster(ctx, survivors, 0); err != nil {
		return err
	}
	newLeader := nodes[leaderNode(nodes)].name()
	say("%s stopped; %s leads after %v", nodes[leader].name(), newLeader, time.Since(stoppedAt).Round(10*time.Millisecond))
	so := <-done
	if so.err != nil {
		return so.err
	}
	keptAll, maxGap := 0, time.Duration(0)
	for _, r := range so.res {
		if r.Kept() && addrToName[committed[r.IKESource.Addr().String()]] == r.IKEResponder {
			keptAll++
		}
		maxGap = max(maxGap, r.MaxGap)
	}
	say("clients answered by their own server throughout: %d of %d; longest gap a client saw: %v", keptAll, sessions, maxGap.Round(time.Millisecond))
	checks = append(checks, check{"losing the leader moves no client to another server", keptAll == sessions,
		fmt.Sprintf("%d of %d kept their server", keptAll, sessions)})

	// 4. The stopped node comes back and catches up.
	say("\n== %s restarts on its data dir and catches up", nodes[leader].name())
	if nodes[leader].d, err = startDaemonWith(ctx, nodes[leader].cfg, newLogger(logw, "info"), daemonOptions{reusePort: true}); err != nil {
		return fmt.Errorf("restart %s: %w", nodes[leader].name(), err)
	}
	if leader == 0 {
		if admin, closeAdmin, err = dialAdmin(nodes[0].d.AdminAddr.String()); err != nil {
			return err
		}
	}
	same, total := 0, 0
	if err := poll(ctx, "the restarted node's table", func(ctx context.Context) (bool, string, error) {
		c, cl, err := dialAdmin(nodes[leader].d.AdminAddr.String())
		if err != nil {
			return false, "", err
		}
		defer cl()
		m, err := affinityMap(ctx, c)
		if err != nil {
			return false, err.Error(), nil
		}
		same, total = 0, len(committed)
		for k, v := range committed {
			if m[k] == v {
				same++
			}
		}
		return same == total, fmt.Sprintf("%d of %d", same, total), nil
	}); err != nil {
		return err
	}
	say("%s has %d of the %d committed affinities", nodes[leader].name(), same, total)
	checks = append(checks, check{"the restarted node has every committed affinity", same == total, fmt.Sprintf("%d of %d", same, total)})

	say("\n== result")
	failed := 0
	for _, c := range checks {
		mark := "ok  "
		if !c.ok {
			mark, failed = "FAIL", failed+1
		}
		say("%s %s (%s)", mark, c.what, c.detail)
	}
	a := nodes[0].d.AdminAddr
	say("\nexplore (with --hold, while the cluster runs):\n  ikelbctl --addr %s cluster status\n  ikelbctl --addr %s affinity list --service vpn\n  grpcurl -plaintext %s list", a, a, a)
	if o.hold {
		say("holding; Ctrl-C to stop")
		<-ctx.Done()
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d checks failed", failed, len(checks))
	}
	return nil
}

// nodePackets returns each running node's forwarded client datagrams.
func nodePackets(nodes []*demoNode) []uint64 {
	out := make([]uint64, len(nodes))
	for i, n := range nodes {
		if n.d == nil || n.d.engine == nil {
			continue
		}
		for _, c := range n.d.engine.Counters() {
			out[i] += c.Packets
		}
	}
	return out
}

// leaderNode returns the index of the running node that leads, or -1.
func leaderNode(nodes []*demoNode) int {
	for i, n := range nodes {
		if n.d != nil && n.d.node.IsLeader() {
			return i
		}
	}
	return -1
}

// waitCluster waits until one of the given nodes leads and the others
// know it and, with voters > 0, the configuration has that many voters.
func waitCluster(ctx context.Context, nodes []*demoNode, voters int) error {
	return poll(ctx, "the cluster", func(ctx context.Context) (bool, string, error) {
		leader := leaderNode(nodes)
		if leader < 0 {
			return false, "no leader among the running nodes yet", nil
		}
		addr := nodes[leader].d.node.RaftAddr()
		for _, n := range nodes {
			if st := n.d.node.Status(); st.Leader != addr {
				return false, n.name() + " does not follow the new leader yet", nil
			}
		}
		if voters == 0 {
			return true, "", nil
		}
		ms, err := nodes[0].d.node.ClusterStatus(ctx)
		if err != nil {
			return false, err.Error(), nil
		}
		n := 0
		for _, m := range ms {
			if m.Suffrage == "Voter" {
				n++
			}
		}
		return n == voters, fmt.Sprintf("%d of %d voters", n, voters), nil
	})
}

type check struct {
	what   string
	ok     bool
	detail string
}

func backendAddrs() []string {
	var s []string
	for _, b := range demoBackends {
		s = append(s, b.addr)
	}
	return s
}

func demoConfig(dataDir string, i int, p500, p4500 uint16, earlier []*demoNode) (*Config, error) {
	cfg, err := LoadConfig("")
	if err != nil {
		return nil, err
	}
	cfg.Node = fmt.Sprintf("demo-%d", i+1)
	cfg.DataDir = dataDir
	cfg.AdminAddress = "127.0.0.1:0"
	if i == 0 {
		if l, err := net.Listen("tcp", "127.0.0.1:7450"); err == nil {
			l.Close()
			cfg.AdminAddress = "127.0.0.1:7450"
		}
	}
	cfg.MetricsAddress = ""
	cfg.Raft.BindAddress = fmt.Sprintf("127.0.0.1:%d", freeTCPPort())
	cfg.Cluster.GossipAddress = fmt.Sprintf("127.0.0.1:%d", freeTCPPort())
	cfg.Cluster.DeadServerTimeout = time.Minute
	if len(earlier) > 0 {
		cfg.Cluster.Join = []string{earlier[0].cfg.Cluster.GossipAddress}
	}
	svc := spec.Service{
		Name:               "vpn",
		VIP:                demoVIP,
		Ports:              []uint16{p500, p4500},
		PersistenceTimeout: time.Hour,
		ForwardingMode:     "nat",
		HealthCheck:        &spec.HealthCheck{Type: "ikev2", Port: p500, Interval: time.Second, Timeout: 500 * time.Millisecond, Rise: 1, Fall: 2},
	}
	for _, b := range demoBackends {
		svc.Backends = append(svc.Backends, spec.Backend{Address: b.addr, Weight: 100, State: "active"})
	}
	if i == 0 {
		cfg.Services = []spec.Service{svc}
	}
	return cfg, cfg.Validate()
}

// freeTCPPort returns a TCP port free on 127.0.0.1 now (gossip also uses
// UDP on it; a clash shows up as a start error).
func freeTCPPort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func dialAdmin(addr string) (ikelbv1.AdminServiceClient, func(), error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, err
	}
	return ikelbv1.NewAdminServiceClient(conn), func() { conn.Close() }, nil
}

// poll calls f every 100ms until it returns true or an error, or 15s pass.
func poll(ctx context.Context, what string, f func(context.Context) (bool, string, error)) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	last := ""
	for {
		ok, detail, err := f(ctx)
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		last = detail
		select {
		case <-ctx.Done():
			return fmt.Errorf("timed out waiting for %s (%s)", what, last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func waitHealthy(ctx context.Context, admin ikelbv1.AdminServiceClient, svc string, n int) error {
	return poll(ctx, "healthy backends", func(ctx context.Context) (bool, string, error) {
		h, err := admin.GetHealth(ctx, &ikelbv1.GetHealthRequest{Service: svc})
		if err != nil {
			return false, err.Error(), nil
		}
		up := 0
		for _, b := range h.Backends {
			if b.Health == ikelbv1.BackendHealth_BACKEND_HEALTH_UP {
				up++
			}
		}
		return up == n, fmt.Sprintf("%d of %d up", up, n), nil
	})
}

func waitAffinities(ctx context.Context, admin ikelbv1.AdminServiceClient, n int) error {
	return poll(ctx, "committed affinities", func(ctx context.Context) (bool, string, error) {
		st, err := admin.GetNodeStatus(ctx, &ikelbv1.GetNodeStatusRequest{})
		if err != nil {
			return false, err.Error(), nil
		}
		return int(st.Affinities) >= n, fmt.Sprintf("%d of %d", st.Affinities, n), nil
	})
}

// affinityMap returns client → backend for service vpn.
func affinityMap(ctx context.Context, admin ikelbv1.AdminServiceClient) (map[string]string, error) {
	m := map[string]string{}
	token := ""
	for {
		resp, err := admin.ListAffinities(ctx, &ikelbv1.ListAffinitiesRequest{Service: "vpn", PageSize: 10000, PageToken: token})
		if err != nil {
			return nil, fmt.Errorf("list affinities: %w", err)
		}
		for _, a := range resp.Affinities {
			m[a.Client] = a.Backend
		}
		if token = resp.NextPageToken; token == "" {
			return m, nil
		}
	}
}

type landing struct {
	rep                  []ikesim.Result
	total, split, failed int
	byServer             map[string]int
}

func runClients(ctx context.Context, sets ...ikesim.Options) (landing, error) {
	l := landing{byServer: map[string]int{}}
	for _, o := range sets {
		if o.Clients == 0 {
			continue
		}
		rep, err := ikesim.Run(ctx, o)
		if err != nil {
			return l, err
		}
		l.rep = append(l.rep, rep.Results...)
		l.split += rep.Split
		l.failed += rep.Failed
		l.total += len(rep.Results)
	}
	for _, r := range l.rep {
		if r.Err == nil && !r.Split {
			l.byServer[r.IKEResponder]++
		}
	}
	return l, nil
}

var addrToName = func() map[string]string {
	m := map[string]string{}
	for _, b := range demoBackends {
		m[b.addr] = b.name
	}
	return m
}()

// sameBackends counts results whose server is the one committed before.
func sameBackends(rs []ikesim.Result, committed map[string]string) int {
	n := 0
	for _, r := range rs {
		if r.Err != nil || r.Split {
			continue
		}
		if addrToName[committed[r.IKESource.Addr().String()]] == r.IKEResponder && r.NATTResponder == r.IKEResponder {
			n++
		}
	}
	return n
}

func printLanding(out io.Writer, l landing, rows int) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	if rows > 0 {
		fmt.Fprintln(tw, "CLIENT (IKE SOURCE)\tNAT-T SOURCE\tSERVER ON IKE PORT\tSERVER ON NAT-T PORT\tESP ECHOED")
		for i, r := range l.rep {
			if len(l.rep) > rows && i >= rows/2 && i < len(l.rep)-rows/2 {
				if i == rows/2 {
					fmt.Fprintf(tw, "… %d more …\t\t\t\t\n", len(l.rep)-rows)
				}
				continue
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\n", r.IKESource, r.NATTSource, r.IKEResponder, r.NATTResponder, r.ESPEchoed)
		}
		tw.Flush()
	}
	names := make([]string, 0, len(l.byServer))
	for n := range l.byServer {
		names = append(names, n)
	}
	sort.Strings(names)
	parts := []string{}
	for _, n := range names {
		parts = append(parts, fmt.Sprintf("%s %d", n, l.byServer[n]))
	}
	fmt.Fprintf(out, "landed: %s; split across servers: %d; failed: %d\n", strings.Join(parts, ", "), l.split, l.failed)
}

func printErrors(out io.Writer, rs []ikesim.Result) {
	shown := 0
	for _, r := range rs {
		if r.Err != nil && shown < 5 {
			fmt.Fprintf(out, "  client %s: %v\n", r.IKESource, r.Err)
			shown++
		}
	}
}

// freeUDPPorts returns n UDP ports free on every one of ips.
func freeUDPPorts(n int, ips ...string) ([]int, error) {
	var ports []int
	for attempt := 0; len(ports) < n && attempt < 200; attempt++ {
		c, err := net.ListenPacket("udp", net.JoinHostPort(ips[0], "0"))
		if err != nil {
			return nil, err
		}
		p := c.LocalAddr().(*net.UDPAddr).Port
		ok := true
		held := []net.PacketConn{c}
		for _, ip := range ips[1:] {
			o, err := net.ListenPacket("udp", net.JoinHostPort(ip, fmt.Sprint(p)))
			if err != nil {
				ok = false
				break
			}
			held = append(held, o)
		}
		for _, h := range held {
			h.Close()
		}
		for _, q := range ports {
			ok = ok && q != p
		}
		if ok {
			ports = append(ports, p)
		}
	}
	if len(ports) < n {
		return nil, errors.New("no free UDP ports on loopback")
	}
	return ports, nil
}
