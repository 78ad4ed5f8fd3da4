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
		Long: `demo starts an ikelbd node in this process, three stand-in IKEv2 servers
(vpn-a, vpn-b, vpn-c on 127.0.0.11-13) and simulated VPN clients that send
IKE_SA_INIT to the "500" port and then IKE_AUTH, ESP and keepalives to the
"4500" port from a new source port, as a client behind NAT does. It prints
where each client landed, checks that none was split across servers, drains a
server, restarts the node and checks that every client keeps its server.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return runDemo(ctx, cmd.OutOrStdout(), demoOptions{clients: clients, shared: shared, hold: hold, verbose: verbose})
		},
	}
	cmd.Flags().IntVar(&clients, "clients", 200, "simulated clients, each with its own source IP")
	cmd.Flags().IntVar(&shared, "shared", 50, "extra simulated clients behind one NAT address (one IP, many ports)")
	cmd.Flags().BoolVar(&hold, "hold", false, "keep the node running after the demo (Ctrl-C to stop) to explore it with ikelbctl or grpcurl")
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "show the daemon's log")
	return cmd
}

type demoOptions struct {
	clients, shared int
	hold, verbose   bool
}

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
	logger := newLogger(logw, "info")

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

	dataDir, err := os.MkdirTemp("", "ikelb-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dataDir)
	cfg, err := demoConfig(dataDir, p500, p4500)
	if err != nil {
		return err
	}
	d, err := startDaemon(ctx, cfg, logger)
	if err != nil {
		return fmt.Errorf("start node: %w", err)
	}
	defer func() {
		if d != nil {
			d.Close()
		}
	}()
	say("started ikelbd node %q: admin API on %s, data in %s", cfg.Node, d.AdminAddr, dataDir)

	admin, closeAdmin, err := dialAdmin(d.AdminAddr.String())
	if err != nil {
		return err
	}
	defer func() { closeAdmin() }()
	if err := waitHealthy(ctx, admin, "vpn", len(demoBackends)); err != nil {
		return err
	}
	say("service \"vpn\" committed; IKEv2 health probes report all three servers up")

	vip := netip.MustParseAddr(demoVIP)
	sim := ikesim.Options{VIP: vip, IKEPort: p500, NATTPort: p4500, Fragments: 2, ESP: 3, Keepalives: 1, Concurrency: 32}

	// 1. Clients with their own addresses, and clients behind one NAT.
	say("\n== %d clients with their own IP, %d behind one NAT IP: IKE_SA_INIT on %d, then IKE_AUTH (2 fragments), ESP and a keepalive on %d from a new source port", o.clients, o.shared, p500, p4500)
	own := sim
	own.Clients, own.SourceBase = o.clients, netip.MustParseAddr("127.1.0.0")
	natted := sim
	natted.Clients, natted.SourceBase, natted.SharedSource = o.shared, netip.MustParseAddr("127.2.0.1"), true
	first, err := runClients(ctx, own, natted)
	if err != nil {
		return err
	}
	printLanding(out, first, 6)
	checks := []check{{"no client split across servers", first.split == 0 && first.failed == 0,
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
	checks = append(checks,
		check{"existing clients keep their server while it drains", kept == o.clients && again.split == 0,
			fmt.Sprintf("%d of %d on the same server as before", kept, o.clients)},
		check{"no new client lands on the drained server", newcomers.byServer["vpn-a"] == 0 && newcomers.split == 0 && newcomers.failed == 0,
			fmt.Sprintf("%d new clients on vpn-a", newcomers.byServer["vpn-a"])})

	// 3. Restart the node on the same data dir.
	say("\n== restart the node (stop, start on the same data dir): the table comes back from Raft's log and snapshot")
	if err := waitAffinities(ctx, admin, len(before)+o.clients); err != nil {
		return err
	}
	committed, err := affinityMap(ctx, admin)
	if err != nil {
		return err
	}
	closeAdmin()
	if err := d.Close(); err != nil {
		return fmt.Errorf("stop node: %w", err)
	}
	d = nil
	if d, err = startDaemon(ctx, cfg, logger); err != nil {
		return fmt.Errorf("restart node: %w", err)
	}
	if admin, closeAdmin, err = dialAdmin(d.AdminAddr.String()); err != nil {
		return err
	}
	if err := waitAffinities(ctx, admin, len(committed)); err != nil {
		return err
	}
	after, err := affinityMap(ctx, admin)
	if err != nil {
		return err
	}
	same := 0
	for k, v := range committed {
		if after[k] == v {
			same++
		}
	}
	say("affinities after restart: %d, identical to before: %d of %d", len(after), same, len(committed))
	back, err := runClients(ctx, own)
	if err != nil {
		return err
	}
	checks = append(checks,
		check{"every committed affinity survives the restart", same == len(committed), fmt.Sprintf("%d of %d", same, len(committed))},
		check{"clients reconnecting after the restart reach their server", sameBackends(back.rep, before) == o.clients && back.split == 0,
			fmt.Sprintf("%d of %d", sameBackends(back.rep, before), o.clients)})

	say("\n== result")
	failed := 0
	for _, c := range checks {
		mark := "ok  "
		if !c.ok {
			mark, failed = "FAIL", failed+1
		}
		say("%s %s (%s)", mark, c.what, c.detail)
	}
	say("\nexplore: ikelbctl --addr %s affinity list --service vpn | grpcurl -plaintext %s list", d.AdminAddr, d.AdminAddr)
	if o.hold {
		say("holding; Ctrl-C to stop")
		<-ctx.Done()
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d checks failed", failed, len(checks))
	}
	return nil
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

func demoConfig(dataDir string, p500, p4500 uint16) (*Config, error) {
	cfg, err := LoadConfig("")
	if err != nil {
		return nil, err
	}
	cfg.Node = "demo-1"
	cfg.DataDir = dataDir
	cfg.AdminAddress = "127.0.0.1:0"
	if l, err := net.Listen("tcp", "127.0.0.1:7450"); err == nil {
		l.Close()
		cfg.AdminAddress = "127.0.0.1:7450"
	}
	cfg.MetricsAddress = "127.0.0.1:0"
	cfg.Raft.BindAddress = "127.0.0.1:0"
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
	cfg.Services = []spec.Service{svc}
	return cfg, cfg.Validate()
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
