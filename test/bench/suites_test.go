package bench

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ikelb/ikelb/dataplane"
	"github.com/ikelb/ikelb/test/netns"
)

var scaleParts = flag.String("scale-parts", "memory,forwarding", "parts of -suite=scale to run: memory (memory per entry and restart, in process) and/or forwarding (root)")

// outFor is -out if it was given, else NAME-results.json: -out's default
// names the forwarding suite's file.
func outFor(name string) string {
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "out" })
	if set {
		return *out
	}
	return name + "-results.json"
}

type tableWriter interface{ WriteTable(io.Writer) error }

// report prints rep's table and writes its JSON.
func report(t *testing.T, name string, rep tableWriter, v any) {
	t.Helper()
	if err := rep.WriteTable(os.Stdout); err != nil {
		t.Fatal(err)
	}
	path := outFor(name)
	if path == "" {
		return
	}
	if err := writeJSON(path, v); err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs(path)
	t.Logf("bench: results written to %s", abs)
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestCluster is the cluster suite of issue 5: new bindings committed per
// second on a 3-node in-process cluster, and Propose → all-three-tables
// latency, beside bbolt's and raft-wal's synced write rates on the same
// disk. No root needed; about a minute.
//
//	go test ./test/bench -run 'TestCluster$' -v -count=1 -timeout 10m -suite=cluster
func TestCluster(t *testing.T) {
	if *suite != "cluster" {
		t.Skip("run with -suite=cluster (about a minute)")
	}
	cfg := DefaultCluster(t.TempDir())
	if *duration > 0 {
		cfg.Duration = *duration
	}
	cfg.Options.Logger = warnLogger(testWriter{t})
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	rep, err := RunCluster(ctx, cfg, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	report(t, "cluster", rep, rep)
}

// TestScale is the scale suite of issue 5: memory per affinity and restart
// time with 1,000,000 clients (in process, no root), then the forwarding
// rate with 100,000 clients against 1,000 (root: network namespaces).
// About 5 minutes.
//
//	sudo go test ./test/bench -run 'TestScale$' -v -count=1 -timeout 20m -suite=scale
func TestScale(t *testing.T) {
	if *suite != "scale" {
		t.Skip("run with -suite=scale (root for the forwarding part; about 5 minutes)")
	}
	started := time.Now()
	rep := &ScaleReport{Suite: "scale", Started: started, Machine: ThisMachine(nil)}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	parts := strings.Split(*scaleParts, ",")
	var nofile string
	if slices.Contains(parts, "memory") {
		cfg := DefaultScale(t.TempDir())
		cfg.Options.Logger = warnLogger(testWriter{t})
		mem, rst, err := RunScaleMemory(ctx, cfg, t.Logf)
		if err != nil {
			t.Fatal(err)
		}
		rep.Memory, rep.Restart = mem, rst
		runtime.GC()
		debug.FreeOSMemory()
	}

	if !slices.Contains(parts, "forwarding") {
		rep.FwdNote = "forwarding at scale not run (-scale-parts)"
	} else if os.Geteuid() != 0 {
		rep.FwdNote = "forwarding at scale not run: needs root (network namespaces)"
	} else {
		// One upstream socket per NAT flow in ikelbd: raise the open-file
		// limit it inherits, if this process may.
		lim := syscall.Rlimit{Cur: 400000, Max: 400000}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			var cur syscall.Rlimit
			_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &cur)
			nofile = fmt.Sprintf("RLIMIT_NOFILE could not be raised (%v): ikelbd and the generator run with %d", err, cur.Max)
		} else {
			nofile = "RLIMIT_NOFILE raised to 400000"
		}
		env := NewEnv(t, helper(t), 3, CountKernel)
		rep.Machine = ThisMachine(env)
		fc := DefaultScaleForwarding(BuildIkelbd(t.TempDir(), 5*time.Minute))
		setNATFastPath(fc.Targets)
		if _, err := fc.Targets[1].(*Ikelb).Binary(); err != nil {
			t.Logf("bench: ikelbd: %v", err)
		}
		if *duration > 0 {
			fc.Duration = *duration
		}
		if *repeats > 0 {
			fc.Repeats = *repeats
		}
		if *targets != "" {
			want := strings.Split(*targets, ",")
			fc.Targets = slices.DeleteFunc(fc.Targets, func(t Target) bool {
				return !slices.Contains(want, strings.ReplaceAll(t.Name(), " ", "-")) && !slices.Contains(want, strings.Fields(t.Name())[0])
			})
		}
		var err error
		rep.Forwarding, err = RunScaleForwarding(ctx, env, fc)
		if err != nil {
			t.Fatal(err)
		}
		rep.FwdNote = fmt.Sprintf("load: %d loadgen processes at once in the client namespace sharing the clients, one UDP socket per client address, %d datagrams per sendmmsg per client turn (round-robin over each process's clients) so that every client sends within each run; "+
			"ikelb: passes of one datagram per client at %.0f/s until its table holds every client; then the full load in %v slices until the balancer's sockets get under 1%% of a slice (the kernel path took every client over; at most %v); routing: a %v warm-up; fresh balancer per client count; %s; "+
			"ikelbd's NAT engine caps upstream flows at dataplane.DefaultMaxFlows = %d", fc.Senders, fc.Batch, fc.BindRate, fc.Warmup/2, fc.MaxSettle, fc.Warmup, nofile, dataplane.DefaultMaxFlows)
	}
	rep.Took = time.Since(started)
	report(t, "scale", rep, rep)
}

// TestFailover is the failover suite of issue 5: SIGKILL of the node
// carrying traffic → first answer through a survivor, at the client, for
// the VRRP shape (whole node dies; and ikelbd alone dies, the track script
// moves the VIP) and the anycast shape, three times each. Root; about 6
// minutes.
//
//	sudo go test ./test/bench -run 'TestFailover$' -v -count=1 -timeout 20m -suite=failover
func TestFailover(t *testing.T) {
	if *suite != "failover" {
		t.Skip("run with -suite=failover (root; about 3 minutes)")
	}
	netns.Require(t, "ip", "nft", "keepalived")
	started := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 18*time.Minute)
	defer cancel()
	bin, err := BuildFailoverBinaries(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultFailover(bin)
	if *repeats > 0 {
		cfg.Repeats = *repeats
	}
	if *targets != "" {
		cfg.Shapes = strings.Split(*targets, ",")
	}
	rep := &FailoverReport{Suite: "failover", Started: started, Machine: ThisMachine(nil),
		Setup: fmt.Sprintf("ikelbd processes (one per node namespace, test/topo shapes), nat mode, ikev2 health checks, documented raft/gossip/keepalived defaults; "+
			"%d ikesim sessions (own addresses) checking every %v; a fresh lab per repeat", cfg.Clients, cfg.Interval)}
	for _, shape := range cfg.Shapes {
		for i := range cfg.Repeats {
			t.Run(fmt.Sprintf("%s-%d", shape, i+1), func(t *testing.T) {
				r, err := runFailover(ctx, t, cfg, shape)
				if err != nil {
					r.Reason = err.Error()
					t.Logf("bench: %s: %v", shape, err)
				} else {
					t.Logf("bench: %s: victim %s, %d/%d affected, max gap %.0f ms, on backend %d/%d",
						shape, r.Victim, r.Affected, r.Clients, r.AffectedMax, r.OnBackend, r.Committed)
				}
				rep.Runs = append(rep.Runs, r)
			})
		}
	}
	rep.Took = time.Since(started)
	report(t, "failover", rep, rep)
}
