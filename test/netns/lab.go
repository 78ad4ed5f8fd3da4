package netns

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Sentinel errors.
var (
	// ErrName reports a namespace or interface name that is empty, too long
	// (names are limited to 15 bytes, the kernel's IFNAMSIZ-1) or uses
	// characters other than [a-z0-9-].
	ErrName = errors.New("netns: bad name")
	// ErrExited reports a signal sent to a process that has already exited.
	ErrExited = errors.New("netns: process exited")
)

const (
	maxName = 15 // IFNAMSIZ-1; also the limit this package keeps for namespace names

	// A Lab's tag is up to 3 characters of the caller's prefix and 3 random
	// ones, which leaves 9 for a namespace's own name.
	tagPrefixLen = 3
	tagRandLen   = 3

	// RunTimeout bounds each NS.Run.
	RunTimeout = 30 * time.Second

	killWait = 10 * time.Second // how long cleanup waits for a killed process

	logTailLines = 300
	logTailBytes = 48 << 10
)

// Lab owns the namespaces and processes of one test. Make it with New.
type Lab struct {
	// set once
	t   testing.TB
	tag string
	dir string

	mu       sync.Mutex // guards the following
	nss      []*NS
	procs    []*Proc
	logs     []namedLog
	logNames map[string]bool
	nft      int
}

type namedLog struct{ name, path string }

// New makes a Lab for t. Its tag is up to three characters of prefix followed
// by three random ones; every namespace it creates is named tag+name. New
// calls Require first, so the test skips (or fails under CI=true) where
// namespaces cannot be made.
func New(t testing.TB, prefix string) *Lab {
	t.Helper()
	Require(t)
	p := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			return r
		}
		return -1
	}, strings.ToLower(prefix))
	if len(p) > tagPrefixLen {
		p = p[:tagPrefixLen]
	}
	// Register our cleanup after TempDir's, so it runs before the directory
	// (and the logs in it) are removed.
	l := &Lab{t: t, dir: t.TempDir(), logNames: map[string]bool{}}
	for {
		l.tag = p + randomTag(tagRandLen)
		if m, _ := filepath.Glob("/run/netns/" + l.tag + "*"); len(m) == 0 {
			break
		}
	}
	t.Cleanup(l.cleanup)
	return l
}

func randomTag(n int) string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, n)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// Tag returns the Lab's unique tag, the prefix of all its namespace names.
func (l *Lab) Tag() string { return l.tag }

// Dir returns the Lab's private directory (a t.TempDir()): logs, rulesets
// and private /run directories live there.
func (l *Lab) Dir() string { return l.dir }

// TB returns the test the Lab belongs to.
func (l *Lab) TB() testing.TB { return l.t }

// Namespaces returns the full names of the namespaces the Lab made.
func (l *Lab) Namespaces() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	names := make([]string, len(l.nss))
	for i, ns := range l.nss {
		names[i] = ns.name
	}
	return names
}

// AddLog registers a file that the Lab writes (its tail) to the test log if
// the test fails; Start registers its processes' logs itself.
func (l *Lab) AddLog(name, path string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.logs = append(l.logs, namedLog{name, path})
}

// MkDir makes and returns a fresh directory under Dir, named after name.
func (l *Lab) MkDir(name string) string {
	l.t.Helper()
	d, err := os.MkdirTemp(l.dir, name+"-")
	if err != nil {
		l.t.Fatalf("netns: %v", err)
	}
	return d
}

// AddNS creates the namespace tag+name with its loopback up. name must be
// short enough for the whole to fit 15 bytes (9 bytes with a 6-byte tag).
func (l *Lab) AddNS(name string) *NS {
	l.t.Helper()
	full := l.tag + name
	if err := checkName(full); err != nil {
		l.t.Fatalf("netns: namespace %q: %v", name, err)
	}
	if out, err := exec.Command("ip", "netns", "add", full).CombinedOutput(); err != nil {
		l.t.Fatalf("netns: ip netns add %s: %v: %s", full, err, out)
	}
	ns := &NS{lab: l, name: full}
	l.mu.Lock()
	l.nss = append(l.nss, ns)
	l.mu.Unlock()
	ns.ip("link", "set", "lo", "up")
	return ns
}

func checkName(s string) error {
	if s == "" || len(s) > maxName {
		return fmt.Errorf("%w: %q must be 1..%d bytes", ErrName, s, maxName)
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-') {
			return fmt.Errorf("%w: %q: only [a-z0-9-]", ErrName, s)
		}
	}
	return nil
}

// Link connects a and b with a veth pair: interface ifA in a with address
// addrA, ifB in b with addrB (CIDR like "10.0.0.1/24", or "" for none), both
// up. The pair is created from inside a directly into b, so it never exists in
// the root namespace; interface names only need to be unique within their own
// namespace.
func (l *Lab) Link(a *NS, ifA, addrA string, b *NS, ifB, addrB string) {
	l.t.Helper()
	for _, n := range []string{ifA, ifB} {
		if err := checkName(n); err != nil {
			l.t.Fatalf("netns: interface: %v", err)
		}
	}
	a.ip("link", "add", ifA, "type", "veth", "peer", "name", ifB, "netns", b.name)
	a.up(ifA, addrA)
	b.up(ifB, addrB)
}

// Switch is a LAN segment: a Linux bridge in a namespace of its own, to which
// any number of namespaces attach.
type Switch struct {
	// NS is the switch's own namespace; its bridge is "br0".
	NS *NS

	mu    sync.Mutex // guards the following
	ports int
}

// AddSwitch creates a namespace tag+name holding the bridge br0.
func (l *Lab) AddSwitch(name string) *Switch {
	l.t.Helper()
	ns := l.AddNS(name)
	ns.ip("link", "add", "br0", "type", "bridge")
	ns.ip("link", "set", "br0", "up")
	return &Switch{NS: ns}
}

// Attach connects ns to the switch by a veth pair whose end in ns is ifname
// with address addr (CIDR, or "" for none).
func (s *Switch) Attach(ns *NS, ifname, addr string) {
	s.NS.lab.t.Helper()
	s.mu.Lock()
	s.ports++
	port := "p" + strconv.Itoa(s.ports)
	s.mu.Unlock()
	s.NS.lab.Link(s.NS, port, "", ns, ifname, addr)
	s.NS.ip("link", "set", port, "master", "br0")
}

// NS is one network namespace of a Lab.
type NS struct {
	lab  *Lab
	name string
}

// Name returns the namespace's full name (as `ip netns list` shows it).
func (n *NS) Name() string { return n.name }

// Lab returns the Lab that made the namespace.
func (n *NS) Lab() *Lab { return n.lab }

// Run runs a command inside the namespace (`ip netns exec`) and returns its
// combined output. It is bounded by RunTimeout; on timeout the command's
// whole process group is killed.
func (n *NS) Run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), RunTimeout)
	defer cancel()
	return n.RunContext(ctx, args...)
}

// RunContext is Run bounded by ctx instead of RunTimeout.
func (n *NS) RunContext(ctx context.Context, args ...string) (string, error) {
	if len(args) == 0 {
		return "", errors.New("netns: run: no command")
	}
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("netns: %s: %s: %w: %s", n.name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// MustRun is Run that fails the test on error.
func (n *NS) MustRun(args ...string) string {
	n.lab.t.Helper()
	out, err := n.Run(args...)
	if err != nil {
		n.lab.t.Fatal(err)
	}
	return out
}

// ip runs `ip -n NS args...` and fails the test on error.
func (n *NS) ip(args ...string) {
	n.lab.t.Helper()
	full := append([]string{"-n", n.name}, args...)
	if out, err := exec.Command("ip", full...).CombinedOutput(); err != nil {
		n.lab.t.Fatalf("netns: ip %s: %v: %s", strings.Join(full, " "), err, out)
	}
}

// IP runs `ip args...` inside the namespace and fails the test on error, e.g.
// ns.IP("route", "add", "10.9.0.0/16", "nexthop", "via", a, "nexthop", "via", b).
func (n *NS) IP(args ...string) {
	n.lab.t.Helper()
	n.ip(args...)
}

func (n *NS) up(ifname, addr string) {
	n.lab.t.Helper()
	if addr != "" {
		n.AddAddr(ifname, addr)
	}
	n.ip("link", "set", ifname, "up")
}

// AddAddr adds addr (CIDR, e.g. "10.0.0.1/24" or "10.9.9.9/32") to ifname.
func (n *NS) AddAddr(ifname, addr string) {
	n.lab.t.Helper()
	if _, err := netip.ParsePrefix(addr); err != nil {
		n.lab.t.Fatalf("netns: address %q: %v", addr, err)
	}
	n.ip("addr", "add", addr, "dev", ifname)
}

// AddRoute adds a route to dst (CIDR) via the gateway address via.
func (n *NS) AddRoute(dst, via string) {
	n.lab.t.Helper()
	n.ip("route", "add", dst, "via", via)
}

// DefaultRoute adds the default route via gw.
func (n *NS) DefaultRoute(gw string) {
	n.lab.t.Helper()
	n.ip("route", "add", "default", "via", gw)
}

// Sysctl sets a sysctl inside the namespace, e.g.
// ns.Sysctl("net.ipv4.fib_multipath_hash_policy", "1").
func (n *NS) Sysctl(key, value string) {
	n.lab.t.Helper()
	if _, err := n.Run("sysctl", "-qw", key+"="+value); err != nil {
		n.lab.t.Fatal(err)
	}
}

// Forward makes the namespace a router: IPv4 forwarding on, and reverse-path
// filtering off (asymmetric paths are normal in the topologies tests build).
func (n *NS) Forward() {
	n.lab.t.Helper()
	n.Sysctl("net.ipv4.ip_forward", "1")
	n.RPFilterOff()
}

// RPFilterOff turns reverse-path filtering off for all and future interfaces.
func (n *NS) RPFilterOff() {
	n.lab.t.Helper()
	n.Sysctl("net.ipv4.conf.all.rp_filter", "0")
	n.Sysctl("net.ipv4.conf.default.rp_filter", "0")
}

// NFT loads an nftables ruleset (nft -f syntax) into the namespace. The
// ruleset file is kept in the Lab's directory.
func (n *NS) NFT(ruleset string) {
	n.lab.t.Helper()
	n.lab.mu.Lock()
	n.lab.nft++
	path := filepath.Join(n.lab.dir, fmt.Sprintf("%s-%d.nft", n.name, n.lab.nft))
	n.lab.mu.Unlock()
	if err := os.WriteFile(path, []byte(ruleset), 0o644); err != nil {
		n.lab.t.Fatalf("netns: %v", err)
	}
	if _, err := n.Run("nft", "-f", path); err != nil {
		n.lab.t.Fatal(err)
	}
}

// Masquerade makes the namespace a NAT router: forwarding on and every
// packet leaving through outIf source-NATed to outIf's address (nft
// masquerade; the NAT keeps the source port when it is free). flags are nft
// masquerade flags: "random", "fully-random" (a random source port for every
// new mapping, like a carrier-grade NAT), "persistent".
func (n *NS) Masquerade(outIf string, flags ...string) {
	n.lab.t.Helper()
	for _, f := range flags {
		switch f {
		case "random", "fully-random", "persistent":
		default:
			n.lab.t.Fatalf("netns: masquerade flag %q: want random, fully-random or persistent", f)
		}
	}
	n.Forward()
	n.NFT(fmt.Sprintf(`table ip netns_nat {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname %q masquerade %s
	}
}
`, outIf, strings.Join(flags, ",")))
}

// cleanup kills every process the Lab started and everything else still in
// its namespaces, writes log tails if the test failed, and deletes the
// namespaces.
func (l *Lab) cleanup() {
	l.mu.Lock()
	procs := append([]*Proc(nil), l.procs...)
	nss := append([]*NS(nil), l.nss...)
	logs := append([]namedLog(nil), l.logs...)
	l.mu.Unlock()

	states := make([]string, len(procs)) // before we kill them
	for i, p := range procs {
		states[i] = p.state()
	}
	for i := len(procs) - 1; i >= 0; i-- {
		_ = procs[i].Kill()
	}
	for i := len(procs) - 1; i >= 0; i-- {
		select {
		case <-procs[i].done:
		case <-time.After(killWait):
			l.t.Errorf("netns: process %s (pid %d) still running %v after SIGKILL", procs[i].name, procs[i].pid, killWait)
		}
	}
	// Anything else inside our namespaces (children that left the process
	// group, commands started by Run that outlived a timeout) is ours too.
	for _, ns := range nss {
		out, _ := exec.Command("ip", "netns", "pids", ns.name).Output()
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}

	if l.t.Failed() {
		for i, p := range procs {
			l.t.Logf("netns: --- log of %s (in %s, %s at cleanup) ---\n%s", p.name, p.ns.name, states[i], tail(p.logPath))
		}
		for _, lg := range logs {
			l.t.Logf("netns: --- log %s (%s) ---\n%s", lg.name, lg.path, tail(lg.path))
		}
	}

	for i := len(nss) - 1; i >= 0; i-- {
		if out, err := exec.Command("ip", "netns", "del", nss[i].name).CombinedOutput(); err != nil {
			l.t.Errorf("netns: ip netns del %s: %v: %s", nss[i].name, err, out)
		}
	}
}

// tail returns the end of the file at path: at most logTailLines lines and
// logTailBytes bytes.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	cut := false
	if len(b) > logTailBytes {
		b, cut = b[len(b)-logTailBytes:], true
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > logTailLines {
		lines, cut = lines[len(lines)-logTailLines:], true
	}
	s := strings.Join(lines, "\n")
	if cut {
		s = "[... earlier lines cut ...]\n" + s
	}
	return s
}
