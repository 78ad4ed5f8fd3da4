package bench

import (
	"context"
	"flag"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ikelb/ikelb/test/bench/loadgen"
)

var (
	suite    = flag.String("suite", "", "benchmark suite to run: forwarding (needs root; about 7 minutes)")
	out      = flag.String("out", "forwarding-results.json", "file for the JSON results of -suite")
	targets  = flag.String("targets", "", "comma-separated subset of targets: routing,nftables,nftables-masq,nginx,ikelb-nat,ikelb-transparent; and, only when named, nftables-stateless (the ceiling of a stateless kernel NAT path, see StatelessNAT)")
	sizes    = flag.String("sizes", "", "comma-separated datagram sizes (default 64,1400)")
	duration = flag.Duration("duration", 0, "length of each rate run (default 2s)")
	repeats  = flag.Int("repeats", 0, "forwarding: rounds, each one rate run per target and size (default 5); scale: rate runs per target (default 3); failover: repeats per shape (default 3)")
	gsoBatch = flag.Int("gso", 16, "forwarding: send the rate runs' load as UDP GSO writes of this many datagrams per client turn (2..64; the kernel cuts them on the client side), so that one generator core saturates the balancer's; 0: one sendmmsg of separate datagrams")
	offered  = flag.Float64("rate", 0, "forwarding: offered datagrams/s of the rate runs (default 0: open loop); below every target's capacity, CPU ns/dgram compares per-packet cost")
	offCPU   = flag.Bool("ikelbd-off-balancer-cpu", false, "forwarding: run ikelbd on the generator's CPU, not the balancer's (the kernel fast path then has the balancer's core to itself, as a kernel balancer does)")
	count    = flag.String("count", CountKernel, "where load is counted at the backends: kernel (nft counter) or socket (recvmmsg sink)")
	natPath  = flag.String("nat-fast-path", "", "forwarding and scale: ikelbd's dataplane.nat_fast_path for the ikelb nat target (ingress or conntrack; default: ikelbd's, ingress)")
)

// setNATFastPath applies -nat-fast-path to the ikelb nat targets in ts.
func setNATFastPath(ts []Target) {
	if *natPath == "" {
		return
	}
	for _, t := range ts {
		if k, ok := t.(*Ikelb); ok && k.Mode == "nat" {
			k.NATFastPath = *natPath
		}
	}
}

func TestMain(m *testing.M) {
	if code, ok := HelperMain(); ok {
		os.Exit(code)
	}
	os.Exit(m.Run())
}

func helper(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

// TestForwarding is the forwarding suite of issue 5. It runs only when asked:
//
//	sudo go test ./test/bench -run TestForwarding -v -count=1 -timeout 20m -suite=forwarding
func TestForwarding(t *testing.T) {
	if *suite != "forwarding" {
		t.Skip("run with -suite=forwarding (root; about 7 minutes)")
	}
	started := time.Now()
	env := NewEnv(t, helper(t), 3, *count)
	cfg := DefaultForwarding(BuildIkelbd(t.TempDir(), 5*time.Minute))
	setNATFastPath(cfg.Targets)
	if *targets != "" {
		want := map[string]bool{}
		for _, n := range strings.Split(*targets, ",") {
			want[strings.TrimSpace(n)] = true
		}
		keep := cfg.Targets[:1] // routing is always measured: the latency baseline
		for _, tg := range cfg.Targets[1:] {
			if want[shortName(tg)] {
				keep = append(keep, tg)
			}
		}
		if want["nftables-stateless"] { // opt-in: a ceiling, not a rival
			keep = append(keep, StatelessNAT{Clients: cfg.Clients, Probes: cfg.Probes})
		}
		cfg.Targets = keep
	}
	if *sizes != "" {
		cfg.Sizes = nil
		for _, s := range strings.Split(*sizes, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(s))
			if err != nil {
				t.Fatalf("-sizes: %v", err)
			}
			cfg.Sizes = append(cfg.Sizes, n)
		}
	}
	for _, tg := range cfg.Targets {
		if k, ok := tg.(*Ikelb); ok {
			k.OffBalancerCPU = *offCPU
		}
	}
	cfg.Rate = *offered
	cfg.GSO, cfg.GSOBatch = *gsoBatch > 1, *gsoBatch
	if *duration > 0 {
		cfg.Duration = *duration
	}
	if *repeats > 0 {
		cfg.Repeats = *repeats
	}
	// Build before measuring, so the compiler does not share the CPUs
	// with a measurement.
	for _, tg := range cfg.Targets {
		if k, ok := tg.(*Ikelb); ok {
			if _, err := k.Binary(); err != nil {
				t.Logf("bench: ikelbd: %v", err)
			}
			break
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	results, err := RunForwarding(ctx, env, cfg)
	if err != nil {
		t.Fatal(err)
	}
	rep := &Report{Suite: "forwarding", Started: started, Took: time.Since(started), Machine: ThisMachine(env), Clients: cfg.Clients, Results: results}
	if err := rep.WriteTable(os.Stdout); err != nil {
		t.Fatal(err)
	}
	if *out != "" {
		if err := rep.WriteJSON(*out); err != nil {
			t.Fatal(err)
		}
		abs, _ := filepath.Abs(*out)
		t.Logf("bench: results written to %s", abs)
	}
}

func shortName(t Target) string {
	switch t := t.(type) {
	case NFTables:
		if t.Masquerade {
			return "nftables-masq"
		}
		return "nftables"
	case *Nginx:
		return "nginx"
	case *Ikelb:
		return "ikelb-" + t.Mode
	case StatelessNAT:
		return "nftables-stateless"
	}
	return "routing"
}

// TestForwardingSmoke runs the harness end to end on the kernel targets with
// short runs: traffic must reach the backends through routing and through
// nftables, spread over all three backends by nftables, and probes must come
// back, stamped.
func TestForwardingSmoke(t *testing.T) {
	env := NewEnv(t, helper(t), 3, CountSocket)
	cfg := ForwardingConfig{
		Targets: []Target{Routing{}, NFTables{}},
		Sizes:   []int{64}, Clients: 64,
		Duration: 300 * time.Millisecond, Repeats: 1, Warmup: 100 * time.Millisecond,
		LatencyDuration: 300 * time.Millisecond, Probes: 4, ProbeRate: 500,
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	results, err := RunForwarding(ctx, env, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(results) != 2 {
		t.Fatalf("got %d results, want 2", len(results))
	}
	for _, r := range results {
		if !r.Available || r.RxPPS <= 0 || r.Loss > 0.5 {
			t.Errorf("%s: available %v, %.0f pps, loss %.2f: %s", r.Target, r.Available, r.RxPPS, r.Loss, r.Reason)
		}
		if r.Latency.Echoed == 0 || r.Latency.P99us <= 0 {
			t.Errorf("%s: no probe came back: %+v", r.Target, r.Latency)
		}
		// The sinks stamp the latency runs' probes (both ways through
		// the balancer's namespace): a network round trip for each
		// echo, within the round trip the prober saw.
		if l := r.Latency; l.NetN != int(l.Echoed) || l.NetP50us <= 0 || l.NetP50us > l.P50us || l.RequestP50 <= 0 || l.ReplyP50 <= 0 {
			t.Errorf("%s: network round trips %+v", r.Target, l)
		}
	}
	if results[1].VsNFT != 1 {
		t.Errorf("nftables vs itself = %v, want 1", results[1].VsNFT)
	}
	// nftables' source hash spreads the clients over all three backends.
	nft := NFTables{}
	dst, err := nft.Start(ctx, env)
	if err != nil {
		t.Fatal(err)
	}
	defer nft.Stop(env)
	if _, err := env.sinks(ctx, loadgen.CmdReset); err != nil {
		t.Fatal(err)
	}
	if _, err := env.send(ctx, loadgen.SendConfig{Dst: dst, ClientBase: ClientBase, Clients: 64, SrcPort: ClientPort, Size: 64, Duration: time.Second, MaxPackets: 6400}); err != nil {
		t.Fatal(err)
	}
	if _, err := env.drained(ctx); err != nil {
		t.Fatal(err)
	}
	for i, ctl := range env.sinkCtl {
		st, err := loadgen.Query(ctx, ctl, loadgen.CmdStats)
		if err != nil {
			t.Fatal(err)
		}
		if st.Packets < 640 {
			t.Errorf("backend %d got %d of 6400 datagrams from 64 clients, want a share of at least 640", i+1, st.Packets)
		}
	}
}

func TestCPUBusy(t *testing.T) {
	if _, err := os.Stat("/proc/stat"); err != nil {
		t.Skip("no /proc/stat")
	}
	b0, err := cpuBusy("0")
	if err != nil {
		t.Fatal(err)
	}
	if b0 <= 0 {
		t.Fatalf("cpu0 busy %v since boot", b0)
	}
	if _, err := cpuBusy("999"); err == nil {
		t.Fatal("no error for a CPU that does not exist")
	}
}
