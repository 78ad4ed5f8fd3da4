// Package e2e runs ikelbd and ikelbctl as real processes — on loopback, or
// each node in its own network namespace with real IKEv2 peers — and drives
// them over gRPC the way an operator would.
package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// Binaries builds ikelbd and ikelbctl once per test process and returns
// their paths.
func Binaries(t testing.TB) (ikelbd, ikelbctl string) {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "ikelb-e2e-bin-")
		if buildErr != nil {
			return
		}
		root := repoRoot()
		for _, name := range []string{"ikelbd", "ikelbctl"} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, name), "./cmd/"+name)
			cmd.Dir = root
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build %s: %v\n%s", name, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, "ikelbd"), filepath.Join(binDir, "ikelbctl")
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// FreePort returns a TCP port free on ip at the time of the call.
func FreePort(t testing.TB, ip string) int {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// FreeUDPPorts returns n distinct UDP ports that are free on every one of ips.
func FreeUDPPorts(t testing.TB, n int, ips ...string) []int {
	t.Helper()
	var ports []int
	seen := map[int]bool{}
	for attempt := 0; len(ports) < n && attempt < 1000; attempt++ {
		c, err := net.ListenPacket("udp", net.JoinHostPort(ips[0], "0"))
		if err != nil {
			t.Fatal(err)
		}
		p := c.LocalAddr().(*net.UDPAddr).Port
		ok := !seen[p]
		var held []net.PacketConn
		for _, ip := range ips[1:] {
			o, err := net.ListenPacket("udp", net.JoinHostPort(ip, fmt.Sprint(p)))
			if err != nil {
				ok = false
				break
			}
			held = append(held, o)
		}
		c.Close()
		for _, h := range held {
			h.Close()
		}
		if ok {
			seen[p] = true
			ports = append(ports, p)
		}
	}
	if len(ports) < n {
		t.Fatalf("could not find %d free UDP ports on %v", n, ips)
	}
	return ports
}

// Daemon is one ikelbd process.
type Daemon struct {
	t      testing.TB
	Name   string
	Dir    string // data dir and log
	Admin  string // admin gRPC address
	Config string // config file path
	bin    string
	prefix []string // e.g. ip netns exec NS

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	log  *os.File
}

// StartDaemon writes config to a file and starts ikelbd --config on it.
// prefix, if any, is prepended to the command (e.g. "ip", "netns", "exec", NS).
func StartDaemon(t testing.TB, name, admin, config string, prefix ...string) *Daemon {
	t.Helper()
	bin, _ := Binaries(t)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "ikelbd.yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	d := &Daemon{t: t, Name: name, Dir: dir, Admin: admin, Config: cfgPath, bin: bin, prefix: prefix}
	d.Start()
	t.Cleanup(func() {
		d.Kill()
		if t.Failed() {
			d.DumpLog()
		}
	})
	return d
}

// Start (re)starts the process on the same config and data dir.
func (d *Daemon) Start() {
	d.t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	logf, err := os.OpenFile(filepath.Join(d.Dir, "ikelbd.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		d.t.Fatal(err)
	}
	args := append(append([]string{}, d.prefix...), d.bin, "--config", d.Config)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = d.Dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		d.t.Fatalf("start %s: %v", d.Name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	d.cmd, d.done, d.log = cmd, done, logf
}

// Kill sends SIGKILL to the daemon's process group and waits for it.
func (d *Daemon) Kill() { d.signal(syscall.SIGKILL) }

// Stop sends SIGTERM and waits for a clean exit.
func (d *Daemon) Stop() { d.signal(syscall.SIGTERM) }

func (d *Daemon) signal(sig syscall.Signal) {
	d.mu.Lock()
	cmd, done, logf := d.cmd, d.done, d.log
	d.cmd = nil
	d.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, sig)
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
	logf.Close()
}

// Running reports whether the process is alive.
func (d *Daemon) Running() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return false
	}
	select {
	case <-d.done:
		return false
	default:
		return true
	}
}

// Log returns the daemon's log so far.
func (d *Daemon) Log() string {
	b, _ := os.ReadFile(filepath.Join(d.Dir, "ikelbd.log"))
	return string(b)
}

// DumpLog writes the daemon's log to the test log.
func (d *Daemon) DumpLog() {
	log := d.Log()
	if len(log) > 20000 {
		log = "…" + log[len(log)-20000:]
	}
	d.t.Logf("=== %s log ===\n%s", d.Name, log)
}

// Client dials the admin API.
func (d *Daemon) Client() ikelbv1.AdminServiceClient {
	d.t.Helper()
	conn, err := grpc.NewClient(d.Admin, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		d.t.Fatal(err)
	}
	d.t.Cleanup(func() { conn.Close() })
	return ikelbv1.NewAdminServiceClient(conn)
}

// WaitReady polls the admin API until the node reports a leader and is not
// degraded, or fails the test after timeout.
func (d *Daemon) WaitReady(timeout time.Duration) {
	d.t.Helper()
	c := d.Client()
	var last string
	Eventually(d.t, timeout, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		st, err := c.GetNodeStatus(ctx, &ikelbv1.GetNodeStatusRequest{})
		if err != nil {
			last = err.Error()
			return false
		}
		last = fmt.Sprintf("raft_state=%s leader=%q degraded=%v", st.RaftState, st.Leader, st.Degraded)
		return st.Leader != "" && !st.Degraded
	}, func() string { return d.Name + " not ready: " + last })
}

// Eventually polls cond every 50ms until it is true or fails the test with
// msg() after timeout.
func Eventually(t testing.TB, timeout time.Duration, cond func() bool, msg func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", timeout, msg())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Ctl runs ikelbctl against the daemon and returns its combined output.
func (d *Daemon) Ctl(args ...string) (string, error) {
	_, ctl := Binaries(d.t)
	cmd := exec.Command(ctl, append([]string{"--addr", d.Admin}, args...)...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
