package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ikelb/ikelb/cluster"
	"github.com/ikelb/ikelb/dataplane"
	"github.com/ikelb/ikelb/persist"
	"github.com/ikelb/ikelb/test/bench/loadgen"
)

// ScaleConfig sets the scale suite's sizes.
type ScaleConfig struct {
	// Dir holds the node's data directory.
	Dir string
	// Entries is how many affinities are committed (the target: 1,000,000).
	Entries int
	// Options are the node's settings. SnapshotThreshold (1 entry) and
	// SnapshotInterval (1 s) are lowered so that raft snapshots the whole
	// loaded table by itself (the Node has no exported snapshot hook).
	Options nodeOptions
}

// DefaultScale is the in-process part of the suite: about a minute.
func DefaultScale(dir string) ScaleConfig {
	return ScaleConfig{Dir: dir, Entries: 1_000_000, Options: nodeOptions{
		Raft: cluster.RaftConfig{SnapshotThreshold: 1, SnapshotInterval: time.Second},
	}}
}

// MemoryResult is the memory per committed affinity.
type MemoryResult struct {
	Entries int `json:"entries"`
	// LoadS is how long the node took to commit them all (proposed as
	// fast as its queue took them).
	LoadS float64 `json:"load_s"`
	// Whole node: live Go heap (after GC) with the entries committed and
	// a snapshot of them taken, minus the heap of the same node with the
	// service and no entries, per entry. RSS is the process's.
	HeapBefore     uint64  `json:"heap_before"`
	HeapAfter      uint64  `json:"heap_after"`
	NodeBytesEntry float64 `json:"node_bytes_per_entry"`
	RSSBefore      uint64  `json:"rss_before"`
	RSSAfter       uint64  `json:"rss_after"`
	RSSBytesEntry  float64 `json:"rss_bytes_per_entry"`
	// TableBytesEntry: a bare dataplane.Table with the same number of
	// entries, measured the same way in the same run.
	TableBytesEntry float64 `json:"table_bytes_per_entry"`
	// Kernel comparisons, read from /proc/slabinfo on this machine.
	Conntrack string `json:"conntrack"`
	IPVS      string `json:"ipvs"`
}

// RestartResult is the time from restart to serving.
type RestartResult struct {
	Entries       int     `json:"entries"`
	SnapshotIndex uint64  `json:"snapshot_index"`
	SnapshotBytes int64   `json:"snapshot_bytes"`
	WALBytes      int64   `json:"wal_bytes"`
	OpenMs        float64 `json:"open_ms"`   // persist.Open + Close of the data directory alone, just before the restart
	StartMs       float64 `json:"start_ms"`  // New + Start returned (stores opened, raft restored the snapshot)
	TableMs       float64 `json:"table_ms"`  // Table().Len() == Entries
	LeaderMs      float64 `json:"leader_ms"` // the node leads (single voter: elected itself)
	ReadyMs       float64 `json:"ready_ms"`  // both
	LoadAvg       string  `json:"loadavg"`   // the machine's, before the restart
}

// FwdScaleResult is one forwarding rate at a number of clients.
type FwdScaleResult struct {
	Target  string  `json:"target"`
	Clients int     `json:"clients"`
	Batch   int     `json:"batch"`
	RxPPS   float64 `json:"rx_pps"`
	TxPPS   float64 `json:"tx_pps"`
	Loss    float64 `json:"loss"`
	Runs    []Run   `json:"runs"`
	// VsFewer is RxPPS relative to the same target with the fewest clients.
	VsFewer float64 `json:"vs_fewest_clients,omitempty"`
	Reason  string  `json:"reason,omitempty"`
	// ikelb: how long the passes that bound every client took, and how
	// many there were (see bindAll).
	BindSeconds float64 `json:"bind_s,omitempty"`
	BindPasses  int     `json:"bind_passes,omitempty"`
	// ikelb: how long the full load ran, after binding, until the
	// balancer's sockets received under 1 % of it (the kernel path took
	// every client over; see settleScale); Settled false when it had not
	// within MaxSettle, and was measured anyway.
	SettleSeconds float64 `json:"settle_s,omitempty"`
	Settled       bool    `json:"settled,omitempty"`
	// Affinities and flows the balancer reported after the run (ikelb).
	Note string `json:"note,omitempty"`
}

// ScaleReport is the scale suite's output.
type ScaleReport struct {
	Suite      string           `json:"suite"`
	Started    time.Time        `json:"started"`
	Took       time.Duration    `json:"took_ns"`
	Machine    Machine          `json:"machine"`
	Memory     MemoryResult     `json:"memory"`
	Restart    RestartResult    `json:"restart"`
	Forwarding []FwdScaleResult `json:"forwarding"`
	FwdNote    string           `json:"forwarding_note"`
}

// RunScaleMemory loads cfg.Entries affinities through Raft into a
// single-node cluster, measures the heap per entry, waits for raft's
// snapshot, shuts the node down and times its restart to serving.
func RunScaleMemory(ctx context.Context, cfg ScaleConfig, logf func(string, ...any)) (MemoryResult, RestartResult, error) {
	mem := MemoryResult{Entries: cfg.Entries}
	rst := RestartResult{Entries: cfg.Entries}

	// The bare table first, while the heap is small.
	mem.TableBytesEntry = tableBytesPerEntry(cfg.Entries)

	dir := filepath.Join(cfg.Dir, "node")
	n, err := startInprocNode("s1", dir, nil, false, cfg.Options)
	if err != nil {
		return mem, rst, err
	}
	defer func() { _ = n.stop() }()
	if err := pollUntil(ctx, 10*time.Second, time.Millisecond, n.node.IsLeader); err != nil {
		return mem, rst, fmt.Errorf("single node did not lead: %w", err)
	}
	svc, err := createService(ctx, n.node)
	if err != nil {
		return mem, rst, err
	}
	mem.HeapBefore, mem.RSSBefore = liveHeap(), rss()

	start := time.Now()
	prop := n.node.Proposer()
	for i := 0; i < cfg.Entries; {
		k := clientKey(svc.ID, uint64(i))
		b, _ := dataplane.Pick(svc.Backends, k)
		if !prop.Propose(dataplane.Proposal{Kind: dataplane.ProposeBind, Key: k, Backend: b.ID, At: time.Now().UnixNano()}) {
			time.Sleep(200 * time.Microsecond) // the queue is full: let the batcher drain it
			continue
		}
		i++
	}
	tbl := n.node.Table()
	if err := pollUntil(ctx, 5*time.Minute, 5*time.Millisecond, func() bool { return tbl.Len() >= cfg.Entries }); err != nil {
		return mem, rst, fmt.Errorf("%d of %d entries committed: %w", tbl.Len(), cfg.Entries, err)
	}
	mem.LoadS = time.Since(start).Seconds()
	logf("bench: %d affinities committed in %.1f s", cfg.Entries, mem.LoadS)

	// Let raft snapshot everything (threshold and interval are lowered),
	// so the heap is measured without a snapshot copy in flight.
	applied := n.node.Status().AppliedIndex
	if err := pollUntil(ctx, time.Minute, 10*time.Millisecond, func() bool {
		s, _ := strconv.ParseUint(n.node.RaftStats()["last_snapshot_index"], 10, 64)
		rst.SnapshotIndex = s
		return s >= applied
	}); err != nil {
		return mem, rst, fmt.Errorf("no snapshot up to index %d: %w", applied, err)
	}
	mem.HeapAfter, mem.RSSAfter = liveHeap(), rss()
	mem.NodeBytesEntry = (float64(mem.HeapAfter) - float64(mem.HeapBefore)) / float64(cfg.Entries)
	mem.RSSBytesEntry = (float64(mem.RSSAfter) - float64(mem.RSSBefore)) / float64(cfg.Entries)
	mem.Conntrack, mem.IPVS = kernelEntrySizes()

	if err := n.stop(); err != nil {
		return mem, rst, fmt.Errorf("shutdown: %w", err)
	}
	rst.SnapshotBytes = latestSnapshotSize(dir)
	rst.WALBytes = dirSize(filepath.Join(dir, "wal"))
	runtime.GC()
	// The stores' share of the restart: open and close them alone.
	t := time.Now()
	ps, err := persist.Open(dir, persist.Options{})
	if err != nil {
		return mem, rst, err
	}
	if err := ps.Close(); err != nil {
		return mem, rst, err
	}
	rst.OpenMs = msSince(t)
	rst.LoadAvg = loadAvg()

	// Restart on the same data directory: New, Start, then poll (1 ms)
	// for the full table and for leadership.
	t0 := time.Now()
	n2, err := startInprocNode("s1", dir, nil, false, cfg.Options)
	if err != nil {
		return mem, rst, fmt.Errorf("restart: %w", err)
	}
	defer func() { _ = n2.stop() }()
	rst.StartMs = msSince(t0)
	var tableAt, leaderAt time.Duration
	err = pollUntil(ctx, 30*time.Second, time.Millisecond, func() bool {
		if tableAt == 0 && n2.node.Table().Len() >= cfg.Entries {
			tableAt = time.Since(t0)
		}
		if leaderAt == 0 && n2.node.IsLeader() {
			leaderAt = time.Since(t0)
		}
		return tableAt > 0 && leaderAt > 0
	})
	if err != nil {
		return mem, rst, fmt.Errorf("restart: table %d of %d, leader %v: %w", n2.node.Table().Len(), cfg.Entries, n2.node.IsLeader(), err)
	}
	rst.TableMs, rst.LeaderMs = ms(tableAt), ms(leaderAt)
	rst.ReadyMs = max(rst.TableMs, rst.LeaderMs)
	return mem, rst, nil
}

func ms(d time.Duration) float64          { return float64(d) / float64(time.Millisecond) }
func msSince(t time.Time) float64         { return ms(time.Since(t)) }
func liveHeap() uint64                    { runtime.GC(); runtime.GC(); return memStats().HeapAlloc }
func memStats() (m runtime.MemStats)      { runtime.ReadMemStats(&m); return m }
func perEntry(a, b uint64, n int) float64 { return (float64(b) - float64(a)) / float64(n) }

// tableBytesPerEntry fills a bare dataplane.Table with n entries and
// returns the live heap it added per entry.
func tableBytesPerEntry(n int) float64 {
	before := liveHeap()
	t := dataplane.NewTable()
	for i := range n {
		t.Put(clientKey(1, uint64(i)), dataplane.Entry{Backend: 1, Created: int64(i), LastSeen: int64(i)})
	}
	after := liveHeap()
	runtime.KeepAlive(t)
	return perEntry(before, after, n)
}

// rss returns the process's resident set size in bytes.
func rss() uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// kernelEntrySizes reads the per-object sizes of the conntrack and IPVS
// connection slabs from /proc/slabinfo, and says when it cannot.
func kernelEntrySizes() (conntrack, ipvs string) {
	conntrack = "not measured: nf_conntrack slab not in /proc/slabinfo"
	ipvs = "not measured: no ip_vs_conn slab in /proc/slabinfo (ip_vs module not loaded; this suite loads no kernel modules)"
	b, err := os.ReadFile("/proc/slabinfo")
	if err != nil {
		return "not measured: " + err.Error(), "not measured: " + err.Error()
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 4 {
			continue
		}
		switch f[0] {
		case "nf_conntrack":
			conntrack = fmt.Sprintf("%s B per entry: nf_conntrack slab object size (/proc/slabinfo), plus its hash bucket and extensions (NAT, etc.) not counted", f[3])
		case "ip_vs_conn":
			ipvs = fmt.Sprintf("%s B per entry: ip_vs_conn slab object size (/proc/slabinfo), hash bucket not counted", f[3])
		}
	}
	return conntrack, ipvs
}

// latestSnapshotSize returns the size of the newest snapshot's state.bin
// under dir/snapshots.
func latestSnapshotSize(dir string) int64 {
	var size int64
	var newest time.Time
	matches, _ := filepath.Glob(filepath.Join(dir, "snapshots", "*", "state.bin"))
	for _, m := range matches {
		if fi, err := os.Stat(m); err == nil && fi.ModTime().After(newest) {
			newest, size = fi.ModTime(), fi.Size()
		}
	}
	return size
}

func dirSize(dir string) int64 {
	var n int64
	_ = filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

// Clients of the forwarding-at-scale runs: two /15s made local in the
// client namespace (AnyIP) and routed back by the balancer, away from the
// forwarding suite's ClientNet (whose probe and readiness addresses would
// collide with 100,000 clients).
var scaleNets = []netip.Prefix{netip.MustParsePrefix("10.2.0.0/15"), netip.MustParsePrefix("10.4.0.0/15")}

// ScaleForwardingConfig sets the forwarding-at-scale runs.
type ScaleForwardingConfig struct {
	Targets []Target
	Clients []int // first: the baseline count
	Size    int
	Batch   int // datagrams per sendmmsg, per client turn
	// Senders is how many generator processes share the clients.
	Senders  int
	Warmup   time.Duration
	Duration time.Duration
	Repeats  int
	// BindRate is the datagrams/s of the passes that bind every client
	// before an ikelb target is measured (at most MaxBindPasses).
	BindRate      float64
	MaxBindPasses int
	// MaxSettle bounds the full-load warm-up of an ikelb target that waits
	// for the kernel path to take every client over (see settleScale).
	MaxSettle time.Duration
}

// DefaultScaleForwarding: 1,000 vs 100,000 clients through routing and
// ikelb nat (and transparent), 64-byte datagrams.
func DefaultScaleForwarding(buildIkelbd func() (string, error)) ScaleForwardingConfig {
	return ScaleForwardingConfig{
		Targets: []Target{Routing{}, &Ikelb{Mode: "nat", Binary: buildIkelbd}, &Ikelb{Mode: "transparent", Binary: buildIkelbd}},
		Clients: []int{1000, 100000}, Size: 64, Batch: 4, Senders: 6,
		Warmup: 4 * time.Second, Duration: 2 * time.Second, Repeats: 3,
		BindRate: 20000, MaxBindPasses: 8, MaxSettle: 60 * time.Second,
	}
}

// RunScaleForwarding measures each target at each client count, with a
// fresh target per count (no state carried over), and the client sets in
// different /15s.
func RunScaleForwarding(ctx context.Context, env *Env, cfg ScaleForwardingConfig) ([]FwdScaleResult, error) {
	for _, p := range scaleNets {
		env.Client.IP("route", "add", "local", p.String(), "dev", "lo")
		env.Balancer.AddRoute(p.String(), "10.0.1.2")
	}
	var out []FwdScaleResult
	for _, tgt := range cfg.Targets {
		var first float64
		for ci, clients := range cfg.Clients {
			if clients > 130000 {
				return out, fmt.Errorf("bench: %d clients do not fit a /15", clients)
			}
			base := scaleNets[ci%len(scaleNets)].Addr().Next()
			r := FwdScaleResult{Target: tgt.Name(), Clients: clients, Batch: cfg.Batch}
			env.TB.Logf("bench: %s with %d clients", tgt.Name(), clients)
			// A fresh instance per count: Ikelb keeps its process.
			t := tgt
			if k, ok := tgt.(*Ikelb); ok {
				fresh := *k // every setting, no process
				fresh.proc = nil
				t = &fresh
			}
			dst, err := t.Start(ctx, env)
			if err != nil {
				if !errors.Is(err, ErrUnavailable) {
					return out, err
				}
				r.Reason = err.Error()
				out = append(out, r)
				continue
			}
			err = scaleRate(ctx, env, cfg, t, dst, base, clients, &r)
			if k, ok := t.(*Ikelb); ok && err == nil {
				r.Note = joinNotes(ikelbMetrics(env), ikelbNote(k))
			}
			if serr := t.Stop(env); serr != nil && err == nil {
				err = serr
			}
			if err != nil {
				return out, fmt.Errorf("bench: %s with %d clients: %w", tgt.Name(), clients, err)
			}
			if ci == 0 {
				first = r.RxPPS
			} else if first > 0 {
				r.VsFewer = r.RxPPS / first
			}
			out = append(out, r)
		}
	}
	return out, nil
}

// bindAll sends one datagram per client, in passes at cfg.BindRate,
// until the balancer's table holds every client (see bindPasses) and
// records how long that took.
func bindAll(ctx context.Context, env *Env, cfg ScaleForwardingConfig, load loadgen.SendConfig, r *FwdScaleResult) error {
	pass := onePass(load, cfg.BindRate)
	took, passes, err := bindPasses(ctx, env, load.Clients, cfg.MaxBindPasses, func() error {
		_, err := sendSplit(ctx, env, pass, cfg.Senders)
		return err
	})
	r.BindSeconds, r.BindPasses = took.Seconds(), passes
	return err
}

// settleScale runs the full load, in slices of cfg.Warmup/2 (every client
// sends in each, at 100,000 clients too), until the balancer namespace's
// sockets receive under 1 % of a slice's datagrams (untilSocketsQuiet):
// every client's userspace flow has handed it over to the kernel path (in
// nat mode, its conntrack entry to the listener deleted). It records how
// long that took; after cfg.MaxSettle it records that it did not settle
// and returns, so that the runs measure what the load meets then. (A fixed
// 4 s warm-up measured nat at 100,000 clients at 0.25× one run and 1.03×
// another: the runs caught the takeover midway. It took over a minute
// then, one client at a time; the fast path's sweep made it about 10 s.)
func settleScale(ctx context.Context, env *Env, cfg ScaleForwardingConfig, load loadgen.SendConfig, r *FwdScaleResult) error {
	slice := load
	slice.Duration = max(cfg.Warmup/2, 250*time.Millisecond)
	st, err := untilSocketsQuiet(env, cfg.MaxSettle, func() (uint64, error) {
		res, err := sendSplit(ctx, env, slice, cfg.Senders)
		return res.Sent, err
	})
	if err != nil {
		return err
	}
	r.SettleSeconds, r.Settled = st.took.Seconds(), st.settled
	if !st.settled {
		env.TB.Logf("bench: %s with %d clients: the balancer's sockets still got %d of %d datagrams after %.0f s of full load; measuring anyway",
			r.Target, r.Clients, st.got, st.sent, r.SettleSeconds)
	}
	return nil
}

// onePass is load as one datagram per client at rate.
func onePass(load loadgen.SendConfig, rate float64) loadgen.SendConfig {
	pass := load
	pass.Batch, pass.MaxPackets, pass.Rate = 1, uint64(load.Clients), rate
	pass.Duration = time.Duration(float64(load.Clients)/rate*float64(time.Second)) + 5*time.Second
	return pass
}

// bindPasses runs pass (one datagram from each client) until the ikelbd
// in env's balancer holds at least want affinities, at most maxPasses
// times. A new client's first datagrams go through the userspace path,
// which admits fewer clients per second than the kernel forwards
// established ones, and shares the balancer's core with the kernel's
// receive work: under an open-loop blast it is starved (1,000 clients
// took 3 s to bind at 250 kpps) and the rate measured meanwhile would be
// that of a half-bound set. It returns how long binding took and the
// passes it needed.
func bindPasses(ctx context.Context, env *Env, want, maxPasses int, pass func() error) (time.Duration, int, error) {
	start := time.Now()
	var bound float64
	for n := 1; n <= maxPasses; n++ {
		if err := pass(); err != nil {
			return 0, n, err
		}
		// The last binds commit within milliseconds of their datagrams.
		deadline := time.Now().Add(2 * time.Second)
		for {
			var err error
			if bound, err = ikelbGauge(env, "ikelb_affinity_entries"); err != nil {
				return 0, n, err
			}
			if int(bound) >= want || time.Now().After(deadline) {
				break
			}
			if err := ctx.Err(); err != nil {
				return 0, n, err
			}
			time.Sleep(100 * time.Millisecond) // polling the balancer's metrics, bounded by deadline
		}
		if int(bound) >= want {
			return time.Since(start), n, nil
		}
	}
	return time.Since(start), maxPasses, fmt.Errorf("bench: %d of %d clients bound after %d passes", int(bound), want, maxPasses)
}

// scrapeIkelb returns the metrics text of the balancer's ikelbd.
func scrapeIkelb(env *Env) (string, error) {
	out, err := env.Balancer.Run("curl", "-sS", "--max-time", "5", "http://"+ikelbMetricsAddr+"/metrics")
	if err != nil {
		return "", fmt.Errorf("bench: metrics: %w: %s", err, oneLine(out, 200))
	}
	return out, nil
}

// ikelbGauge reads one unlabelled metric of the balancer's ikelbd.
func ikelbGauge(env *Env, name string) (float64, error) {
	out, err := scrapeIkelb(env)
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, fmt.Errorf("bench: no %s in the metrics", name)
}

// ikelbMetrics is the part of the balancer's metrics that says where the
// load went: committed affinities, datagrams forwarded (kernel and
// userspace), drops, dropped proposals, and the nat clients the kernel
// path carries (flows at ingress, clients on the DNAT map).
func ikelbMetrics(env *Env) string {
	out, err := scrapeIkelb(env)
	if err != nil {
		return err.Error()
	}
	var keep []string
	for _, l := range strings.Split(out, "\n") {
		for _, m := range []string{"ikelb_affinity_entries ", "ikelb_service_packets_total", "ikelb_service_drops_total", "ikelb_proposals_dropped_total", "ikelb_flows ", "ikelb_kernel_nat_"} {
			if strings.HasPrefix(l, m) && !strings.HasSuffix(l, " 0") {
				keep = append(keep, l)
			}
		}
	}
	return strings.Join(keep, "; ")
}

func joinNotes(notes ...string) string {
	var keep []string
	for _, n := range notes {
		if n != "" {
			keep = append(keep, n)
		}
	}
	return strings.Join(keep, " | ")
}

// ikelbNote is the end of the ikelbd log lines that mention drops or flow
// limits, if any.
func ikelbNote(k *Ikelb) string {
	if k.proc == nil {
		return ""
	}
	var keep []string
	for _, l := range strings.Split(k.proc.Log(), "\n") {
		if strings.Contains(l, "flow") || strings.Contains(l, "too many open files") || strings.Contains(l, "drop") || strings.Contains(l, "fast path") {
			keep = append(keep, l)
		}
	}
	if len(keep) > 3 {
		keep = keep[len(keep)-3:]
	}
	return oneLine(strings.Join(keep, " | "), 400)
}

// scaleRate binds every client first (ikelb: passes of one datagram per
// client until the balancer's table holds them all), warms up (every
// client sends: flows open, the kernel takes established clients), then
// runs the load Repeats times and keeps the median.
func scaleRate(ctx context.Context, env *Env, cfg ScaleForwardingConfig, tgt Target, dst netip.AddrPort, base netip.Addr, clients int, r *FwdScaleResult) error {
	load := loadgen.SendConfig{Dst: dst, ClientBase: base, Clients: clients, SrcPort: ClientPort, Size: cfg.Size, Duration: cfg.Warmup, Batch: cfg.Batch}
	if _, ok := tgt.(*Ikelb); ok {
		if err := bindAll(ctx, env, cfg, load, r); err != nil {
			return err
		}
		if err := settleScale(ctx, env, cfg, load, r); err != nil {
			return err
		}
	} else if _, err := sendSplit(ctx, env, load, cfg.Senders); err != nil {
		return err
	}
	load.Duration = cfg.Duration
	for range cfg.Repeats {
		if _, err := env.drained(ctx); err != nil {
			return err
		}
		if _, err := env.sinks(ctx, loadgen.CmdReset); err != nil {
			return err
		}
		sent, err := sendSplit(ctx, env, load, cfg.Senders)
		if err != nil {
			return err
		}
		got, err := env.drained(ctx)
		if err != nil {
			return err
		}
		r.Runs = append(r.Runs, newRun(sent, got))
	}
	med := medianRun(r.Runs)
	r.RxPPS, r.TxPPS = med.RxPPS, med.TxPPS
	if med.Sent > 0 {
		r.Loss = 1 - float64(min(med.Received, med.Sent))/float64(med.Sent)
	}
	return nil
}

// sendSplit runs cfg's clients as n generator processes at once, each with
// its share of the clients (one socket per client each: a process may
// hold only RLIMIT_NOFILE of them) and of cfg.Rate and cfg.MaxPackets
// (totals, split in proportion), and sums their results.
func sendSplit(ctx context.Context, e *Env, cfg loadgen.SendConfig, n int) (loadgen.SendResult, error) {
	n = max(1, min(n, cfg.Clients))
	type out struct {
		r   loadgen.SendResult
		err error
	}
	results := make(chan out, n)
	per := (cfg.Clients + n - 1) / n
	started := 0
	for first := 0; first < cfg.Clients; first += per {
		c := cfg
		c.ClientBase = loadgen.Addr(cfg.ClientBase, first)
		c.Clients = min(per, cfg.Clients-first)
		c.MaxPackets = cfg.MaxPackets * uint64(c.Clients) / uint64(cfg.Clients)
		c.Rate = cfg.Rate * float64(c.Clients) / float64(cfg.Clients)
		started++
		go func() { // each result is received below
			r, err := e.send(ctx, c)
			results <- out{r, err}
		}()
	}
	var sum loadgen.SendResult
	var errs []error
	for range started {
		o := <-results
		if o.err != nil {
			errs = append(errs, o.err)
			continue
		}
		sum.Sent += o.r.Sent
		sum.SentBytes += o.r.SentBytes
		sum.SendErrors += o.r.SendErrors
		sum.Elapsed = max(sum.Elapsed, o.r.Elapsed)
	}
	return sum, errors.Join(errs...)
}

// WriteTable prints the scale report.
func (rep *ScaleReport) WriteTable(w io.Writer) error {
	m := rep.Machine
	fmt.Fprintf(w, "ikelb scale benchmark, %s\n", rep.Started.UTC().Format(time.RFC3339))
	fmt.Fprintf(w, "machine: %s, %d cores, kernel %s, %s\n\n", m.CPU, m.Cores, m.Kernel, m.Go)
	mem := rep.Memory
	if mem.Entries > 0 {
		mb := func(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
		fmt.Fprintf(w, "memory per affinity, %d clients committed through Raft on a single node (loaded in %.1f s) — target ≤ 150 B:\n", mem.Entries, mem.LoadS)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "  whole node, live Go heap after GC\t%.0f B/entry\t(%s → %s)\n", mem.NodeBytesEntry, mb(mem.HeapBefore), mb(mem.HeapAfter))
		fmt.Fprintf(tw, "  whole node, process RSS\t%.0f B/entry\t(%s → %s; includes freed heap the runtime has not returned)\n", mem.RSSBytesEntry, mb(mem.RSSBefore), mb(mem.RSSAfter))
		fmt.Fprintf(tw, "  dataplane.Table alone, same run\t%.0f B/entry\t\n", mem.TableBytesEntry)
		fmt.Fprintf(tw, "  conntrack (this kernel)\t%s\n", mem.Conntrack)
		fmt.Fprintf(tw, "  IPVS\t%s\n", mem.IPVS)
		if err := tw.Flush(); err != nil {
			return err
		}
		r := rep.Restart
		fmt.Fprintf(w, "\nrestart to serving with %d affinities (snapshot at index %d: %.1f MiB on disk; raft-wal dir %.1f MiB) — target ≤ 3 s:\n",
			r.Entries, r.SnapshotIndex, float64(r.SnapshotBytes)/(1<<20), float64(r.WALBytes)/(1<<20))
		fmt.Fprintf(w, "  New+Start returned %.0f ms (of which opening the stores alone takes %.0f ms), table full %.0f ms, leader %.0f ms → ready %.0f ms (loadavg %s)\n",
			r.StartMs, r.OpenMs, r.TableMs, r.LeaderMs, r.ReadyMs, r.LoadAvg)
	}
	if len(rep.Forwarding) > 0 {
		fmt.Fprintf(w, "\nforwarding rate vs number of clients (64-byte ESP-in-UDP to :4500, each client its own source address):\n")
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "target\tclients\tall bound in\tkernel path took all in\tbatch/client turn\ttx kpps\trx kpps\tloss\t× fewest clients\t")
		for _, x := range rep.Forwarding {
			if x.Reason != "" {
				fmt.Fprintf(tw, "%s\t%d\t\t\t\tn/a\t\t\t\t\n", x.Target, x.Clients)
				continue
			}
			settled := "-"
			if x.BindPasses > 0 {
				settled = fmt.Sprintf("%.1f s", x.SettleSeconds)
				if !x.Settled {
					settled = fmt.Sprintf("not in %.0f s", x.SettleSeconds)
				}
			}
			vs := "-"
			if x.VsFewer > 0 {
				vs = fmt.Sprintf("%.2f", x.VsFewer)
			}
			bound := "-"
			if x.BindPasses > 0 {
				bound = fmt.Sprintf("%.1f s (%d passes)", x.BindSeconds, x.BindPasses)
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%d\t%.0f\t%.0f\t%.1f%%\t%s\t\n", x.Target, x.Clients, bound, settled, x.Batch, x.TxPPS/1000, x.RxPPS/1000, 100*x.Loss, vs)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		for _, x := range rep.Forwarding {
			if x.Reason != "" {
				fmt.Fprintf(w, "  %s, %d clients: %s\n", x.Target, x.Clients, oneLine(x.Reason, 300))
			}
			if x.Note != "" {
				fmt.Fprintf(w, "  %s, %d clients, log: %s\n", x.Target, x.Clients, x.Note)
			}
		}
		if rep.FwdNote != "" {
			fmt.Fprintf(w, "  %s\n", rep.FwdNote)
		}
	}
	fmt.Fprintf(w, "took %v\n", rep.Took.Round(time.Second))
	return nil
}
