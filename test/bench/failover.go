package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	"github.com/ikelb/ikelb/test/netns"
	"github.com/ikelb/ikelb/test/topo"
	"google.golang.org/protobuf/encoding/protojson"
)

// nodeAdmin is ikelbd's admin address inside each node's namespace.
const nodeAdmin = "127.0.0.1:7450"

// FailoverBinaries are the programs the failover suite runs.
type FailoverBinaries struct {
	Ikelbd, Ikelbctl, Ikesim string
}

// BuildFailoverBinaries builds ikelbd, ikelbctl and ikesim into dir.
func BuildFailoverBinaries(ctx context.Context, dir string) (FailoverBinaries, error) {
	b := FailoverBinaries{
		Ikelbd: filepath.Join(dir, "ikelbd"), Ikelbctl: filepath.Join(dir, "ikelbctl"), Ikesim: filepath.Join(dir, "ikesim"),
	}
	for out, pkg := range map[string]string{b.Ikelbd: "./cmd/ikelbd", b.Ikelbctl: "./cmd/ikelbctl", b.Ikesim: "./test/ikesim/cmd/ikesim"} {
		cmd := exec.CommandContext(ctx, "go", "build", "-o", out, pkg)
		cmd.Dir = RepoRoot()
		if o, err := cmd.CombinedOutput(); err != nil {
			return b, fmt.Errorf("go build %s: %v: %s", pkg, err, firstLines(string(o), 10))
		}
	}
	return b, nil
}

// FailoverConfig sets the failover suite.
type FailoverConfig struct {
	Bin FailoverBinaries
	// Clients is the number of ikesim sessions, each from its own address.
	Clients int
	// Interval is the sessions' check interval (DPD, ESP and keepalives):
	// the resolution of the measured gap.
	Interval time.Duration
	// Repeats per shape.
	Repeats int
	// Shapes to run: "vrrp" (whole node dies: ikelbd and keepalived
	// SIGKILLed), "vrrp-process" (only ikelbd SIGKILLed: the track script
	// moves the VIP), "anycast" (the leader's ikelbd SIGKILLed and its route
	// withdrawn at once).
	Shapes []string
}

// DefaultFailover: three shapes, three repeats, 100 clients checking every
// 20 ms. About 6 minutes.
func DefaultFailover(bin FailoverBinaries) FailoverConfig {
	return FailoverConfig{Bin: bin, Clients: 100, Interval: 20 * time.Millisecond, Repeats: 3,
		Shapes: []string{"vrrp", "vrrp-process", "anycast"}}
}

// FailoverRun is one kill.
type FailoverRun struct {
	Shape  string `json:"shape"`
	Victim string `json:"victim"`
	// Clients that reported; Affected had a gap longer than 5 check
	// intervals (their traffic went through the victim).
	Clients  int `json:"clients"`
	Affected int `json:"affected"`
	// Longest gap without an answer per client, over all clients and
	// over the affected ones.
	GapP50ms     float64 `json:"gap_p50_ms"`
	GapMaxms     float64 `json:"gap_max_ms"`
	AffectedP50  float64 `json:"affected_gap_p50_ms"`
	AffectedMax  float64 `json:"affected_gap_max_ms"`
	Committed    int     `json:"committed"`  // clients with a committed affinity before the kill
	OnBackend    int     `json:"on_backend"` // of those, answered by their committed backend throughout
	OnBackendPct float64 `json:"on_backend_pct"`
	Errors       int     `json:"errors"` // sessions that failed to connect
	VIPMovedMs   float64 `json:"vip_moved_ms,omitempty"`
	Reason       string  `json:"reason,omitempty"`
}

// FailoverReport is the failover suite's output.
type FailoverReport struct {
	Suite   string        `json:"suite"`
	Started time.Time     `json:"started"`
	Took    time.Duration `json:"took_ns"`
	Machine Machine       `json:"machine"`
	Setup   string        `json:"setup"`
	Runs    []FailoverRun `json:"runs"`
}

// sessionLine is one line of `ikesim sessions` output.
type sessionLine struct {
	Client        string   `json:"client"`
	IKEResponder  string   `json:"ike_responder"`
	NATTResponder string   `json:"natt_responder"`
	Servers       []string `json:"servers"`
	Kept          bool     `json:"kept"`
	Checks        int      `json:"checks"`
	Answered      int      `json:"answered"`
	MaxGapMS      float64  `json:"max_gap_ms"`
	Err           string   `json:"err"`
}

// lbProc is ikelbd in one node's namespace.
type lbProc struct {
	node *topo.Node
	cfg  string
	proc *netns.Proc
}

// failoverNodeConfig is one node's ikelbd.yaml, as in test/e2e: the first
// node has no join addresses (it bootstraps), the others join it.
func failoverNodeConfig(n *topo.Node, role, dataDir string, first *topo.Node, vip netip.Addr, backends []*topo.Backend) string {
	join := ""
	if n != first {
		join = fmt.Sprintf("%s:7946", first.Edge)
	}
	var backs []string
	for _, b := range backends {
		backs = append(backs, b.Addr.String())
	}
	return fmt.Sprintf(`node: %s
data_dir: %s
admin_address: 0.0.0.0:7450
metrics_address: 127.0.0.1:7451
log_level: info
raft:
  bind_address: %s:7452
cluster:
  role: %s
  gossip_address: %s:7946
  join: [%s]
  dead_server_timeout: 60s
services:
  - name: vpn
    vip: %s
    ports: [500, 4500]
    persistence_timeout: 1h
    forwarding_mode: nat
    health_check: {type: ikev2, interval: 1s, timeout: 500ms, rise: 1, fall: 3}
    backends: [%s]
`, n.Name, dataDir, n.Edge, role, n.Edge, join, vip, strings.Join(backs, ", "))
}

type failoverLab struct {
	cfg      FailoverConfig
	lab      *netns.Lab
	nodes    []*lbProc
	backends []*topo.Backend
	vip      netip.Addr
}

func (f *failoverLab) startNodes(nodes []*topo.Node, roles map[string]string) {
	for _, n := range nodes {
		role := roles[n.Name]
		if role == "" {
			role = "voter"
		}
		dir := f.lab.MkDir("ikelbd-" + n.Name)
		cfg := filepath.Join(dir, "ikelbd.yaml")
		if err := os.WriteFile(cfg, []byte(failoverNodeConfig(n, role, filepath.Join(dir, "data"), nodes[0], f.vip, f.backends)), 0o600); err != nil {
			panic(err)
		}
		p := &lbProc{node: n, cfg: cfg}
		p.proc = f.lab.Start(n.NS, "ikelbd-"+n.Name, f.cfg.Bin.Ikelbd, "--config", cfg)
		f.nodes = append(f.nodes, p)
	}
}

// ctl runs ikelbctl in n's namespace.
func (f *failoverLab) ctl(ctx context.Context, n *topo.Node, args ...string) (string, error) {
	full := append(n.Exec(), append([]string{f.cfg.Bin.Ikelbctl, "--addr", nodeAdmin, "--timeout", "3s"}, args...)...)
	cmd := exec.CommandContext(ctx, full[0], full[1:]...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func (f *failoverLab) status(ctx context.Context, n *topo.Node) (*ikelbv1.GetNodeStatusResponse, error) {
	out, err := f.ctl(ctx, n, "status", "-o", "json")
	if err != nil {
		return nil, fmt.Errorf("%v: %s", err, out)
	}
	st := &ikelbv1.GetNodeStatusResponse{}
	if err := protojson.Unmarshal([]byte(out), st); err != nil {
		return nil, fmt.Errorf("status json: %v: %s", err, firstLines(out, 3))
	}
	return st, nil
}

// waitReady waits until every running node knows a leader, is not
// degraded and has the service.
func (f *failoverLab) waitReady(ctx context.Context, timeout time.Duration) error {
	var last string
	err := pollUntil(ctx, timeout, 100*time.Millisecond, func() bool {
		for _, p := range f.nodes {
			if exited, _ := p.proc.Exited(); exited {
				last = p.node.Name + " exited: " + lastLine(p.proc.Log())
				return false
			}
			st, err := f.status(ctx, p.node)
			if err != nil {
				last = p.node.Name + ": " + err.Error()
				return false
			}
			if st.Leader == "" || st.Degraded || st.Services == 0 {
				last = fmt.Sprintf("%s: leader %q degraded %v services %d", p.node.Name, st.Leader, st.Degraded, st.Services)
				return false
			}
		}
		return true
	})
	if err != nil {
		return fmt.Errorf("nodes not ready: %w (%s)", err, last)
	}
	return nil
}

// table returns n's committed affinities: client address → backend address.
func (f *failoverLab) table(ctx context.Context, n *topo.Node) (map[string]string, error) {
	out, err := f.ctl(ctx, n, "affinity", "list", "--service", "vpn", "--all", "-o", "json")
	if err != nil {
		return nil, fmt.Errorf("%v: %s", err, out)
	}
	resp := &ikelbv1.ListAffinitiesResponse{}
	if err := protojson.Unmarshal([]byte(out), resp); err != nil {
		return nil, fmt.Errorf("affinity json: %v", err)
	}
	m := map[string]string{}
	for _, a := range resp.Affinities {
		m[a.Client] = a.Backend
	}
	return m, nil
}

// waitCommitted waits until every running node has the same table with at
// least want entries and returns it.
func (f *failoverLab) waitCommitted(ctx context.Context, want int, timeout time.Duration) (map[string]string, error) {
	var ref map[string]string
	var why string
	err := pollUntil(ctx, timeout, 200*time.Millisecond, func() bool {
		ref = nil
		for _, p := range f.nodes {
			m, err := f.table(ctx, p.node)
			if err != nil {
				why = err.Error()
				return false
			}
			if len(m) < want {
				why = fmt.Sprintf("%s has %d of %d", p.node.Name, len(m), want)
				return false
			}
			if ref == nil {
				ref = m
			} else if len(ref) != len(m) {
				why = "tables differ"
				return false
			}
		}
		return true
	})
	if err != nil {
		return nil, fmt.Errorf("affinities not committed everywhere: %w (%s)", err, why)
	}
	return ref, nil
}

// leader returns the node the cluster names as leader.
func (f *failoverLab) leader(ctx context.Context) (*lbProc, error) {
	st, err := f.status(ctx, f.nodes[0].node)
	if err != nil {
		return nil, err
	}
	for _, p := range f.nodes {
		if st.Leader == p.node.Name || strings.HasPrefix(st.Leader, p.node.Name) || strings.Contains(st.Leader, p.node.Edge.String()) {
			return p, nil
		}
	}
	return nil, fmt.Errorf("leader %q is none of the nodes", st.Leader)
}

func (f *failoverLab) startResponders() {
	for _, b := range f.backends {
		f.lab.Start(b.NS, "responder-"+b.Name, f.cfg.Bin.Ikesim, "responder", "--name", b.Name,
			"--ike", b.Addr.String()+":500", "--natt", b.Addr.String()+":4500")
	}
}

// startSessions gives the client namespace count addresses after its own
// (x.y.z.101 …) and runs that many ikesim sessions for d.
func (f *failoverLab) startSessions(c *topo.Client, d time.Duration) (*netns.Proc, error) {
	b4 := c.Addr.As4()
	base := netip.AddrFrom4([4]byte{b4[0], b4[1], b4[2], 100})
	a := base
	for range f.cfg.Clients {
		a = a.Next()
		if _, err := c.NS.Run("ip", "addr", "add", a.String()+"/24", "dev", topo.ClientIf); err != nil && !strings.Contains(err.Error(), "exists") {
			return nil, fmt.Errorf("add client address %s: %w", a, err)
		}
	}
	return f.lab.Start(c.NS, "sessions", f.cfg.Bin.Ikesim, "sessions", "--vip", f.vip.String(),
		"--clients", fmt.Sprint(f.cfg.Clients), "--source-base", base.String(),
		"--interval", f.cfg.Interval.String(), "--duration", d.String()), nil
}

func parseSessions(log string) []sessionLine {
	var lines []sessionLine
	sc := bufio.NewScanner(strings.NewReader(log))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l sessionLine
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.Client != "" {
			lines = append(lines, l)
		}
	}
	return lines
}

// sessionsDuration: long enough to connect, commit, kill and recover.
const sessionsDuration = 14 * time.Second

// runFailover runs one repeat of shape in a fresh lab (torn down by tb's
// cleanup: run each repeat as its own subtest) and returns its result.
func runFailover(ctx context.Context, tb testing.TB, cfg FailoverConfig, shape string) (FailoverRun, error) {
	r := FailoverRun{Shape: shape}
	lab := netns.New(tb, "fo")
	f := &failoverLab{cfg: cfg, lab: lab}
	var (
		client *topo.Client
		vrrp   *topo.VRRP
		ac     *topo.Anycast
	)
	switch shape {
	case "vrrp", "vrrp-process":
		vrrp = topo.NewVRRP(lab, topo.VRRPConfig{
			ClientSide: topo.ClientSide{Clients: 1}, Backends: 3, NoKeepalived: true,
			TrackScript: func(*topo.Node) string {
				return fmt.Sprintf("%s --addr %s --timeout 1s check ready", cfg.Bin.Ikelbctl, nodeAdmin)
			},
			ReadyWatcher: func(*topo.Node) []string {
				return []string{cfg.Bin.Ikelbctl, "--addr", nodeAdmin, "check", "ready"}
			},
		})
		f.backends, f.vip, client = vrrp.Backends, vrrp.VIP, vrrp.Clients[0]
		f.startResponders()
		f.startNodes(vrrp.Nodes(), map[string]string{vrrp.Witness.Name: "witness"})
	case "anycast":
		ac = topo.NewAnycast(lab, topo.AnycastConfig{ClientSide: topo.ClientSide{Clients: 1}, Nodes: 3, Backends: 3})
		f.backends, f.vip, client = ac.Backends, ac.VIP, ac.Clients[0]
		f.startResponders()
		f.startNodes(ac.Nodes, nil)
	default:
		return r, fmt.Errorf("unknown shape %q", shape)
	}
	if err := f.waitReady(ctx, 60*time.Second); err != nil {
		return r, err
	}
	if vrrp != nil {
		vrrp.StartKeepalived(vrrp.LB1)
		vrrp.WaitMaster(nil, 15*time.Second)
		vrrp.StartKeepalived(vrrp.LB2)
	}
	sessions, err := f.startSessions(client, sessionsDuration)
	if err != nil {
		return r, err
	}
	committed, err := f.waitCommitted(ctx, cfg.Clients, 20*time.Second)
	if err != nil {
		return r, err
	}
	r.Committed = len(committed)

	// The kill.
	var victim *lbProc
	switch shape {
	case "vrrp", "vrrp-process":
		m, err := vrrp.Master()
		if err != nil {
			return r, err
		}
		for _, p := range f.nodes {
			if p.node == m {
				victim = p
			}
		}
	case "anycast":
		if victim, err = f.leader(ctx); err != nil {
			return r, err
		}
	}
	r.Victim = victim.node.Name
	killAt := time.Now()
	if err := victim.proc.Signal(syscall.SIGKILL); err != nil {
		return r, fmt.Errorf("kill %s: %w", victim.node.Name, err)
	}
	switch shape {
	case "vrrp":
		vrrp.KillKeepalived(victim.node)
		vrrp.DropFloating(victim.node)
		vrrp.WaitMaster(vrrp.Peer(victim.node), 15*time.Second)
		r.VIPMovedMs = msSince(killAt)
	case "vrrp-process":
		vrrp.WaitMaster(vrrp.Peer(victim.node), 15*time.Second)
		r.VIPMovedMs = msSince(killAt)
	case "anycast":
		ac.RemoveNexthop(victim.node)
	}
	select {
	case <-sessions.Done():
	case <-time.After(sessionsDuration + time.Minute):
		return r, fmt.Errorf("sessions did not finish")
	case <-ctx.Done():
		return r, ctx.Err()
	}
	lines := parseSessions(sessions.Log())
	r.Clients = len(lines)
	var all, affected []float64
	for _, l := range lines {
		if l.Err != "" {
			r.Errors++
			continue
		}
		all = append(all, l.MaxGapMS)
		if l.MaxGapMS > 5*float64(cfg.Interval)/float64(time.Millisecond) {
			affected = append(affected, l.MaxGapMS)
		}
		ip := l.Client
		if ap, err := netip.ParseAddrPort(l.Client); err == nil {
			ip = ap.Addr().String()
		}
		if b, ok := committed[ip]; ok && l.Kept && backendName(f.backends, b) == l.IKEResponder {
			r.OnBackend++
		}
	}
	r.Affected = len(affected)
	r.GapP50ms, r.GapMaxms = median(all), maxOf(all)
	r.AffectedP50, r.AffectedMax = median(affected), maxOf(affected)
	if r.Committed > 0 {
		r.OnBackendPct = 100 * float64(r.OnBackend) / float64(r.Committed)
	}
	return r, nil
}

func backendName(bs []*topo.Backend, addr string) string {
	for _, b := range bs {
		if b.Addr.String() == addr {
			return b.Name
		}
	}
	return ""
}

// median of v; of an even count, the mean of the middle two.
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return s[len(s)/2]
}

func maxOf(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	return slices.Max(v)
}

// WriteTable prints the failover report: every run, then per shape the
// median and max over the repeats.
func (rep *FailoverReport) WriteTable(w io.Writer) error {
	m := rep.Machine
	fmt.Fprintf(w, "ikelb failover benchmark, %s\n", rep.Started.UTC().Format(time.RFC3339))
	fmt.Fprintf(w, "machine: %s, %d cores, kernel %s, %s\n", m.CPU, m.Cores, m.Kernel, m.Go)
	fmt.Fprintf(w, "setup: %s\n\n", rep.Setup)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "shape\tvictim\tclients\taffected\tgap p50 ms (affected)\tgap max ms (affected)\tVIP moved ms\ton committed backend\terrors\t")
	for _, r := range rep.Runs {
		if r.Reason != "" {
			fmt.Fprintf(tw, "%s\t%s\tfailed\t\t\t\t\t\t\t\n", r.Shape, r.Victim)
			continue
		}
		vip := "-"
		if r.VIPMovedMs > 0 {
			vip = fmt.Sprintf("%.0f", r.VIPMovedMs)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%.0f\t%.0f\t%s\t%d/%d (%.0f%%)\t%d\t\n",
			r.Shape, r.Victim, r.Clients, r.Affected, r.AffectedP50, r.AffectedMax, vip, r.OnBackend, r.Committed, r.OnBackendPct, r.Errors)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "shape\trepeats\tfailover gap median ms\tfailover gap max ms\tclients on committed backend\t")
	var shapes []string
	for _, r := range rep.Runs {
		if !slices.Contains(shapes, r.Shape) {
			shapes = append(shapes, r.Shape)
		}
	}
	for _, s := range shapes {
		var gaps []float64
		on, com := 0, 0
		for _, r := range rep.Runs {
			if r.Shape == s && r.Reason == "" {
				gaps = append(gaps, r.AffectedMax)
				on += r.OnBackend
				com += r.Committed
			}
		}
		pct := 0.0
		if com > 0 {
			pct = 100 * float64(on) / float64(com)
		}
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%.0f\t%.1f%%\t\n", s, len(gaps), median(gaps), maxOf(gaps), pct)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, r := range rep.Runs {
		if r.Reason != "" {
			fmt.Fprintf(w, "  %s run failed: %s\n", r.Shape, oneLine(r.Reason, 400))
		}
	}
	fmt.Fprintf(w, "\ngap = a client's longest time without any answer (ikesim sessions); affected = clients whose gap exceeded 5 check intervals (their traffic went through the victim).\n")
	fmt.Fprintf(w, "failover gap of a repeat = the largest affected gap; target ≤ 1000 ms with 100%% of committed clients kept on their backend.\n")
	fmt.Fprintf(w, "took %v\n", rep.Took.Round(time.Second))
	return nil
}
