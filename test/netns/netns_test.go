package netns

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// waitFor polls cond every 50ms until it returns nil or d passes, then fails
// the test with cond's last error.
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
		time.Sleep(50 * time.Millisecond)
	}
}

func TestLinkAndSwitch(t *testing.T) {
	lab := New(t, "lnk")
	a, b := lab.AddNS("a"), lab.AddNS("b")
	lab.Link(a, "eth0", "10.1.0.1/30", b, "eth0", "10.1.0.2/30")
	a.MustRun("ping", "-c1", "-W2", "10.1.0.2")

	sw := lab.AddSwitch("sw")
	c := lab.AddNS("c")
	sw.Attach(a, "lan0", "10.2.0.1/24")
	sw.Attach(b, "lan0", "10.2.0.2/24")
	sw.Attach(c, "lan0", "10.2.0.3/24")
	for _, dst := range []string{"10.2.0.2", "10.2.0.3"} {
		a.MustRun("ping", "-c1", "-W2", dst)
	}

	// c reaches 10.1.0.2 only through a, once a routes.
	a.Forward()
	c.AddRoute("10.1.0.0/30", "10.2.0.1")
	c.MustRun("ping", "-c1", "-W2", "10.1.0.2")

	// Nothing leaked into the root namespace.
	out, err := exec.Command("ip", "-o", "link").Output()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "lan0") || strings.Contains(string(out), lab.Tag()) {
		t.Errorf("root namespace has one of our links:\n%s", out)
	}
}

func TestMasquerade(t *testing.T) {
	Require(t, "socat", "nft")
	lab := New(t, "nat")
	client, nat, server := lab.AddNS("client"), lab.AddNS("nat"), lab.AddNS("server")
	lab.Link(client, "eth0", "192.168.7.2/24", nat, "in0", "192.168.7.1/24")
	lab.Link(nat, "out0", "198.51.100.2/24", server, "eth0", "198.51.100.1/24")
	client.DefaultRoute("192.168.7.1")
	nat.Masquerade("out0", "fully-random")

	// The echo server answers each datagram with the peer address it saw.
	lab.Start(server, "echo", "socat", "-T5", "UDP4-RECVFROM:7007,fork",
		`SYSTEM:echo "$SOCAT_PEERADDR:$SOCAT_PEERPORT"`)
	var got string
	waitFor(t, 10*time.Second, "udp echo through the nat", func() error {
		out, err := client.Run("sh", "-c", "echo hi | socat -t1 -T2 - UDP4:198.51.100.1:7007,sourceport=5555")
		if err != nil {
			return err
		}
		if got = strings.TrimSpace(out); got == "" {
			return errors.New("no reply")
		}
		return nil
	})
	host, port, _ := strings.Cut(got, ":")
	if host != "198.51.100.2" {
		t.Fatalf("server saw %q, want the nat's address 198.51.100.2", got)
	}
	if port == "5555" {
		t.Errorf("server saw source port 5555: fully-random masquerade kept the client's port")
	}
	// The client is not reachable from the server side.
	if _, err := server.Run("ping", "-c1", "-W1", "192.168.7.2"); err == nil {
		t.Error("server reached the client's private address directly")
	}
}

func TestStartAndCleanup(t *testing.T) {
	var tag string
	var pids []int
	runDir := t.TempDir()
	t.Run("lab", func(t *testing.T) {
		lab := New(t, "cln")
		tag = lab.Tag()
		ns := lab.AddNS("x")
		// A private /run: the marker lands in runDir, not in the host's /run.
		p := lab.StartSpec(ns, "daemon", Spec{
			Args:  []string{"sh", "-c", `echo $$ > /run/netns-test.pid; echo started; sleep 300 & wait`},
			Binds: []Bind{PrivateRun(runDir)},
		})
		waitFor(t, 5*time.Second, "pid file in the private /run", func() error {
			_, err := os.Stat(filepath.Join(runDir, "netns-test.pid"))
			return err
		})
		if _, err := os.Stat("/run/netns-test.pid"); err == nil {
			t.Error("pid file written to the host's /run")
		}
		if b, _ := os.ReadFile(filepath.Join(runDir, "netns-test.pid")); strings.TrimSpace(string(b)) != fmt.Sprint(p.Pid()) {
			t.Errorf("pid file says %q, Pid() = %d (the program must be exec'd, not a child)", b, p.Pid())
		}
		waitFor(t, 5*time.Second, "log", func() error {
			if !strings.Contains(p.Log(), "started") {
				return fmt.Errorf("log %q", p.Log())
			}
			return nil
		})
		pids = nsPids(t, ns.Name())
		if len(pids) != 2 {
			t.Fatalf("want sh and sleep in the namespace, got pids %v", pids)
		}
		// A second process that the test ends itself.
		q := lab.Start(ns, "sleeper", "sleep", "300")
		if err := q.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := q.Wait(); err == nil || !strings.Contains(err.Error(), "terminated") {
			t.Errorf("Wait after SIGTERM = %v, want signal: terminated", err)
		}
		if err := q.Signal(syscall.SIGTERM); !errors.Is(err, ErrExited) {
			t.Errorf("Signal after exit = %v, want ErrExited", err)
		}
		// Leave p (and its child) running, for the cleanup to find.
	})
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), tag) {
		t.Errorf("namespaces left after cleanup:\n%s", out)
	}
	for _, pid := range pids {
		waitFor(t, 5*time.Second, fmt.Sprintf("pid %d gone", pid), func() error {
			return gone(pid)
		})
	}
}

func TestKillGroup(t *testing.T) {
	lab := New(t, "grp")
	ns := lab.AddNS("x")
	p := lab.Start(ns, "tree", "sh", "-c", "sleep 300 & sleep 300 & wait")
	waitFor(t, 5*time.Second, "three processes", func() error {
		if got := nsPids(t, ns.Name()); len(got) != 3 {
			return fmt.Errorf("pids %v", got)
		}
		return nil
	})
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := p.Wait(); err == nil {
		t.Error("Wait after Kill = nil")
	}
	waitFor(t, 5*time.Second, "empty namespace", func() error {
		if got := nsPids(t, ns.Name()); len(got) != 0 {
			return fmt.Errorf("pids %v", got)
		}
		return nil
	})
}

func TestNames(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"a", true},
		{"abc-123", true},
		{"fifteen-chars-x", true},
		{"sixteen-chars-xx", false},
		{"", false},
		{"Upper", false},
		{"sp ace", false},
	} {
		if err := checkName(tc.name); (err == nil) != tc.ok {
			t.Errorf("checkName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		} else if err != nil && !errors.Is(err, ErrName) {
			t.Errorf("checkName(%q) = %v, not ErrName", tc.name, err)
		}
	}
}

// fakeTB records Skipf and Fatalf instead of ending the test.
type fakeTB struct {
	testing.TB
	skipped, failed bool
}

func (f *fakeTB) Helper()               {}
func (f *fakeTB) Skipf(string, ...any)  { f.skipped = true }
func (f *fakeTB) Fatalf(string, ...any) { f.failed = true }

func TestRequireUnderCI(t *testing.T) {
	for _, ci := range []string{"", "true"} {
		t.Setenv("CI", ci)
		f := &fakeTB{TB: t}
		Require(f, "no-such-tool-ikelb")
		if ci == "true" && (!f.failed || f.skipped) {
			t.Errorf("CI=true: failed=%v skipped=%v, want a failure", f.failed, f.skipped)
		}
		if ci == "" && (f.failed || !f.skipped) {
			t.Errorf("CI unset: failed=%v skipped=%v, want a skip", f.failed, f.skipped)
		}
	}
}

// gone reports nil if pid no longer runs (it does not exist or is a zombie
// waiting for a reaper we do not control).
func gone(pid int) error {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	// pid (comm) STATE ...
	if i := strings.LastIndexByte(string(b), ')'); i > 0 && i+2 < len(b) && b[i+2] == 'Z' {
		return nil
	}
	return fmt.Errorf("still running: %s", b)
}

func nsPids(t *testing.T, ns string) []int {
	t.Helper()
	out, err := exec.Command("ip", "netns", "pids", ns).Output()
	if err != nil {
		t.Fatalf("ip netns pids %s: %v", ns, err)
	}
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		var pid int
		if _, err := fmt.Sscan(f, &pid); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}
