package bench

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/dataplane"
	"github.com/ikelb/ikelb/persist"
	bolt "go.etcd.io/bbolt"
)

// ClusterConfig sets the cluster suite's runs.
type ClusterConfig struct {
	// Dir is where the nodes' data directories and the disk baselines go
	// (the same disk for all of them).
	Dir string
	// Rate is the offered rate of new client binds per second for the
	// latency runs (the target: 20,000).
	Rate float64
	// Duration of each run; Warmup is left out of the committed-rate window.
	Duration time.Duration
	Warmup   time.Duration
	// SampleEvery: one proposal in SampleEvery is timed until it is in all
	// three tables. PollInterval is how often pending samples are looked up.
	SampleEvery  int
	PollInterval time.Duration
	// BaselineDuration is the length of each disk baseline.
	BaselineDuration time.Duration
	// Options are the nodes' settings (zero: the documented defaults).
	Options nodeOptions
}

// DefaultCluster is the full suite: about a minute.
func DefaultCluster(dir string) ClusterConfig {
	return ClusterConfig{
		Dir: dir, Rate: 20000, Duration: 5 * time.Second, Warmup: time.Second,
		SampleEvery: 20, PollInterval: 500 * time.Microsecond, BaselineDuration: 2 * time.Second,
	}
}

// CommitRun is one run of offered binds through one node's Proposer.
type CommitRun struct {
	Entry       string  `json:"entry"`        // "follower" or "leader": the node whose Proposer was used
	OfferedRate float64 `json:"offered_rate"` // binds/s offered; 0: as fast as the queue takes them (saturation)
	DurationS   float64 `json:"duration_s"`
	Offered     uint64  `json:"offered"`  // Propose calls
	Accepted    uint64  `json:"accepted"` // Propose returned true
	Dropped     uint64  `json:"dropped"`  // Propose returned false (queue full)
	// CommittedRate is the growth of the smallest of the three tables
	// (entries present on every node) per second, over the run after the
	// warm-up.
	CommittedRate float64 `json:"committed_rate"`
	// DrainMs is how long after the last proposal every accepted bind was
	// in all three tables (-1: not within the deadline).
	DrainMs float64 `json:"drain_ms"`
	// Samples: proposals timed from Propose to present in all three
	// tables (P50/P99/Max in ms); Missing never got there before the
	// deadline.
	Samples int     `json:"samples"`
	Missing int     `json:"missing"`
	P50ms   float64 `json:"p50_ms"`
	P99ms   float64 `json:"p99_ms"`
	MaxMs   float64 `json:"max_ms"`
	// Batches is the affinity log entries (or forwarded batches) the entry
	// node made; BindsPerBatch = Accepted / Batches.
	Batches       uint64  `json:"batches"`
	BindsPerBatch float64 `json:"binds_per_batch"`
	// Nodes: Propose → present on that node, per node.
	Nodes []NodeLatency `json:"nodes"`
	// CPUCores is the test process's CPU time (all three nodes, the
	// generator and the sampler) per second of the run; GCPauseMs the Go
	// stop-the-world pauses in it; LoadAvg the machine's 1-minute load
	// average at its end (other work on the machine shows here).
	CPUCores  float64 `json:"cpu_cores"`
	GCPauseMs float64 `json:"gc_pause_ms"`
	LoadAvg   string  `json:"loadavg"`
}

// NodeLatency is the time from Propose until the bind is on one node.
type NodeLatency struct {
	Name  string  `json:"name"`
	P50ms float64 `json:"p50_ms"`
	P99ms float64 `json:"p99_ms"`
}

// processCPU returns the process's user+system CPU time.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// gcPause returns the total stop-the-world GC pause so far.
func gcPause() time.Duration {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return time.Duration(m.PauseTotalNs)
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// DiskBaseline is a synced write loop on the nodes' disk.
type DiskBaseline struct {
	Name     string  `json:"name"`
	Writes   uint64  `json:"writes"`
	PerSec   float64 `json:"per_s"`
	MeanUs   float64 `json:"mean_us"`
	Describe string  `json:"describe"`
}

// ClusterReport is the cluster suite's output.
type ClusterReport struct {
	Suite     string         `json:"suite"`
	Started   time.Time      `json:"started"`
	Took      time.Duration  `json:"took_ns"`
	Machine   Machine        `json:"machine"`
	Setup     string         `json:"setup"`
	Runs      []CommitRun    `json:"runs"`
	Baselines []DiskBaseline `json:"baselines"`
	// Ratios of the saturated committed rate (best entry node) to each
	// baseline's synced writes per second.
	SaturatedRate float64            `json:"saturated_committed_rate"`
	Ratios        map[string]float64 `json:"ratios"`
	SampleEvery   int                `json:"sample_every"`
	PollInterval  time.Duration      `json:"poll_interval_ns"`
}

// RunCluster starts a 3-node in-process cluster under cfg.Dir, runs the
// saturation and fixed-rate runs through a follower and through the
// leader, stops the cluster, then measures the disk baselines in the same
// directory.
func RunCluster(ctx context.Context, cfg ClusterConfig, logf func(string, ...any)) (*ClusterReport, error) {
	rep := &ClusterReport{Suite: "cluster", Started: time.Now(), Machine: ThisMachine(nil), Ratios: map[string]float64{},
		SampleEvery: cfg.SampleEvery, PollInterval: cfg.PollInterval}
	c, err := startInprocCluster(ctx, filepath.Join(cfg.Dir, "cluster"), 3, cfg.Options)
	if err != nil {
		return nil, err
	}
	defer c.stop()
	l := c.leader()
	var all []*inprocNodeRef
	for _, n := range c.nodes {
		all = append(all, &inprocNodeRef{name: n.name, table: n.node.Table()})
	}
	svc, err := createService(ctx, l.node, c.nodes[0].node, c.nodes[1].node, c.nodes[2].node)
	if err != nil {
		return nil, err
	}
	rep.Setup = fmt.Sprintf("3 cluster.Node in one process (n1 bootstrapped, n2 and n3 joined by gossip), Raft over TCP on 127.0.0.1, "+
		"persist stores (raft-wal + snapshots) in %s, documented default timers and batcher; leader %s", cfg.Dir, l.name)
	logf("bench: cluster formed, leader %s", l.name)

	var next uint64 // the next client index: every run binds new clients
	for _, entry := range []string{"follower", "leader"} {
		for _, rate := range []float64{0, cfg.Rate} {
			n := c.leader()
			if entry == "follower" {
				n = c.follower()
			}
			if n == nil {
				return nil, fmt.Errorf("no %s", entry)
			}
			r, err := commitRun(ctx, cfg, n, svc, all, rate, &next)
			if err != nil {
				return nil, err
			}
			r.Entry = entry + " " + n.name
			logf("bench: %s rate %.0f: committed %.0f/s, p99 %.1f ms, dropped %d", r.Entry, rate, r.CommittedRate, r.P99ms, r.Dropped)
			rep.Runs = append(rep.Runs, r)
			if rate == 0 && r.CommittedRate > rep.SaturatedRate {
				rep.SaturatedRate = r.CommittedRate
			}
		}
	}
	if err := c.stop(); err != nil {
		logf("bench: cluster stop: %v", err)
	}

	bb, err := boltBaseline(filepath.Join(cfg.Dir, "bolt"), cfg.BaselineDuration)
	if err != nil {
		return nil, err
	}
	wb, err := walBaseline(filepath.Join(cfg.Dir, "wal"), cfg.BaselineDuration)
	if err != nil {
		return nil, err
	}
	rep.Baselines = []DiskBaseline{bb, wb}
	for _, b := range rep.Baselines {
		if b.PerSec > 0 {
			rep.Ratios[b.Name] = rep.SaturatedRate / b.PerSec
		}
	}
	rep.Took = time.Since(rep.Started)
	return rep, nil
}

type inprocNodeRef struct {
	name  string
	table *dataplane.Table
}

type sample struct {
	key  dataplane.ClientKey
	at   time.Time
	seen uint8 // bit i: present on node i
}

// saturationSampleEvery replaces SampleEvery in saturation runs: with
// seconds of queue, sampling 1 in 20 would leave thousands of samples
// pending and the sampler would eat a core of the two.
const saturationSampleEvery = 1000

// commitRun offers binds of new clients through n's Proposer for
// cfg.Duration: at rate per second, or (rate 0) as fast as the queue takes
// them, retrying after 50 µs when it is full.
func commitRun(ctx context.Context, cfg ClusterConfig, n *inprocNode, svc dataplane.Service, all []*inprocNodeRef, rate float64, next *uint64) (CommitRun, error) {
	r := CommitRun{OfferedRate: rate}
	minLen := func() int {
		m := all[0].table.Len()
		for _, x := range all[1:] {
			m = min(m, x.table.Len())
		}
		return m
	}
	base := minLen()
	st0 := n.node.Status()
	prop := n.node.Proposer()

	// The sampler: looks pending samples up in every table every
	// PollInterval, and records the time each is in all of them.
	samples := make(chan sample, 1<<16)
	var lat []time.Duration
	perNode := make([][]time.Duration, len(all))
	var missing int
	sampleEvery := cfg.SampleEvery
	if rate == 0 {
		sampleEvery = saturationSampleEvery
	}
	cpu0, gc0 := processCPU(), gcPause()
	var wg sync.WaitGroup
	stopSampler := make(chan struct{})
	stop := stopSampler
	wg.Go(func() {
		var pending []sample
		full := uint8(1)<<len(all) - 1
		tick := time.NewTicker(cfg.PollInterval)
		defer tick.Stop()
		var drainUntil time.Time
		for {
			select {
			case s := <-samples:
				pending = append(pending, s)
				continue
			case <-tick.C:
			case <-stop:
				drainUntil = time.Now().Add(10 * time.Second)
				stop = nil
			}
			for len(samples) > 0 {
				pending = append(pending, <-samples)
			}
			now := time.Now()
			k := 0
			for _, s := range pending {
				for i, x := range all {
					if s.seen&(1<<i) == 0 {
						if _, ok := x.table.Lookup(s.key); ok {
							s.seen |= 1 << i
							perNode[i] = append(perNode[i], now.Sub(s.at))
						}
					}
				}
				if s.seen == full {
					lat = append(lat, now.Sub(s.at))
					continue
				}
				pending[k] = s
				k++
			}
			pending = pending[:k]
			if !drainUntil.IsZero() && (len(pending) == 0 || now.After(drainUntil)) {
				missing = len(pending)
				return
			}
		}
	})

	start := time.Now()
	end := start.Add(cfg.Duration)
	var warmLen int
	var warmAt time.Time
	i := *next
	for now := start; now.Before(end); now = time.Now() {
		if ctx.Err() != nil {
			break
		}
		if warmAt.IsZero() && now.Sub(start) >= cfg.Warmup {
			warmAt, warmLen = now, minLen()
		}
		var due int
		if rate > 0 {
			due = int(rate*now.Sub(start).Seconds()) - int(r.Offered)
			if due <= 0 {
				time.Sleep(100 * time.Microsecond) // pacing the offered load
				continue
			}
			due = min(due, 1000)
		} else {
			due = 256
		}
		for range due {
			k := clientKey(svc.ID, i)
			b, _ := dataplane.Pick(svc.Backends, k)
			at := time.Now()
			r.Offered++
			if !prop.Propose(dataplane.Proposal{Kind: dataplane.ProposeBind, Key: k, Backend: b.ID, At: at.UnixNano()}) {
				r.Dropped++
				if rate == 0 {
					r.Offered-- // saturation: offer this client again
					time.Sleep(50 * time.Microsecond)
					break
				}
				i++
				continue
			}
			r.Accepted++
			if sampleEvery > 0 && (i-*next)%uint64(sampleEvery) == 0 {
				select {
				case samples <- sample{key: k, at: at}:
				default:
				}
			}
			i++
		}
	}
	stopAt := time.Now()
	endLen := minLen()
	r.CPUCores = (processCPU() - cpu0).Seconds() / stopAt.Sub(start).Seconds()
	r.GCPauseMs = float64(gcPause()-gc0) / float64(time.Millisecond)
	r.LoadAvg = loadAvg()
	r.DurationS = stopAt.Sub(start).Seconds()
	if !warmAt.IsZero() && stopAt.After(warmAt) {
		r.CommittedRate = float64(endLen-warmLen) / stopAt.Sub(warmAt).Seconds()
	}
	*next = i
	// Drain: every accepted bind of this run in all three tables.
	want := base + int(r.Accepted)
	if err := pollUntil(ctx, 30*time.Second, time.Millisecond, func() bool { return minLen() >= want }); err != nil {
		r.DrainMs = -1
	} else {
		r.DrainMs = float64(time.Since(stopAt)) / float64(time.Millisecond)
	}
	close(stopSampler)
	wg.Wait()
	st1 := n.node.Status()
	r.Batches = st1.Batches - st0.Batches
	if r.Batches > 0 {
		r.BindsPerBatch = float64(r.Accepted) / float64(r.Batches)
	}
	if rate == 0 {
		// Saturation: Dropped counts queue-full retries, not lost clients.
		r.Offered = r.Accepted
	}
	r.Samples, r.Missing = len(lat), missing
	if len(lat) > 0 {
		p := summarizeMs(lat)
		r.P50ms, r.P99ms, r.MaxMs = p[0], p[1], p[2]
	}
	for i, d := range perNode {
		if len(d) > 0 {
			p := summarizeMs(d)
			r.Nodes = append(r.Nodes, NodeLatency{Name: all[i].name, P50ms: p[0], P99ms: p[1]})
		}
	}
	return r, nil
}

// summarizeMs returns p50, p99 and max of d in milliseconds (nearest rank).
func summarizeMs(d []time.Duration) [3]float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	at := func(q float64) time.Duration {
		i := int(q*float64(len(s))+0.5) - 1
		return s[min(max(i, 0), len(s)-1)]
	}
	ms := func(x time.Duration) float64 { return float64(x) / float64(time.Millisecond) }
	return [3]float64{ms(at(0.50)), ms(at(0.99)), ms(s[len(s)-1])}
}

// boltBaseline: one 64-byte Put per Update transaction, bbolt's defaults
// (fsync on every commit), for d.
func boltBaseline(dir string, d time.Duration) (DiskBaseline, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return DiskBaseline{}, err
	}
	db, err := bolt.Open(filepath.Join(dir, "baseline.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return DiskBaseline{}, fmt.Errorf("bbolt baseline: %w", err)
	}
	defer db.Close()
	val := make([]byte, 64)
	var key [8]byte
	var n uint64
	start := time.Now()
	for time.Since(start) < d {
		binary.BigEndian.PutUint64(key[:], n)
		err := db.Update(func(tx *bolt.Tx) error {
			b, err := tx.CreateBucketIfNotExists([]byte("b"))
			if err != nil {
				return err
			}
			return b.Put(key[:], val)
		})
		if err != nil {
			return DiskBaseline{}, fmt.Errorf("bbolt baseline: %w", err)
		}
		n++
	}
	el := time.Since(start)
	return DiskBaseline{Name: "bbolt", Writes: n, PerSec: float64(n) / el.Seconds(), MeanUs: float64(el.Microseconds()) / float64(n),
		Describe: "go.etcd.io/bbolt v1.5.0: one 64-byte Put per Update transaction, fsync on (defaults)"}, nil
}

// walBaseline: raft-wal appends of one 64-byte entry each (StoreLog, batch
// of 1) through persist.Open, the log store the nodes use, for d.
func walBaseline(dir string, d time.Duration) (DiskBaseline, error) {
	s, err := persist.Open(dir, persist.Options{})
	if err != nil {
		return DiskBaseline{}, fmt.Errorf("raft-wal baseline: %w", err)
	}
	defer s.Close()
	val := make([]byte, 64)
	var n uint64
	start := time.Now()
	for time.Since(start) < d {
		n++
		if err := s.Log.StoreLog(&raft.Log{Index: n, Term: 1, Type: raft.LogCommand, Data: val}); err != nil {
			return DiskBaseline{}, fmt.Errorf("raft-wal baseline: %w", err)
		}
	}
	el := time.Since(start)
	return DiskBaseline{Name: "raft-wal", Writes: n, PerSec: float64(n) / el.Seconds(), MeanUs: float64(el.Microseconds()) / float64(n),
		Describe: "hashicorp/raft-wal v0.4.0 via persist.Open: StoreLog of one 64-byte entry (batch of 1), fsync per append"}, nil
}

// WriteTable prints the cluster report.
func (rep *ClusterReport) WriteTable(w io.Writer) error {
	m := rep.Machine
	fmt.Fprintf(w, "ikelb cluster benchmark, %s\n", rep.Started.UTC().Format(time.RFC3339))
	fmt.Fprintf(w, "machine: %s, %d cores, kernel %s, %s\n", m.CPU, m.Cores, m.Kernel, m.Go)
	fmt.Fprintf(w, "setup: %s\n\n", rep.Setup)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "entry node\toffered/s\taccepted\tdropped\tcommitted/s (all 3)\tbinds/batch\tp50 ms\tp99 ms\tmax ms\tsamples\tmissing\tdrain ms\tper node p50/p99 ms\tCPU cores\tGC ms\tloadavg\t")
	for _, r := range rep.Runs {
		off := "saturate"
		if r.OfferedRate > 0 {
			off = fmt.Sprintf("%.0f", r.OfferedRate)
		}
		var nodes []string
		for _, n := range r.Nodes {
			nodes = append(nodes, fmt.Sprintf("%s %.0f/%.0f", n.Name, n.P50ms, n.P99ms))
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%.0f\t%.0f\t%.1f\t%.1f\t%.1f\t%d\t%d\t%.0f\t%s\t%.2f\t%.0f\t%s\t\n",
			r.Entry, off, r.Accepted, r.Dropped, r.CommittedRate, r.BindsPerBatch, r.P50ms, r.P99ms, r.MaxMs, r.Samples, r.Missing, r.DrainMs,
			strings.Join(nodes, ", "), r.CPUCores, r.GCPauseMs, r.LoadAvg)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "baseline (same disk, same run)\tsynced writes/s\tmean µs\tsaturated binds/s ÷ baseline\t")
	for _, b := range rep.Baselines {
		fmt.Fprintf(tw, "%s\t%.0f\t%.0f\t%.1f×\t\n", b.Name, b.PerSec, b.MeanUs, rep.Ratios[b.Name])
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, b := range rep.Baselines {
		fmt.Fprintf(w, "  %s: %s\n", b.Name, b.Describe)
	}
	fmt.Fprintf(w, "\ncommitted/s = growth of the smallest of the 3 tables after the warm-up; p50/p99 = Propose → Lookup finds the key in all 3 tables\n")
	fmt.Fprintf(w, "(1 in %d accepted proposals timed, 1 in 1000 when saturating; pending samples looked up every %v, so times are high by at most that much). Target: ≥ 20,000/s with p99 ≤ 50 ms.\n",
		rep.SampleEvery, rep.PollInterval)
	fmt.Fprintf(w, "took %v\n", rep.Took.Round(time.Second))
	return nil
}

// writeJSON writes v, indented, to path.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
