package topo

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ikelb/ikelb/test/netns"
)

// The test binary doubles as the small UDP programs the tests run inside
// namespaces (never switching namespaces in the test process itself): with
// TOPO_HELPER set, TestMain runs that helper instead of the tests.
const helperEnv = "TOPO_HELPER"

func TestMain(m *testing.M) {
	switch h := os.Getenv(helperEnv); h {
	case "":
		os.Exit(m.Run())
	case "listen":
		os.Exit(helperListen(os.Args[1:]))
	case "ping":
		os.Exit(helperPing(os.Args[1:]))
	case "probe":
		os.Exit(helperProbe(os.Args[1:]))
	default:
		fmt.Fprintf(os.Stderr, "unknown %s=%q\n", helperEnv, h)
		os.Exit(2)
	}
}

// freebind lets a socket bind an address the namespace does not hold (yet):
// a listener on the VIP in both balancers, which receives only while its
// node holds the VIP, and replies from the VIP.
func freebind(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, syscall.IP_FREEBIND, 1)
	}); err != nil {
		return err
	}
	return serr
}

// helperListen: listen NODE ADDR:PORT... — answers every datagram with NODE
// and prints "recv NODE LOCAL SRC" for the first datagram of each (LOCAL,
// SRC) pair; prints "ready" once bound.
func helperListen(args []string) int {
	if len(args) < 2 {
		fmt.Fprintln(os.Stderr, "listen NODE ADDR:PORT...")
		return 2
	}
	node := args[0]
	lc := net.ListenConfig{Control: freebind}
	var mu sync.Mutex // guards seen and stdout
	seen := map[string]bool{}
	var wg sync.WaitGroup
	for _, a := range args[1:] {
		c, err := lc.ListenPacket(context.Background(), "udp4", a)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		wg.Go(func() {
			buf := make([]byte, 2048)
			for {
				_, src, err := c.ReadFrom(buf)
				if err != nil {
					fmt.Fprintln(os.Stderr, err)
					return
				}
				mu.Lock()
				if k := a + " " + src.String(); !seen[k] {
					seen[k] = true
					fmt.Fprintf(os.Stdout, "recv %s %s\n", node, k)
				}
				mu.Unlock()
				_, _ = c.WriteTo([]byte(node), src)
			}
		})
	}
	fmt.Fprintln(os.Stdout, "ready")
	wg.Wait()
	return 1
}

// helperPing: ping DST INTERVAL DURATION — sends a datagram every INTERVAL
// for DURATION from one socket and prints "UNIXNANO PREVNANO NODE" for the
// first reply, each reply from another node than the one before, and each
// reply more than 3 intervals after the one before (PREVNANO: the previous
// reply's time, 0 for none): every gap and every change of node.
func helperPing(args []string) int {
	if len(args) != 3 {
		fmt.Fprintln(os.Stderr, "ping DST INTERVAL DURATION")
		return 2
	}
	every, err1 := time.ParseDuration(args[1])
	dur, err2 := time.ParseDuration(args[2])
	if err := errors.Join(err1, err2); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	c, err := net.ListenPacket("udp4", ":0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	dst, err := net.ResolveUDPAddr("udp4", args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	end := time.Now().Add(dur)
	go func() {
		buf := make([]byte, 256)
		var prev time.Time
		var prevNode string
		for {
			_ = c.SetReadDeadline(end)
			n, _, err := c.ReadFrom(buf)
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					return
				}
				continue
			}
			now, node := time.Now(), string(buf[:n])
			if prev.IsZero() || node != prevNode || now.Sub(prev) > 3*every {
				var p int64
				if !prev.IsZero() {
					p = prev.UnixNano()
				}
				fmt.Fprintf(os.Stdout, "%d %d %s\n", now.UnixNano(), p, node)
			}
			prev, prevNode = now, node
		}
	}()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for seq := 0; time.Now().Before(end); seq++ {
		_, _ = c.WriteTo([]byte(strconv.Itoa(seq)), dst)
		<-tick.C
	}
	return 0
}

// helperProbe: probe SRC>DST... — for each pair, sends one datagram from
// SRC (addr:port, port 0 for any) to DST, waits up to 1 s for the answer,
// and prints "SRC>DST NODE" with SRC's actual port (NODE "-" if none came).
func helperProbe(args []string) int {
	for _, a := range args {
		src, dst, ok := strings.Cut(a, ">")
		if !ok {
			fmt.Fprintln(os.Stderr, "probe SRC>DST...")
			return 2
		}
		c, err := net.ListenPacket("udp4", src)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		d, err := net.ResolveUDPAddr("udp4", dst)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		node := "-"
		buf := make([]byte, 256)
		_ = c.SetDeadline(time.Now().Add(time.Second))
		if _, err := c.WriteTo([]byte("probe"), d); err == nil {
			if n, _, err := c.ReadFrom(buf); err == nil {
				node = string(buf[:n])
			}
		}
		fmt.Fprintf(os.Stdout, "%s>%s %s\n", c.LocalAddr(), dst, node)
		c.Close()
	}
	return 0
}

func helperArgs(t *testing.T, mode string, args ...string) []string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return append([]string{"env", helperEnv + "=" + mode, exe}, args...)
}

// startListener runs the listen helper in ns, answering as node on every
// one of addrs, and waits until it is bound.
func startListener(t *testing.T, lab *netns.Lab, ns *netns.NS, node string, addrs ...netip.AddrPort) *netns.Proc {
	t.Helper()
	args := []string{node}
	for _, a := range addrs {
		args = append(args, a.String())
	}
	p := lab.StartSpec(ns, "listen-"+node, netns.Spec{Args: helperArgs(t, "listen", args...)})
	waitFor(t, 10*time.Second, "listener "+node+" ready", func() error {
		if exited, err := p.Exited(); exited {
			return fmt.Errorf("exited: %v: %s", err, p.Log())
		}
		if !strings.Contains(p.Log(), "ready") {
			return errors.New("not yet")
		}
		return nil
	})
	return p
}

// probeResult is one answered (or not) probe.
type probeResult struct {
	src  netip.AddrPort
	dst  string
	node string
}

// probe sends one datagram per pair from ns and returns who answered.
func probe(t *testing.T, ns *netns.NS, pairs ...string) []probeResult {
	t.Helper()
	out, err := ns.Run(helperArgs(t, "probe", pairs...)...)
	if err != nil {
		t.Fatal(err)
	}
	var res []probeResult
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		pair, node, ok := strings.Cut(line, " ")
		src, dst, ok2 := strings.Cut(pair, ">")
		ap, err := netip.ParseAddrPort(src)
		if !ok || !ok2 || err != nil {
			t.Fatalf("probe output %q", line)
		}
		res = append(res, probeResult{ap, dst, node})
	}
	if len(res) != len(pairs) {
		t.Fatalf("probe: %d results for %d pairs:\n%s", len(res), len(pairs), out)
	}
	return res
}

// reply is one answer the ping helper reported.
type reply struct {
	at, prev time.Time // prev: the reply before it (zero for none)
	node     string
}

// replies parses the ping helper's log so far.
func replies(p *netns.Proc) []reply {
	var rs []reply
	for _, line := range strings.Split(p.Log(), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			continue
		}
		at, err1 := strconv.ParseInt(f[0], 10, 64)
		prev, err2 := strconv.ParseInt(f[1], 10, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		r := reply{at: time.Unix(0, at), node: f[2]}
		if prev != 0 {
			r.prev = time.Unix(0, prev)
		}
		rs = append(rs, r)
	}
	return rs
}

// waitFor polls cond every 10 ms until it returns nil or d passes, then
// fails the test with cond's last error.
func waitFor(t *testing.T, d time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, d, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
