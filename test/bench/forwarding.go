package bench

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/ikelb/ikelb/test/bench/loadgen"
)

// ForwardingConfig sets the forwarding suite's sizes and lengths.
type ForwardingConfig struct {
	// Targets in the order measured; the first must be Routing, the
	// baseline for added latency.
	Targets []Target
	// Sizes are the ESP-in-UDP datagram sizes (UDP payload bytes).
	Sizes []int
	// Clients is the number of simulated clients (source addresses).
	Clients int
	// Duration of each rate measurement, repeated Repeats times (median).
	Duration time.Duration
	Repeats  int
	// Rate caps the rate runs' offered load (datagrams/s; 0: open loop,
	// as fast as the generator goes). With every target below its
	// capacity, the balancer CPU per datagram compares their per-packet
	// cost cleanly.
	Rate float64
	// GSO sends the load as UDP GSO writes of GSOBatch datagrams per
	// client turn (loadgen -gso): the generator offers more per core.
	GSO      bool
	GSOBatch int
	// Warmup runs at full rate before the measurements (establishes
	// sessions, flows and ARP entries).
	Warmup time.Duration
	// LatencyDuration is the length of the latency run at half the measured
	// rate, with Probes clients sending ProbeRate probes/s in total.
	LatencyDuration time.Duration
	Probes          int
	ProbeRate       float64
}

// DefaultForwarding is the full suite: about 6 minutes.
func DefaultForwarding(buildIkelbd func() (string, error)) ForwardingConfig {
	return ForwardingConfig{
		Targets: []Target{
			Routing{}, NFTables{}, NFTables{Masquerade: true}, &Nginx{},
			&Ikelb{Mode: "nat", Binary: buildIkelbd},
			&Ikelb{Mode: "transparent", Binary: buildIkelbd},
		},
		Sizes:           []int{64, 1400},
		Clients:         1000,
		Duration:        2 * time.Second,
		Repeats:         3,
		Warmup:          500 * time.Millisecond,
		LatencyDuration: 3 * time.Second,
		Probes:          16,
		ProbeRate:       2000,
	}
}

// RunForwarding measures every target at every size in env and returns the
// results, with ratios and added latency filled in. Only a broken harness
// (the sinks or the generator failing) is an error; a target that cannot run
// is a Result with Available false.
func RunForwarding(ctx context.Context, env *Env, cfg ForwardingConfig) ([]Result, error) {
	if len(cfg.Targets) == 0 {
		return nil, errors.New("bench: no targets")
	}
	if _, ok := cfg.Targets[0].(Routing); !ok {
		return nil, errors.New("bench: the first target must be Routing, the latency baseline")
	}
	var results []Result
	for _, tgt := range cfg.Targets {
		env.TB.Logf("bench: target %s", tgt.Name())
		rs, err := measureTarget(ctx, env, cfg, tgt)
		if err != nil {
			return results, err
		}
		results = append(results, rs...)
	}
	fillRatios(results)
	return results, nil
}

func measureTarget(ctx context.Context, env *Env, cfg ForwardingConfig, tgt Target) ([]Result, error) {
	rs := make([]Result, len(cfg.Sizes))
	for i, size := range cfg.Sizes {
		rs[i] = Result{Target: tgt.Name(), Size: size}
	}
	dst, err := tgt.Start(ctx, env)
	if err != nil {
		if !errors.Is(err, ErrUnavailable) {
			return nil, fmt.Errorf("bench: %s: %w", tgt.Name(), err)
		}
		for i := range rs {
			rs[i].Reason = err.Error()
		}
		env.TB.Logf("bench: %s: %v", tgt.Name(), err)
		return rs, nil
	}
	stopped := false
	defer func() {
		if !stopped {
			_ = tgt.Stop(env)
		}
	}()
	if _, ok := tgt.(*Ikelb); ok {
		// Every load and probe client bound before anything is measured:
		// the steady state of established clients (see bindPasses).
		load := loadgen.SendConfig{Dst: dst, ClientBase: ClientBase, Clients: cfg.Clients, SrcPort: ClientPort, Size: cfg.Sizes[0]}
		probes := load
		probes.ClientBase, probes.Clients, probes.SrcPort = ProbeBase, cfg.Probes, 0
		took, passes, err := bindPasses(ctx, env, cfg.Clients+cfg.Probes, 8, func() error {
			for _, l := range []loadgen.SendConfig{load, probes} {
				if _, err := env.send(ctx, onePass(l, 20000)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("bench: %s: binding the clients: %w", tgt.Name(), err)
		}
		env.TB.Logf("bench: %s: %d clients bound in %v (%d passes)", tgt.Name(), cfg.Clients+cfg.Probes, took.Round(time.Millisecond), passes)
	}
	for i := range rs {
		if err := measureRate(ctx, env, cfg, dst, &rs[i]); err != nil {
			return nil, fmt.Errorf("bench: %s, %d bytes: %w", tgt.Name(), rs[i].Size, err)
		}
		if err := measureLatency(ctx, env, cfg, dst, &rs[i]); err != nil {
			return nil, fmt.Errorf("bench: %s, %d bytes latency: %w", tgt.Name(), rs[i].Size, err)
		}
	}
	stopped = true
	if err := tgt.Stop(env); err != nil {
		return nil, fmt.Errorf("bench: stop %s: %w", tgt.Name(), err)
	}
	// The baseline at the same offered rate, so "added" compares like with
	// like. For Routing the run above is its own baseline.
	base := netip.AddrPortFrom(env.BackendAddrs[0], 4500)
	for i := range rs {
		r := &rs[i]
		if !r.Available {
			continue
		}
		if _, ok := tgt.(Routing); ok {
			r.Baseline = r.Latency
		} else {
			var b Result
			b.LatencyRate = r.LatencyRate
			if err := latencyRun(ctx, env, cfg, base, r.Size, r.LatencyRate, &b); err != nil {
				return nil, fmt.Errorf("bench: baseline latency for %s: %w", tgt.Name(), err)
			}
			r.Baseline = b.Latency
		}
		r.AddedP50us = r.Latency.P50us - r.Baseline.P50us
		r.AddedP99us = r.Latency.P99us - r.Baseline.P99us
	}
	return rs, nil
}

// measureRate runs the open-loop load Repeats times and keeps the median
// receive rate.
func measureRate(ctx context.Context, env *Env, cfg ForwardingConfig, dst netip.AddrPort, r *Result) error {
	load := loadgen.SendConfig{
		Dst: dst, ClientBase: ClientBase, Clients: cfg.Clients, SrcPort: ClientPort,
		Size: r.Size, Duration: cfg.Warmup,
	}
	if cfg.GSO {
		load.GSO, load.Batch = true, cfg.GSOBatch
	}
	if _, err := env.send(ctx, load); err != nil {
		return err
	}
	load.Duration, load.Rate = cfg.Duration, cfg.Rate
	var runs []Run
	for range cfg.Repeats {
		if _, err := env.drained(ctx); err != nil { // let the warm-up or last run finish
			return err
		}
		if _, err := env.sinks(ctx, loadgen.CmdReset); err != nil {
			return err
		}
		busy0, err := cpuBusy(env.BalancerCPU)
		if err != nil {
			return err
		}
		sent, err := env.send(ctx, load)
		if err != nil {
			return err
		}
		got, err := env.drained(ctx)
		if err != nil {
			return err
		}
		busy1, err := cpuBusy(env.BalancerCPU)
		if err != nil {
			return err
		}
		run := Run{Sent: sent.Sent, Received: got.Packets, Bad: got.Bad, SendErrors: sent.SendErrors}
		if got.Packets > 0 {
			run.BalancerNsPerPkt = float64(busy1-busy0) / float64(got.Packets)
		}
		// The socket sink times its first and last datagram; kernel
		// counters have no times, so their window is the sender's.
		w := got.Window()
		if w <= 0 {
			w = sent.Elapsed
		}
		if w > 0 && got.Packets > 1 {
			run.RxPPS = float64(got.Packets) / w.Seconds()
			run.RxMbps = float64(got.Bytes) * 8 / w.Seconds() / 1e6
		}
		if sent.Elapsed > 0 {
			run.TxPPS = float64(sent.Sent) / sent.Elapsed.Seconds()
		}
		runs = append(runs, run)
	}
	r.Runs = runs
	med := medianRun(runs)
	r.RxPPS, r.RxMbps, r.TxPPS = med.RxPPS, med.RxMbps, med.TxPPS
	costs := make([]float64, 0, len(runs))
	for _, x := range runs {
		if x.BalancerNsPerPkt > 0 {
			costs = append(costs, x.BalancerNsPerPkt)
		}
	}
	if len(costs) > 0 {
		slices.Sort(costs)
		r.BalancerNsPerPkt = costs[len(costs)/2]
	}
	if med.Sent > 0 {
		r.Loss = 1 - float64(min(med.Received, med.Sent))/float64(med.Sent)
	}
	r.Available = r.RxPPS > 0
	if !r.Available {
		r.Reason = fmt.Sprintf("nothing reached the backends (sent %d)", med.Sent)
	}
	return nil
}

func medianRun(runs []Run) Run {
	s := slices.Clone(runs)
	slices.SortFunc(s, func(a, b Run) int {
		switch {
		case a.RxPPS < b.RxPPS:
			return -1
		case a.RxPPS > b.RxPPS:
			return 1
		}
		return 0
	})
	return s[len(s)/2]
}

// measureLatency runs the load at half the measured rate with probes.
func measureLatency(ctx context.Context, env *Env, cfg ForwardingConfig, dst netip.AddrPort, r *Result) error {
	if !r.Available {
		return nil
	}
	r.LatencyRate = r.RxPPS / 2
	return latencyRun(ctx, env, cfg, dst, r.Size, r.LatencyRate, r)
}

func latencyRun(ctx context.Context, env *Env, cfg ForwardingConfig, dst netip.AddrPort, size int, rate float64, r *Result) error {
	if _, err := env.drained(ctx); err != nil {
		return err
	}
	res, err := env.send(ctx, loadgen.SendConfig{
		Dst: dst, ClientBase: ClientBase, Clients: cfg.Clients, SrcPort: ClientPort,
		Size: size, Duration: cfg.LatencyDuration, Rate: rate,
		ProbeBase: ProbeBase, Probes: cfg.Probes, ProbeRate: cfg.ProbeRate,
	})
	if err != nil {
		return err
	}
	r.Latency = Latency{
		Probes: res.ProbesSent, Echoed: res.ProbesReceived,
		P50us: us(res.RTT.P50), P90us: us(res.RTT.P90), P99us: us(res.RTT.P99), MaxUs: us(res.RTT.Max),
	}
	return nil
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// fillRatios sets each result's rate relative to nftables and nginx at the
// same size.
func fillRatios(rs []Result) {
	find := func(t Target, size int) *Result {
		for i := range rs {
			if rs[i].Target == t.Name() && rs[i].Size == size && rs[i].Available {
				return &rs[i]
			}
		}
		return nil
	}
	for i := range rs {
		r := &rs[i]
		if !r.Available {
			continue
		}
		if n := find(NFTables{}, r.Size); n != nil && n.RxPPS > 0 {
			r.VsNFT = r.RxPPS / n.RxPPS
			if n.BalancerNsPerPkt > 0 && r.BalancerNsPerPkt > 0 {
				r.CapacityVsNFT = n.BalancerNsPerPkt / r.BalancerNsPerPkt
			}
			if n.Latency.P99us > 0 && r.Latency.Echoed > 0 {
				r.P99VsNFT = r.Latency.P99us / n.Latency.P99us
			}
		}
		if n := find(&Nginx{}, r.Size); n != nil && n.RxPPS > 0 {
			r.VsNginx = r.RxPPS / n.RxPPS
		}
	}
}
