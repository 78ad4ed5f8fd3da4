package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ikelb/ikelb/test/bench/loadgen"
	"github.com/ikelb/ikelb/test/netns"
)

// Addresses of the topology. Clients live in ClientNet, made local in the
// client namespace by one AnyIP route, so any number of them need no setup.
var (
	VIP         = netip.MustParseAddr("10.0.100.1")
	ClientNet   = netip.MustParsePrefix("10.1.0.0/16")
	ClientBase  = netip.MustParseAddr("10.1.0.1")   // load clients
	ProbeBase   = netip.MustParseAddr("10.1.200.1") // latency probe clients
	ReadySource = netip.MustParseAddr("10.1.254.1") // readiness probes
)

// ClientPort is every simulated client's source port (NAT-T's own port;
// each client has its own address).
const ClientPort = 4500

// Env is the topology every target is measured in:
//
//	client (c0 10.0.1.2) ── (l0 10.0.1.1) balancer, VIP on lo
//	                                      (l1 10.0.11.1) ── (e0 10.0.11.2) backend 1
//	                                      (l2 10.0.12.1) ── (e0 10.0.12.2) backend 2
//	                                      (l3 10.0.13.1) ── (e0 10.0.13.2) backend 3
//
// Backends route everything back through the balancer (default gateway),
// as transparent balancing needs. Each backend runs a sink on :500 and :4500.
type Env struct {
	// set once
	TB       testing.TB
	Lab      *netns.Lab
	Client   *netns.NS
	Balancer *netns.NS
	Backends []*netns.NS
	// BackendAddrs are the backends' addresses, in order.
	BackendAddrs []netip.Addr
	// Helper is the executable run with HelperEnv=1 for loadgen commands.
	Helper string
	// GenCPU and BalancerCPU are the CPU lists (taskset -c) of the load
	// side (generator and sinks) and of the balancer.
	GenCPU, BalancerCPU string
	// RPS reports whether receive processing was steered to those CPUs.
	RPS bool
	// Count is where load datagrams are counted: CountKernel or CountSocket.
	Count string

	sinkCtl []string
}

// Where load datagrams are counted at the backends.
const (
	// CountKernel counts (and drops) load datagrams with an nftables
	// counter at the backend's ingress, before any socket: the cheapest
	// receiver, so the load side's CPU goes to generating load, and the
	// sinks' sockets hold only probes, whose echoes then never queue
	// behind load. Probes still reach the recvmmsg sink.
	CountKernel = "kernel"
	// CountSocket delivers every datagram to the recvmmsg sink, which
	// counts it: the most realistic receiver, and the most expensive.
	CountSocket = "socket"
)

// sinkRules count and drop load datagrams (payload byte 4 is not
// loadgen.KindProbe) at a backend's ingress; see CountKernel.
const sinkRules = `table ip ikelb_sink {
	counter load {}
	chain pre {
		type filter hook prerouting priority raw; policy accept;
		udp dport { 500, 4500 } @th,96,8 != 0x50 counter name "load" drop
	}
}
`

// NewEnv builds the topology with n backends and starts their sinks; count
// is CountKernel or CountSocket.
func NewEnv(tb testing.TB, helper string, n int, count string) *Env {
	tb.Helper()
	lab := netns.New(tb, "bench")
	netns.Require(tb, "taskset", "nft")
	if count != CountKernel && count != CountSocket {
		tb.Fatalf("bench: count %q: want %s or %s", count, CountKernel, CountSocket)
	}
	e := &Env{TB: tb, Lab: lab, Helper: helper, GenCPU: "0", BalancerCPU: "1", Count: count}
	if runtime.NumCPU() < 2 {
		e.BalancerCPU = "0"
	}
	e.Client = lab.AddNS("cli")
	e.Balancer = lab.AddNS("lb")
	lab.Link(e.Client, "c0", "10.0.1.2/24", e.Balancer, "l0", "10.0.1.1/24")
	// A UDP GSO write (loadgen -gso) is cut into datagrams on the client's
	// side, so the balancer sees one packet per datagram.
	e.Client.IP("link", "set", "dev", "c0", "gso_max_segs", "1")
	e.Client.IP("route", "add", "local", ClientNet.String(), "dev", "lo")
	e.Client.DefaultRoute("10.0.1.1")
	e.Client.RPFilterOff()
	e.Balancer.Forward()
	e.Balancer.AddAddr("lo", VIP.String()+"/32")
	e.Balancer.AddRoute(ClientNet.String(), "10.0.1.2")
	for i := 1; i <= n; i++ {
		be := lab.AddNS("be" + strconv.Itoa(i))
		lb, addr := fmt.Sprintf("10.0.%d.1", 10+i), fmt.Sprintf("10.0.%d.2", 10+i)
		lab.Link(e.Balancer, "l"+strconv.Itoa(i), lb+"/24", be, "e0", addr+"/24")
		be.DefaultRoute(lb)
		be.RPFilterOff()
		if count == CountKernel {
			be.NFT(sinkRules)
		}
		e.Backends = append(e.Backends, be)
		e.BackendAddrs = append(e.BackendAddrs, netip.MustParseAddr(addr))
	}
	e.RPS = e.steer()

	for i, be := range e.Backends {
		ctl := filepath.Join(lab.Dir(), fmt.Sprintf("sink%d.sock", i+1))
		lab.StartSpec(be, fmt.Sprintf("sink%d", i+1), netns.Spec{
			Args: e.helperArgs(e.GenCPU, "sink", "-listen", "0.0.0.0:500,0.0.0.0:4500", "-ctl", ctl, "-lifetime", "2h"),
			Env:  []string{HelperEnv + "=1"},
		})
		e.sinkCtl = append(e.sinkCtl, ctl)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, ctl := range e.sinkCtl {
		for {
			if _, err := loadgen.Query(ctx, ctl, loadgen.CmdStats); err == nil {
				break
			} else if ctx.Err() != nil {
				tb.Fatalf("bench: sink %s not answering: %v", ctl, err)
			}
			time.Sleep(20 * time.Millisecond) // polling for the sink's socket, bounded by ctx
		}
	}
	return e
}

// steer sets Receive Packet Steering so that the kernel's receive work in
// the balancer namespace runs on BalancerCPU and that in the client and
// backend namespaces on GenCPU. On veth, receive processing otherwise runs
// on the CPU that sent the packet: kernel forwarding would then be charged
// to the load generator's CPU and userspace balancers' sockets fed by it.
func (e *Env) steer() bool {
	set := func(ns *netns.NS, dev, cpu string) error {
		c, _ := strconv.Atoi(cpu)
		path := "/sys/class/net/" + dev + "/queues/rx-0/rps_cpus"
		_, err := ns.Run("sh", "-c", fmt.Sprintf("echo %x > %s", 1<<c, path))
		return err
	}
	var errs []error
	for i := 0; i <= len(e.Backends); i++ {
		errs = append(errs, set(e.Balancer, "l"+strconv.Itoa(i), e.BalancerCPU))
	}
	errs = append(errs, set(e.Client, "c0", e.GenCPU))
	for _, be := range e.Backends {
		errs = append(errs, set(be, "e0", e.GenCPU))
	}
	if err := errors.Join(errs...); err != nil {
		e.TB.Logf("bench: RPS not set, kernel receive work stays on the sending CPU: %v", err)
		return false
	}
	return true
}

// helperArgs is the command line running a loadgen command pinned to cpu.
func (e *Env) helperArgs(cpu string, args ...string) []string {
	return append([]string{"taskset", "-c", cpu, e.Helper}, args...)
}

// runHelper runs a bounded loadgen command in the client namespace.
func (e *Env) runHelper(ctx context.Context, args ...string) (string, error) {
	return e.Client.RunContext(ctx, append([]string{"env", HelperEnv + "=1"}, e.helperArgs(e.GenCPU, args...)...)...)
}

// send runs one load generator run in the client namespace.
func (e *Env) send(ctx context.Context, cfg loadgen.SendConfig) (loadgen.SendResult, error) {
	out, err := os.CreateTemp(e.Lab.Dir(), "send-*.json")
	if err != nil {
		return loadgen.SendResult{}, err
	}
	path := out.Name()
	_ = out.Close()
	defer os.Remove(path)
	args := []string{"send",
		"-dst", cfg.Dst.String(), "-size", strconv.Itoa(cfg.Size),
		"-duration", cfg.Duration.String(), "-src-port", strconv.Itoa(int(cfg.SrcPort)),
		"-rate", strconv.FormatFloat(cfg.Rate, 'f', 0, 64), "-out", path,
	}
	if cfg.Clients > 0 {
		args = append(args, "-clients", strconv.Itoa(cfg.Clients), "-client-base", cfg.ClientBase.String())
	}
	if cfg.Probes > 0 {
		args = append(args, "-probes", strconv.Itoa(cfg.Probes), "-probe-base", cfg.ProbeBase.String(),
			"-probe-rate", strconv.FormatFloat(cfg.ProbeRate, 'f', 0, 64))
	}
	if cfg.Batch > 0 {
		args = append(args, "-batch", strconv.Itoa(cfg.Batch))
	}
	if cfg.GSO {
		args = append(args, "-gso")
	}
	if cfg.MaxPackets > 0 {
		args = append(args, "-max-packets", strconv.FormatUint(cfg.MaxPackets, 10))
	}
	// Opening 100,000 sockets (and finding their addresses) takes a while
	// before the timed run starts.
	ctx, cancel := context.WithTimeout(ctx, cfg.Duration+2*time.Minute)
	defer cancel()
	if outp, err := e.runHelper(ctx, args...); err != nil {
		return loadgen.SendResult{}, fmt.Errorf("bench: send: %w (%s)", err, strings.TrimSpace(outp))
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return loadgen.SendResult{}, err
	}
	var res loadgen.SendResult
	if err := json.Unmarshal(b, &res); err != nil {
		return loadgen.SendResult{}, fmt.Errorf("bench: send result: %w", err)
	}
	return res, nil
}

// waitReady sends probes to dst until one is echoed back by a sink.
func (e *Env) waitReady(ctx context.Context, dst netip.AddrPort, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout+10*time.Second)
	defer cancel()
	out, err := e.runHelper(ctx, "ready", "-dst", dst.String(), "-src", ReadySource.String(), "-timeout", timeout.String())
	if err != nil {
		return fmt.Errorf("no probe echoed via %v within %v: %s", dst, timeout, lastLine(out))
	}
	return nil
}

// sinks sends cmd (loadgen.CmdStats or CmdReset) to every backend's
// counter and returns the merged answer.
func (e *Env) sinks(ctx context.Context, cmd string) (loadgen.SinkStats, error) {
	var sum loadgen.SinkStats
	if e.Count == CountKernel {
		for _, be := range e.Backends {
			st, err := nftCounter(ctx, be, cmd)
			if err != nil {
				return sum, err
			}
			sum.Add(st)
		}
		return sum, nil
	}
	for _, ctl := range e.sinkCtl {
		st, err := loadgen.Query(ctx, ctl, cmd)
		if err != nil {
			return sum, err
		}
		sum.Add(st)
	}
	return sum, nil
}

// timestamps turns the sinks' receive timestamps on (loadgen.CmdTimestamps).
func (e *Env) timestamps(ctx context.Context) error {
	for _, ctl := range e.sinkCtl {
		if _, err := loadgen.Query(ctx, ctl, loadgen.CmdTimestamps); err != nil {
			return fmt.Errorf("bench: sink timestamps: %w", err)
		}
	}
	return nil
}

// drained polls the sinks until their count stops growing (at most 2 s), so
// datagrams still queued in the balancer are counted.
func (e *Env) drained(ctx context.Context) (loadgen.SinkStats, error) {
	st, err := e.sinks(ctx, loadgen.CmdStats)
	for deadline := time.Now().Add(2 * time.Second); err == nil && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond) // polling the sinks' counters, bounded by deadline
		var next loadgen.SinkStats
		if next, err = e.sinks(ctx, loadgen.CmdStats); err == nil && next.Packets == st.Packets {
			return next, nil
		}
		st = next
	}
	return st, err
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return s
}

// nftCounter reads (or reads and resets) the sinkRules counter in ns. Its
// byte count includes the IP and UDP headers, which are taken off, so that
// Bytes is UDP payload as with the socket sink.
func nftCounter(ctx context.Context, ns *netns.NS, cmd string) (loadgen.SinkStats, error) {
	verb := "list"
	if cmd == loadgen.CmdReset {
		verb = "reset"
	}
	out, err := ns.RunContext(ctx, "nft", "-j", verb, "counter", "ip", "ikelb_sink", "load")
	if err != nil {
		return loadgen.SinkStats{}, err
	}
	var doc struct {
		Nftables []struct {
			Counter *struct {
				Packets uint64 `json:"packets"`
				Bytes   uint64 `json:"bytes"`
			} `json:"counter"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		return loadgen.SinkStats{}, fmt.Errorf("bench: nft counter in %s: %w", ns.Name(), err)
	}
	for _, o := range doc.Nftables {
		if c := o.Counter; c != nil {
			return loadgen.SinkStats{Packets: c.Packets, Bytes: c.Bytes - min(c.Bytes, 28*c.Packets)}, nil
		}
	}
	return loadgen.SinkStats{}, fmt.Errorf("bench: no counter in nft output from %s: %s", ns.Name(), lastLine(out))
}
