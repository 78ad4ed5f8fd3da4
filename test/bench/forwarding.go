package bench

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
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
	// Duration of each rate measurement; Repeats is the number of rounds
	// (one run per target and size each, see RunForwarding).
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
	// LatencyDuration is the length of the latency run at half nftables'
	// measured rate (see RunForwarding), with Probes clients sending ProbeRate probes/s in total; the
	// latency runs go in LatencyRounds rounds (at most Repeats).
	LatencyDuration time.Duration
	LatencyRounds   int
	Probes          int
	ProbeRate       float64
}

// DefaultForwarding is the full suite: about 7 minutes.
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
		Repeats:         5,
		Warmup:          500 * time.Millisecond,
		LatencyDuration: 3 * time.Second,
		LatencyRounds:   3,
		Probes:          16,
		ProbeRate:       2000,
	}
}

// RunForwarding measures every target at every size in env and returns the
// results, with ratios and added latency filled in. Only a broken harness
// (the sinks or the generator failing) is an error; a target that cannot run
// is a Result with Available false.
//
// The rate runs go in rounds: each round starts every target in turn (in an
// order rotated from round to round), measures one run per size and stops
// it. On this shared VM the machine's speed drifts by ±20 % over tens of
// seconds; measured target after target, that drift lands in the ratios.
// In rounds, every ratio compares runs seconds apart, not minutes, and the
// reported ratio is the median of the rounds' ratios (fillRatios).
// The latency runs follow, in rounds of their own (LatencyRounds).
func RunForwarding(ctx context.Context, env *Env, cfg ForwardingConfig) ([]Result, error) {
	if len(cfg.Targets) == 0 {
		return nil, errors.New("bench: no targets")
	}
	if _, ok := cfg.Targets[0].(Routing); !ok {
		return nil, errors.New("bench: the first target must be Routing, the latency baseline")
	}
	rs := make([][]Result, len(cfg.Targets))
	for i, tgt := range cfg.Targets {
		rs[i] = make([]Result, len(cfg.Sizes))
		for j, size := range cfg.Sizes {
			rs[i][j] = Result{Target: tgt.Name(), Size: size}
		}
	}
	rounds := max(cfg.Repeats, 1)
	for round := range rounds {
		for k := range cfg.Targets {
			i := (round + k) % len(cfg.Targets)
			if rs[i][0].Reason != "" {
				continue // unavailable since the first round
			}
			env.TB.Logf("bench: round %d of %d: %s", round+1, rounds, cfg.Targets[i].Name())
			err := withTarget(ctx, env, cfg, cfg.Targets[i], rs[i], func(dst netip.AddrPort) error {
				for j := range rs[i] {
					if err := rateRun(ctx, env, cfg, dst, &rs[i][j]); err != nil {
						return fmt.Errorf("%d bytes: %w", rs[i][j].Size, err)
					}
				}
				return nil
			})
			if err != nil {
				return flatten(rs), err
			}
		}
	}
	for i := range rs {
		for j := range rs[i] {
			summarize(&rs[i][j])
		}
	}
	// Every target's latency is measured at the same load where it can
	// carry it: half nftables' rate at that size (half its own if lower),
	// so that a faster target is not measured under a heavier load.
	for i := range rs {
		for j := range rs[i] {
			r := &rs[i][j]
			r.LatencyRate = r.RxPPS / 2
			for k := range rs {
				if n := rs[k][j]; n.Target == (NFTables{}).Name() && n.Available {
					r.LatencyRate = min(r.RxPPS, n.RxPPS) / 2
				}
			}
		}
	}
	// The sinks stamp the probes from here on (Latency: the network round trips);
	// the rate runs above did not pay for the kernel's timestamps.
	if err := env.timestamps(ctx); err != nil {
		return flatten(rs), err
	}
	latRounds := max(min(cfg.LatencyRounds, rounds), 1)
	for round := range latRounds {
		for k := range cfg.Targets {
			i := (round + k) % len(cfg.Targets)
			tgt := cfg.Targets[i]
			if !rs[i][0].Available {
				continue
			}
			env.TB.Logf("bench: latency round %d of %d: %s", round+1, latRounds, tgt.Name())
			if err := latencyRound(ctx, env, cfg, tgt, rs[i]); err != nil {
				return flatten(rs), err
			}
		}
	}
	for i := range rs {
		for j := range rs[i] {
			summarizeLatency(&rs[i][j])
		}
	}
	results := flatten(rs)
	fillRatios(results)
	return results, nil
}

func flatten(rs [][]Result) []Result {
	var out []Result
	for _, r := range rs {
		out = append(out, r...)
	}
	return out
}

// withTarget starts tgt, brings it to its steady state (ikelb: every load
// and probe client bound and taken over by the kernel path), runs measure
// and stops tgt. A target that cannot start is marked unavailable in rs
// (Reason) and is no error.
func withTarget(ctx context.Context, env *Env, cfg ForwardingConfig, tgt Target, rs []Result, measure func(netip.AddrPort) error) error {
	if n, err := flushConntrack(env); err != nil {
		return fmt.Errorf("bench: before %s: %w", tgt.Name(), err)
	} else if n > 0 {
		env.TB.Logf("bench: before %s: flushed %d conntrack entries left by the previous target", tgt.Name(), n)
	}
	dst, err := tgt.Start(ctx, env)
	if err != nil {
		if !errors.Is(err, ErrUnavailable) {
			return fmt.Errorf("bench: %s: %w", tgt.Name(), err)
		}
		for i := range rs {
			rs[i].Reason = err.Error()
		}
		env.TB.Logf("bench: %s: %v", tgt.Name(), err)
		return nil
	}
	stopped := false
	defer func() {
		if !stopped {
			_ = tgt.Stop(env)
		}
	}()
	if _, ok := tgt.(*Ikelb); ok {
		if err := settleIkelb(ctx, env, cfg, dst); err != nil {
			return fmt.Errorf("bench: %s: %w", tgt.Name(), err)
		}
	}
	if err := measure(dst); err != nil {
		return fmt.Errorf("bench: %s, %w", tgt.Name(), err)
	}
	stopped = true
	if err := tgt.Stop(env); err != nil {
		return fmt.Errorf("bench: stop %s: %w", tgt.Name(), err)
	}
	return nil
}

// settleIkelb binds every load and probe client (see bindPasses), then
// offers the full load until the balancer's sockets receive less than 1 %
// of it: the kernel path has taken every client over. In nat mode a client
// leaves userspace when its flow hands its conntrack entry over, which
// under a saturating load takes 0.9-1.6 s for 1,000 clients (the listener
// shares the balancer's core with the kernel's receive work); a run
// measured meanwhile is partly a userspace run. What is measured is the
// steady state of established clients.
func settleIkelb(ctx context.Context, env *Env, cfg ForwardingConfig, dst netip.AddrPort) error {
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
		return fmt.Errorf("binding the clients: %w", err)
	}
	slice := load
	slice.Duration = 250 * time.Millisecond
	if cfg.GSO {
		slice.GSO, slice.Batch = true, cfg.GSOBatch
	}
	st, err := untilSocketsQuiet(env, 10*time.Second, func() (uint64, error) {
		res, err := env.send(ctx, slice)
		return res.Sent, err
	})
	if err != nil {
		return err
	}
	if !st.settled {
		return fmt.Errorf("the balancer's sockets still receive %d of %d datagrams after %v of load", st.got, st.sent, st.took.Round(time.Millisecond))
	}
	env.TB.Logf("bench: %d clients bound in %v (%d passes), kernel path settled after %v",
		cfg.Clients+cfg.Probes, took.Round(time.Millisecond), passes, st.took.Round(time.Millisecond))
	return nil
}

// settling is how untilSocketsQuiet ended: after how long, whether the
// sockets went quiet, and the last slice's datagrams at the sockets and
// sent.
type settling struct {
	took      time.Duration
	settled   bool
	got, sent uint64
}

// untilSocketsQuiet runs send (one slice of the full load; it returns the
// datagrams it sent) until the balancer namespace's sockets receive under
// 1 % of a slice: the kernel path has taken every client over. It stops
// unsettled once maxWait has passed.
func untilSocketsQuiet(env *Env, maxWait time.Duration, send func() (uint64, error)) (settling, error) {
	start := time.Now()
	for {
		before, err := socketDatagrams(env)
		if err != nil {
			return settling{}, err
		}
		sent, err := send()
		if err != nil {
			return settling{}, err
		}
		after, err := socketDatagrams(env)
		if err != nil {
			return settling{}, err
		}
		st := settling{took: time.Since(start), got: after - before, sent: sent}
		st.settled = float64(st.got) < 0.01*float64(sent)
		if st.settled || st.took >= maxWait {
			return st, nil
		}
	}
}

// socketDatagrams is how many UDP datagrams sockets in the balancer's
// namespace were handed or dropped for a full buffer (/proc/net/snmp Udp
// InDatagrams + InErrors).
func socketDatagrams(env *Env) (uint64, error) {
	out, err := env.Balancer.Run("cat", "/proc/net/snmp")
	if err != nil {
		return 0, err
	}
	return parseUDPSnmp(out)
}

func parseUDPSnmp(snmp string) (uint64, error) {
	var names []string
	for _, l := range strings.Split(snmp, "\n") {
		f := strings.Fields(l)
		if len(f) == 0 || f[0] != "Udp:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		var sum uint64
		for i, n := range names {
			if (n == "InDatagrams" || n == "InErrors") && i < len(f) {
				v, err := strconv.ParseUint(f[i], 10, 64)
				if err != nil {
					return 0, fmt.Errorf("bench: /proc/net/snmp Udp %s: %w", n, err)
				}
				sum += v
			}
		}
		return sum, nil
	}
	return 0, errors.New("bench: no Udp lines in /proc/net/snmp")
}

// latencyRound measures tgt's round trips at each result's LatencyRate, one
// run per size, then routing alone at the same rates (the baseline, so
// that "added" compares like with like; Routing is its own baseline), and
// appends them to the results' latency rounds.
func latencyRound(ctx context.Context, env *Env, cfg ForwardingConfig, tgt Target, rs []Result) error {
	err := withTarget(ctx, env, cfg, tgt, rs, func(dst netip.AddrPort) error {
		for j := range rs {
			r := &rs[j]
			if !r.Available {
				continue
			}
			lat, err := latencyRun(ctx, env, cfg, dst, r.Size, r.LatencyRate)
			if err != nil {
				return fmt.Errorf("%d bytes latency: %w", r.Size, err)
			}
			r.LatencyRounds = append(r.LatencyRounds, lat)
		}
		if _, ok := tgt.(*Ikelb); ok {
			env.TB.Logf("bench: %s: metrics: %s", tgt.Name(), ikelbMetrics(env))
		}
		return nil
	})
	if err != nil {
		return err
	}
	base := netip.AddrPortFrom(env.BackendAddrs[0], 4500)
	for j := range rs {
		r := &rs[j]
		if !r.Available || len(r.LatencyRounds) == 0 {
			continue
		}
		b := r.LatencyRounds[len(r.LatencyRounds)-1]
		if _, ok := tgt.(Routing); !ok {
			if b, err = latencyRun(ctx, env, cfg, base, r.Size, r.LatencyRate); err != nil {
				return fmt.Errorf("bench: baseline latency for %s: %w", tgt.Name(), err)
			}
		}
		r.BaselineRounds = append(r.BaselineRounds, b)
	}
	return nil
}

// summarizeLatency sets r's latency, baseline and added latency: the
// medians over the latency rounds, added ones of each round's difference.
func summarizeLatency(r *Result) {
	if len(r.LatencyRounds) == 0 {
		return
	}
	r.Latency, r.Baseline = medianLatency(r.LatencyRounds), medianLatency(r.BaselineRounds)
	var d50, d99 []float64
	for i := range min(len(r.LatencyRounds), len(r.BaselineRounds)) {
		d50 = append(d50, r.LatencyRounds[i].P50us-r.BaselineRounds[i].P50us)
		d99 = append(d99, r.LatencyRounds[i].P99us-r.BaselineRounds[i].P99us)
	}
	r.AddedP50us, r.AddedP99us = median(d50), median(d99)
}

// medianLatency is the median of each percentile over ls, with the probes
// of all of them.
func medianLatency(ls []Latency) Latency {
	var out Latency
	var p50, p90, p99, mx []float64
	var n50, n99, nmx, q50, q99, r50, r99 []float64
	for _, l := range ls {
		out.Probes += l.Probes
		out.Echoed += l.Echoed
		p50, p90, p99, mx = append(p50, l.P50us), append(p90, l.P90us), append(p99, l.P99us), append(mx, l.MaxUs)
		if l.NetN > 0 {
			out.NetN += l.NetN
			n50, n99, nmx = append(n50, l.NetP50us), append(n99, l.NetP99us), append(nmx, l.NetMaxUs)
			q50, q99, r50, r99 = append(q50, l.RequestP50), append(q99, l.RequestP99), append(r50, l.ReplyP50), append(r99, l.ReplyP99)
		}
	}
	out.P50us, out.P90us, out.P99us, out.MaxUs = median(p50), median(p90), median(p99), median(mx)
	out.NetP50us, out.NetP99us, out.NetMaxUs = median(n50), median(n99), median(nmx)
	out.RequestP50, out.RequestP99, out.ReplyP50, out.ReplyP99 = median(q50), median(q99), median(r50), median(r99)
	return out
}

// rateRun warms the target up at full load for cfg.Warmup, then measures
// one open-loop run and appends it to r.Runs.
func rateRun(ctx context.Context, env *Env, cfg ForwardingConfig, dst netip.AddrPort, r *Result) error {
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
	if _, err := env.drained(ctx); err != nil { // let the warm-up finish
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
	run := newRun(sent, got)
	if got.Packets > 0 {
		run.BalancerNsPerPkt = float64(busy1-busy0) / float64(got.Packets)
	}
	r.Runs = append(r.Runs, run)
	return nil
}

// newRun is the rates of one run from what was sent and what the sinks
// counted.
func newRun(sent loadgen.SendResult, got loadgen.SinkStats) Run {
	run := Run{Sent: sent.Sent, Received: got.Packets, Bad: got.Bad, SendErrors: sent.SendErrors}
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
	return run
}

// summarize sets r's rates, cost and loss from the median of its runs.
func summarize(r *Result) {
	if len(r.Runs) == 0 {
		if r.Reason == "" {
			r.Reason = "not measured"
		}
		return
	}
	med := medianRun(r.Runs)
	r.RxPPS, r.RxMbps, r.TxPPS = med.RxPPS, med.RxMbps, med.TxPPS
	costs := make([]float64, 0, len(r.Runs))
	for _, x := range r.Runs {
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

// latencyRun runs the load at rate through dst with probes and returns
// their round trips.
func latencyRun(ctx context.Context, env *Env, cfg ForwardingConfig, dst netip.AddrPort, size int, rate float64) (Latency, error) {
	if _, err := env.drained(ctx); err != nil {
		return Latency{}, err
	}
	res, err := env.send(ctx, loadgen.SendConfig{
		Dst: dst, ClientBase: ClientBase, Clients: cfg.Clients, SrcPort: ClientPort,
		Size: size, Duration: cfg.LatencyDuration, Rate: rate,
		ProbeBase: ProbeBase, Probes: cfg.Probes, ProbeRate: cfg.ProbeRate,
	})
	if err != nil {
		return Latency{}, err
	}
	return Latency{
		Probes: res.ProbesSent, Echoed: res.ProbesReceived,
		P50us: us(res.RTT.P50), P90us: us(res.RTT.P90), P99us: us(res.RTT.P99), MaxUs: us(res.RTT.Max),
		NetN: res.NetRTT.N, NetP50us: us(res.NetRTT.P50), NetP99us: us(res.NetRTT.P99), NetMaxUs: us(res.NetRTT.Max),
		RequestP50: us(res.Request.P50), RequestP99: us(res.Request.P99),
		ReplyP50: us(res.Reply.P50), ReplyP99: us(res.Reply.P99),
	}, nil
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// fillRatios sets each result's rate relative to nftables and nginx at the
// same size: the median of the rounds' ratios, each run against the
// reference's run of the same round (see RunForwarding), with the ratios
// of the rounds kept in VsNFTRounds.
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
			r.VsNFTRounds = roundRatios(r.Runs, n.Runs, func(x Run) float64 { return x.RxPPS })
			r.VsNFT = median(r.VsNFTRounds)
			// Cost is the other way round: nftables' ns over the target's.
			r.CapacityVsNFT = median(roundRatios(n.Runs, r.Runs, func(x Run) float64 { return x.BalancerNsPerPkt }))
			r.P99VsNFT = median(roundRatios(r.LatencyRounds, n.LatencyRounds, func(x Latency) float64 {
				if x.Echoed == 0 {
					return 0
				}
				return x.P99us
			}))
			r.NetP99VsNFT = median(roundRatios(r.LatencyRounds, n.LatencyRounds, func(x Latency) float64 {
				if x.NetN == 0 {
					return 0
				}
				return x.NetP99us
			}))
		}
		if n := find(&Nginx{}, r.Size); n != nil && n.RxPPS > 0 {
			r.VsNginx = median(roundRatios(r.Runs, n.Runs, func(x Run) float64 { return x.RxPPS }))
		}
	}
}

// roundRatios is v(a[i]) / v(b[i]) for every round i where both are known.
func roundRatios[T any](a, b []T, v func(T) float64) []float64 {
	var out []float64
	for i := range min(len(a), len(b)) {
		if x, y := v(a[i]), v(b[i]); x > 0 && y > 0 {
			out = append(out, x/y)
		}
	}
	return out
}
