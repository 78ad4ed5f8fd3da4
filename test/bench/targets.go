package bench

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ikelb/ikelb/test/bench/loadgen"
	"github.com/ikelb/ikelb/test/netns"
)

// ErrUnavailable marks a target that cannot run here; the suite reports it
// as "not available: <reason>" and goes on with the others.
var ErrUnavailable = errors.New("not available")

// Target is one way of getting the clients' datagrams to the backends.
type Target interface {
	// Name is the target's row label.
	Name() string
	// Start sets the target up in env's balancer namespace and returns the
	// address clients send to (port 4500). An error wrapping ErrUnavailable
	// means it cannot run here.
	Start(ctx context.Context, env *Env) (netip.AddrPort, error)
	// Stop undoes Start.
	Stop(env *Env) error
}

// readyTimeout bounds how long a started target may take to forward a probe.
const readyTimeout = 15 * time.Second

// Routing is the baseline without a balancer: the balancer namespace only
// routes, and clients send straight to the first backend.
type Routing struct{}

func (Routing) Name() string { return "routing (no balancer)" }

func (Routing) Start(_ context.Context, env *Env) (netip.AddrPort, error) {
	return netip.AddrPortFrom(env.BackendAddrs[0], 4500), nil
}

func (Routing) Stop(*Env) error { return nil }

// NFTables is the kernel path: DNAT of VIP:500 and VIP:4500 by a hash of the
// client's source address, in ONE rule with a fixed seed so that both ports
// of a client reach the same backend. Replies return through the balancer
// (the backends' gateway), where conntrack reverses the DNAT; no masquerade.
// With Masquerade, the DNATed flows also leave from the balancer's address,
// as ikelb's nat mode does (the servers need no route back through the
// balancer): the kernel path of what nat mode does.
type NFTables struct{ Masquerade bool }

func (n NFTables) Name() string {
	if n.Masquerade {
		return "nftables dnat+masq"
	}
	return "nftables dnat jhash"
}

const nftTable = "ikelb_bench"

func (n NFTables) Start(_ context.Context, env *Env) (netip.AddrPort, error) {
	var m []string
	for i, a := range env.BackendAddrs {
		m = append(m, fmt.Sprintf("%d : %s", i, a))
	}
	masq := ""
	if n.Masquerade {
		masq = `
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ct status dnat ct original ip daddr ` + VIP.String() + ` masquerade
	}`
	}
	rules := fmt.Sprintf(`table ip %s {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr %s udp dport { 500, 4500 } dnat to jhash ip saddr mod %d seed 0x1ce1b map { %s }
	}%s
}
`, nftTable, VIP, len(m), strings.Join(m, ", "), masq)
	return loadRules(env, "nftables-target.nft", rules)
}

// loadRules loads an nft ruleset into the balancer's namespace (from a
// file in the lab's directory, kept for reading) and returns the address
// clients send to, VIP:4500; nft refusing it makes the target unavailable.
func loadRules(env *Env, file, rules string) (netip.AddrPort, error) {
	path := filepath.Join(env.Lab.Dir(), file)
	if err := os.WriteFile(path, []byte(rules), 0o644); err != nil {
		return netip.AddrPort{}, err
	}
	if _, err := env.Balancer.Run("nft", "-f", path); err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return netip.AddrPortFrom(VIP, 4500), nil
}

func (NFTables) Stop(env *Env) error {
	_, err := env.Balancer.Run("nft", "delete", "table", "ip", nftTable)
	return err
}

// Nginx is nginx's stream module proxying UDP with `hash $remote_addr
// consistent`, one worker pinned to the balancer's CPU.
type Nginx struct {
	proc *netns.Proc
}

func (*Nginx) Name() string { return "nginx stream hash" }

// NginxModule is where Debian's libnginx-mod-stream installs the module.
const NginxModule = "/usr/lib/nginx/modules/ngx_stream_module.so"

func (n *Nginx) Start(ctx context.Context, env *Env) (netip.AddrPort, error) {
	bin, err := exec.LookPath("nginx")
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: nginx: %v", ErrUnavailable, err)
	}
	if _, err := os.Stat(NginxModule); err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: stream module: %v", ErrUnavailable, err)
	}
	dir := env.Lab.MkDir("nginx")
	upstream := func(port int) string {
		var b strings.Builder
		for _, a := range env.BackendAddrs {
			fmt.Fprintf(&b, "\t\tserver %s:%d;\n", a, port)
		}
		return b.String()
	}
	// Sessions: every client is one UDP "session" with its own upstream
	// socket (2 connections each). Responses are unlimited (ESP flows both
	// ways); an idle session ends after proxy_timeout, longer than a run.
	conf := fmt.Sprintf(`load_module %s;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
pid %s/nginx.pid;
error_log %s/error.log warn;
events {
	worker_connections 16384;
}
stream {
	upstream ike500 {
		hash $remote_addr consistent;
%s	}
	upstream ike4500 {
		hash $remote_addr consistent;
%s	}
	server {
		listen %s:500 udp;
		proxy_pass ike500;
		proxy_timeout 120s;
	}
	server {
		listen %s:4500 udp;
		proxy_pass ike4500;
		proxy_timeout 120s;
	}
}
`, NginxModule, dir, dir, upstream(500), upstream(4500), VIP, VIP)
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return netip.AddrPort{}, err
	}
	env.Lab.AddLog("nginx-error", filepath.Join(dir, "error.log"))
	n.proc = env.Lab.Start(env.Balancer, "nginx", "taskset", "-c", env.BalancerCPU, bin, "-e", filepath.Join(dir, "error.log"), "-p", dir, "-c", path)
	dst := netip.AddrPortFrom(VIP, 4500)
	if err := readyOrExit(ctx, env, n.proc, dst); err != nil {
		_ = n.Stop(env)
		return netip.AddrPort{}, err
	}
	return dst, nil
}

func (n *Nginx) Stop(*Env) error { return stopProc(n.proc) }

// Ikelb is ikelbd in one forwarding mode, a single node with health checks
// off, pinned to the balancer's CPU.
type Ikelb struct {
	// Mode is "nat" or "transparent".
	Mode string
	// Binary returns the path of a built ikelbd (see BuildIkelbd).
	Binary func() (string, error)
	// NATFastPath is ikelbd's dataplane.nat_fast_path ("": its default).
	NATFastPath string
	// OffBalancerCPU runs ikelbd on the generator's CPU instead of the
	// balancer's: the kernel fast path then has the balancer's core to
	// itself, as a kernel balancer (no daemon) does.
	OffBalancerCPU bool

	proc *netns.Proc
}

// ikelbMetricsAddr is where the balancer's ikelbd serves metrics, inside
// the balancer's namespace (the suites read them to bind clients first).
const ikelbMetricsAddr = "127.0.0.1:7451"

func (k *Ikelb) Name() string { return "ikelb " + k.Mode }

func (k *Ikelb) Start(ctx context.Context, env *Env) (netip.AddrPort, error) {
	bin, err := k.Binary()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	dir := env.Lab.MkDir("ikelbd-" + k.Mode)
	var b strings.Builder
	natPathLine := "" // ikelbd's default
	if k.NATFastPath != "" {
		natPathLine = "\n  nat_fast_path: " + k.NATFastPath
	}
	// Inside the balancer's own namespace these loopback ports cannot
	// collide with anything.
	fmt.Fprintf(&b, `node: bench-%s
data_dir: %s
admin_address: 127.0.0.1:7450
metrics_address: %s
log_level: info
raft:
  bind_address: 127.0.0.1:7452
dataplane:
  kernel_fast_path: true%s
services:
  - name: bench
    vip: %s
    ports: [500, 4500]
    forwarding_mode: %s
    health_check: {type: none}
    backends:
`, k.Mode, filepath.Join(dir, "data"), ikelbMetricsAddr, natPathLine, VIP, k.Mode)
	for _, a := range env.BackendAddrs {
		fmt.Fprintf(&b, "      - address: %s\n", a)
	}
	path := filepath.Join(dir, "ikelbd.yaml")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return netip.AddrPort{}, err
	}
	cpu := env.BalancerCPU
	if k.OffBalancerCPU {
		cpu = env.GenCPU
	}
	k.proc = env.Lab.Start(env.Balancer, "ikelbd-"+k.Mode, "taskset", "-c", cpu, bin, "--config", path)
	dst := netip.AddrPortFrom(VIP, 4500)
	if err := readyOrExit(ctx, env, k.proc, dst); err != nil {
		_ = k.Stop(env)
		return netip.AddrPort{}, err
	}
	return dst, nil
}

// Stop stops ikelbd; with BENCH_KEEP_LOGS set to a directory, its log is
// copied there first (the lab's directory goes with the test).
func (k *Ikelb) Stop(*Env) error {
	err := stopProc(k.proc)
	if dir := os.Getenv("BENCH_KEEP_LOGS"); dir != "" && k.proc != nil {
		name := fmt.Sprintf("ikelbd-%s-%d.log", k.Mode, time.Now().UnixNano())
		_ = os.WriteFile(filepath.Join(dir, name), []byte(k.proc.Log()), 0o644)
	}
	return err
}

// readyOrExit waits until a probe to dst comes back, and fails with
// ErrUnavailable (and the end of the process's log) if the process exits or
// nothing comes back within readyTimeout.
func readyOrExit(ctx context.Context, env *Env, p *netns.Proc, dst netip.AddrPort) error {
	err := env.waitReady(ctx, dst, readyTimeout)
	if exited, perr := p.Exited(); exited {
		return fmt.Errorf("%w: %s exited (%v): %s", ErrUnavailable, p.Name(), perr, lastLine(p.Log()))
	}
	if err != nil {
		return fmt.Errorf("%w: %v; %s log: %s", ErrUnavailable, err, p.Name(), lastLine(p.Log()))
	}
	return nil
}

// stopProc asks p to stop with SIGTERM and kills its group after 5 s.
func stopProc(p *netns.Proc) error {
	if p == nil {
		return nil
	}
	if err := p.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, netns.ErrExited) {
		return err
	}
	select {
	case <-p.Done():
	case <-time.After(5 * time.Second):
		if err := p.Kill(); err != nil {
			return err
		}
		<-p.Done()
	}
	return nil
}

// BuildIkelbd returns a function that builds cmd/ikelbd into dir on its
// first call (bounded by timeout) and returns the binary's path or the
// build's error on every call.
func BuildIkelbd(dir string, timeout time.Duration) func() (string, error) {
	var once sync.Once
	var path string
	var err error
	return func() (string, error) {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			path = filepath.Join(dir, "ikelbd")
			cmd := exec.CommandContext(ctx, "go", "build", "-o", path, "./cmd/ikelbd")
			cmd.Dir = RepoRoot()
			if out, berr := cmd.CombinedOutput(); berr != nil {
				err = fmt.Errorf("go build ./cmd/ikelbd: %v: %s", berr, firstLines(string(out), 3))
			}
		})
		return path, err
	}
}

// RepoRoot is the module's root directory (from this file's location).
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

func firstLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = append(lines[:n], "...")
	}
	return strings.Join(lines, " | ")
}

// StatelessNAT is not something an operator runs: it is the ceiling of
// the kernel path ikelb's nat mode has in its ingress stage
// (cmd/internal/hostnet/natingress_linux.go), measured on this machine.
// Established clients NATed statelessly at netdev ingress, the way
// transparent mode forwards requests: static maps (client address and
// port → backend, and → a SNAT port of its own; SNAT port → client)
// rewrite both directions and hand each datagram to its next hop with
// `fwd`, without routing, the netfilter IP hooks or conntrack. ikelb fills
// such maps from its userspace flows, whose sockets hold the SNAT ports,
// and does more per datagram (per-flow counters, host and MTU checks, the
// backend's next hop from a map). Unlike ikelb's rules, these rewrite a
// zero UDP checksum into a wrong one: the load generator's datagrams carry
// one. Opt-in (-targets=nftables-stateless); Clients and Probes must be
// the run's.
type StatelessNAT struct{ Clients, Probes int }

func (StatelessNAT) Name() string { return "stateless nat (ceiling)" }

const statelessTable = "ikelb_bench_stateless"

// statelessPortBase is the first SNAT port; client i gets the base + i.
const statelessPortBase = 20000

func (s StatelessNAT) Start(_ context.Context, env *Env) (netip.AddrPort, error) {
	if s.Clients+s.Probes > 10000 {
		return netip.AddrPort{}, fmt.Errorf("%w: %d clients: the SNAT ports hold 10,000", ErrUnavailable, s.Clients+s.Probes)
	}
	// lbAddr is the balancer's address on backend i's link (10.0.1x.1).
	lbAddr := func(i int) netip.Addr {
		b := env.BackendAddrs[i].As4()
		b[3] = 1
		return netip.AddrFrom4(b)
	}
	var fbk, fport, rcl, snat, odev []string
	clients := make([]netip.Addr, 0, s.Clients+s.Probes)
	for i := range s.Clients {
		clients = append(clients, loadgen.Addr(ClientBase, i))
	}
	for i := range s.Probes {
		clients = append(clients, loadgen.Addr(ProbeBase, i))
	}
	for i, c := range clients {
		port := statelessPortBase + i
		fbk = append(fbk, fmt.Sprintf("%s . %d : %s", c, ClientPort, env.BackendAddrs[i%len(env.BackendAddrs)]))
		fport = append(fport, fmt.Sprintf("%s . %d : %d", c, ClientPort, port))
		rcl = append(rcl, fmt.Sprintf("%d : %s", port, c))
	}
	var b strings.Builder
	for i, be := range env.BackendAddrs {
		snat = append(snat, fmt.Sprintf("%s : %s", be, lbAddr(i)))
		odev = append(odev, fmt.Sprintf(`%s : "l%d"`, be, i+1))
		fmt.Fprintf(&b, `
	chain in_l%d {
		type filter hook ingress device "l%d" priority 0; policy accept;
		ip daddr %s udp sport 4500 udp dport %d-%d ip frag-off & 0x3fff == 0 ip ttl > 1 ip daddr set udp dport map @rcl udp dport set %d ip saddr set %s fwd ip to 10.0.1.2 device "l0"
	}`, i+1, i+1, lbAddr(i), statelessPortBase, statelessPortBase+len(clients)-1, ClientPort, VIP)
	}
	rules := fmt.Sprintf(`table netdev %s {
	map fbk { typeof ip saddr . udp sport : ip daddr; elements = { %s } }
	map fport { typeof ip saddr . udp sport : udp sport; elements = { %s } }
	map snatip { typeof ip daddr : ip saddr; elements = { %s } }
	map odev { typeof ip daddr : meta oif; elements = { %s } }
	map rcl { typeof udp dport : ip daddr; elements = { %s } }
	chain in_l0 {
		type filter hook ingress device "l0" priority 0; policy accept;
		ip daddr %s udp dport 4500 ip frag-off & 0x3fff == 0 ip ttl > 1 ip daddr set ip saddr . udp sport map @fbk udp sport set ip saddr . udp sport map @fport ip saddr set ip daddr map @snatip fwd ip to ip daddr device ip daddr map @odev
	}%s
}
`, statelessTable, strings.Join(fbk, ", "), strings.Join(fport, ", "), strings.Join(snat, ", "), strings.Join(odev, ", "), strings.Join(rcl, ", "), VIP, b.String())
	return loadRules(env, "stateless-target.nft", rules)
}

func (StatelessNAT) Stop(env *Env) error {
	_, err := env.Balancer.Run("nft", "delete", "table", "netdev", statelessTable)
	return err
}
