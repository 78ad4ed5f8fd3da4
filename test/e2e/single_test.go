package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	"github.com/ikelb/ikelb/test/ikesim"
)

// loopbackLab is one ikelbd process on loopback with three stand-in IKEv2
// servers on 127.0.0.21-23. Ports 500/4500 are replaced by free high ports
// so the test needs no root.
type loopbackLab struct {
	d           *Daemon
	admin       ikelbv1.AdminServiceClient
	p500, p4500 uint16
	responders  []*ikesim.Responder
	backends    map[string]string // responder name → address
}

var loopBackends = []string{"127.0.0.21", "127.0.0.22", "127.0.0.23"}

const loopVIP = "127.0.0.20"

func newLoopbackLab(t *testing.T, healthCheck string) *loopbackLab {
	t.Helper()
	ports := FreeUDPPorts(t, 2, append([]string{loopVIP}, loopBackends...)...)
	l := &loopbackLab{p500: uint16(ports[0]), p4500: uint16(ports[1]), backends: map[string]string{}}
	for i, addr := range loopBackends {
		name := fmt.Sprintf("vpn-%c", 'a'+i)
		r, err := ikesim.Listen(name, net.JoinHostPort(addr, fmt.Sprint(l.p500)), net.JoinHostPort(addr, fmt.Sprint(l.p4500)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		l.responders = append(l.responders, r)
		l.backends[name] = addr
	}
	admin := fmt.Sprintf("127.0.0.1:%d", FreePort(t, "127.0.0.1"))
	cfg := fmt.Sprintf(`node: e2e-1
data_dir: ./data
admin_address: %s
metrics_address: 127.0.0.1:%d
raft:
  bind_address: 127.0.0.1:%d
services:
  - name: vpn
    vip: %s
    ports: [%d, %d]
    persistence_timeout: 1h
    health_check: {type: %s, port: %d, interval: 500ms, timeout: 400ms, rise: 1, fall: 2}
    backends: [%s]
`, admin, FreePort(t, "127.0.0.1"), FreePort(t, "127.0.0.1"), loopVIP, l.p500, l.p4500, healthCheck, l.p500, strings.Join(loopBackends, ", "))
	l.d = StartDaemon(t, "ikelbd", admin, cfg)
	l.d.WaitReady(20 * time.Second)
	l.admin = l.d.Client()
	Eventually(t, 20*time.Second, func() bool {
		_, err := l.admin.GetService(context.Background(), &ikelbv1.GetServiceRequest{Name: "vpn"})
		return err == nil
	}, func() string { return "service vpn from the config file was not created" })
	return l
}

func (l *loopbackLab) run(t *testing.T, clients int, base string) ikesim.Report {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	rep, err := ikesim.Run(ctx, ikesim.Options{
		Clients: clients, Concurrency: 64,
		VIP: netip.MustParseAddr(loopVIP), IKEPort: l.p500, NATTPort: l.p4500,
		SourceBase: netip.MustParseAddr(base), Fragments: 2, ESP: 2, Keepalives: 1,
		Timeout: time.Second, Retries: 5,
	})
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// affinities lists every committed affinity of service vpn: client → backend.
func affinities(t *testing.T, admin ikelbv1.AdminServiceClient) map[string]string {
	t.Helper()
	m := map[string]string{}
	token := ""
	for {
		resp, err := admin.ListAffinities(context.Background(), &ikelbv1.ListAffinitiesRequest{Service: "vpn", PageSize: 500, PageToken: token})
		if err != nil {
			t.Fatalf("list affinities: %v", err)
		}
		for _, a := range resp.Affinities {
			m[a.Client] = a.Backend
		}
		if token = resp.NextPageToken; token == "" {
			return m
		}
	}
}

// TestThousandClientsFollowAcrossPorts: 1,000 simulated clients send
// IKE_SA_INIT to the "500" port and IKE_AUTH (fragmented), ESP and a
// keepalive to the "4500" port from a new source port; each must reach one
// backend on both ports, and the committed table must say the same.
func TestThousandClientsFollowAcrossPorts(t *testing.T) {
	l := newLoopbackLab(t, "ikev2")
	rep := l.run(t, 1000, "127.10.0.0")
	if rep.Failed != 0 || rep.Split != 0 {
		for _, r := range rep.Results {
			if r.Err != nil || r.Split {
				t.Errorf("client %s: ike=%s natt=%s err=%v", r.IKESource, r.IKEResponder, r.NATTResponder, r.Err)
				break
			}
		}
		t.Fatalf("%d clients failed, %d split across backends", rep.Failed, rep.Split)
	}
	for name, n := range rep.ByResponder {
		if n < 200 {
			t.Errorf("backend %s got %d of 1000 clients; the hash should spread them about evenly", name, n)
		}
	}
	var table map[string]string
	Eventually(t, 20*time.Second, func() bool {
		table = affinities(t, l.admin)
		return len(table) == 1000
	}, func() string { return fmt.Sprintf("%d of 1000 affinities committed", len(table)) })
	for _, r := range rep.Results {
		if got, want := table[r.IKESource.Addr().String()], l.backends[r.IKEResponder]; got != want {
			t.Fatalf("client %s landed on %s but the committed affinity says %s", r.IKESource.Addr(), want, got)
		}
	}
}

// TestSIGKILLKeepsAffinities: after SIGKILL and restart every committed
// affinity and the configuration are back, and clients reach the same
// backends as before.
func TestSIGKILLKeepsAffinities(t *testing.T) {
	l := newLoopbackLab(t, "none")
	first := l.run(t, 300, "127.11.0.0")
	if first.Failed != 0 || first.Split != 0 {
		t.Fatalf("before kill: %d failed, %d split", first.Failed, first.Split)
	}
	// A drain committed before the kill must survive it too.
	if _, err := l.admin.SetBackend(context.Background(), &ikelbv1.SetBackendRequest{
		Service: "vpn", Address: loopBackends[2], State: ikelbv1.BackendState_BACKEND_STATE_DRAIN,
	}); err != nil {
		t.Fatal(err)
	}
	var before map[string]string
	Eventually(t, 20*time.Second, func() bool {
		before = affinities(t, l.admin)
		return len(before) == 300
	}, func() string { return fmt.Sprintf("%d of 300 committed", len(before)) })

	l.d.Kill()
	l.d.Start()
	l.d.WaitReady(20 * time.Second)
	l.admin = l.d.Client()

	after := affinities(t, l.admin)
	if len(after) != len(before) {
		t.Fatalf("after SIGKILL: %d affinities, want %d", len(after), len(before))
	}
	for c, b := range before {
		if after[c] != b {
			t.Fatalf("client %s: backend %s before SIGKILL, %q after", c, b, after[c])
		}
	}
	svc, err := l.admin.GetService(context.Background(), &ikelbv1.GetServiceRequest{Name: "vpn"})
	if err != nil {
		t.Fatal(err)
	}
	if st := svc.Service.Backends[2].State; st != ikelbv1.BackendState_BACKEND_STATE_DRAIN {
		t.Fatalf("backend %s state after restart = %v, want DRAIN", loopBackends[2], st)
	}
	again := l.run(t, 300, "127.11.0.0")
	for _, r := range again.Results {
		if r.Err != nil || r.Split {
			t.Fatalf("client %s after restart: split=%v err=%v", r.IKESource, r.Split, r.Err)
		}
		if want := before[r.IKESource.Addr().String()]; l.backends[r.IKEResponder] != want {
			t.Fatalf("client %s reached %s after restart, committed backend is %s", r.IKESource.Addr(), l.backends[r.IKEResponder], want)
		}
	}
}

// TestMalformedDatagramsDoNotHurt sends garbage of every size to both ports;
// the node stays up and forwards real clients afterwards.
func TestMalformedDatagramsDoNotHurt(t *testing.T) {
	l := newLoopbackLab(t, "none")
	c, err := net.ListenPacket("udp", "127.12.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	payloads := [][]byte{{}, {0xff}, {0, 0, 0, 0}, {0, 0, 0, 0, 1}, make([]byte, 27), make([]byte, 28), make([]byte, 9000)}
	for i := range 200 {
		b := make([]byte, i)
		for j := range b {
			b[j] = byte(i*7 + j)
		}
		payloads = append(payloads, b)
	}
	for _, port := range []uint16{l.p500, l.p4500} {
		dst := &net.UDPAddr{IP: net.ParseIP(loopVIP), Port: int(port)}
		for _, p := range payloads {
			if _, err := c.WriteTo(p, dst); err != nil {
				t.Fatal(err)
			}
		}
	}
	rep := l.run(t, 20, "127.12.1.0")
	if rep.Failed != 0 || rep.Split != 0 {
		t.Fatalf("after garbage: %d failed, %d split", rep.Failed, rep.Split)
	}
	if !l.d.Running() {
		t.Fatal("ikelbd exited")
	}
	cnt, err := l.admin.GetCounters(context.Background(), &ikelbv1.GetCountersRequest{Service: "vpn"})
	if err != nil {
		t.Fatal(err)
	}
	if got := cnt.Services[0].Packets; got < uint64(2*len(payloads)) {
		t.Errorf("service counted %d packets, sent at least %d", got, 2*len(payloads))
	}
}

// TestGrpcurl drives the admin API with grpcurl the way an operator's
// script would: reflection, a create, a read, and InvalidArgument naming
// the field.
func TestGrpcurl(t *testing.T) {
	l := newLoopbackLab(t, "none")
	grpcurl := func(args ...string) (string, error) {
		cmd := exec.Command("go", append([]string{"tool", "grpcurl", "-plaintext"}, args...)...)
		cmd.Dir = repoRoot()
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := grpcurl(l.d.Admin, "list")
	if err != nil {
		t.Fatalf("grpcurl list: %v\n%s", err, out)
	}
	for _, want := range []string{"ikelb.v1.AdminService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} {
		if !strings.Contains(out, want) {
			t.Errorf("grpcurl list: missing %s in:\n%s", want, out)
		}
	}
	out, err = grpcurl("-d", `{"service":{"name":"lab","vip":"127.0.0.30","ports":[`+fmt.Sprint(l.p500)+`],"backends":[{"address":"127.0.0.21"}],"health_check":{"type":"HEALTH_CHECK_TYPE_NONE"}}}`,
		l.d.Admin, "ikelb.v1.AdminService/CreateService")
	if err != nil {
		t.Fatalf("grpcurl CreateService: %v\n%s", err, out)
	}
	if !strings.Contains(out, `"persistenceTimeout": "300s"`) {
		t.Errorf("CreateService response lacks the default persistence timeout:\n%s", out)
	}
	out, err = grpcurl("-d", `{"name":"lab"}`, l.d.Admin, "ikelb.v1.AdminService/GetService")
	if err != nil || !strings.Contains(out, `"127.0.0.30"`) {
		t.Fatalf("grpcurl GetService: %v\n%s", err, out)
	}
	out, err = grpcurl("-d", `{"service":{"name":"bad","vip":"10.0.0.300"}}`, l.d.Admin, "ikelb.v1.AdminService/CreateService")
	if err == nil || !strings.Contains(out, "InvalidArgument") || !strings.Contains(out, "service.vip") {
		t.Fatalf("grpcurl invalid CreateService: want InvalidArgument naming service.vip, got err=%v\n%s", err, out)
	}
	out, err = grpcurl(l.d.Admin, "grpc.health.v1.Health/Check")
	if err != nil || !strings.Contains(out, "SERVING") {
		t.Fatalf("grpcurl health check: %v\n%s", err, out)
	}
}

// TestInvalidRequestsNameTheField checks InvalidArgument over a real
// connection for a few requests an operator might get wrong.
func TestInvalidRequestsNameTheField(t *testing.T) {
	l := newLoopbackLab(t, "none")
	ctx := context.Background()
	cases := []struct {
		name  string
		call  func() error
		field string
	}{
		{"backend weight", func() error {
			_, err := l.admin.AddBackend(ctx, &ikelbv1.AddBackendRequest{Service: "vpn", Backend: &ikelbv1.Backend{Address: "127.0.0.24", Weight: 5000}})
			return err
		}, "backend.weight"},
		{"backend family", func() error {
			_, err := l.admin.AddBackend(ctx, &ikelbv1.AddBackendRequest{Service: "vpn", Backend: &ikelbv1.Backend{Address: "2001:db8::1"}})
			return err
		}, "backend.address"},
		{"lookup client", func() error {
			_, err := l.admin.LookupAffinity(ctx, &ikelbv1.LookupAffinityRequest{Service: "vpn", Client: "not-an-ip"})
			return err
		}, "client"},
		{"page size", func() error {
			_, err := l.admin.ListAffinities(ctx, &ikelbv1.ListAffinitiesRequest{PageSize: 1 << 30})
			return err
		}, "page_size"},
	}
	for _, c := range cases {
		err := c.call()
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), c.field) {
			t.Errorf("%s: got %v, want InvalidArgument naming %s", c.name, err, c.field)
		}
	}
}

// TestIkelbctlApply applies a YAML file with ikelbctl against the daemon,
// drains a backend and reads the affinity table back.
func TestIkelbctlApply(t *testing.T) {
	l := newLoopbackLab(t, "none")
	file := t.TempDir() + "/svc.yaml"
	writeFile(t, file, fmt.Sprintf(`services:
  - name: office
    vip: 127.0.0.31
    ports: [%d, %d]
    persistence_timeout: 8h
    health_check: {type: none}
    backends:
      - {address: 127.0.0.21, weight: 100}
      - {address: 127.0.0.22, weight: 200}
`, l.p500, l.p4500))
	out, err := l.d.Ctl("apply", "-f", file)
	if err != nil || !strings.Contains(out, "service/office created") {
		t.Fatalf("apply: %v\n%s", err, out)
	}
	out, err = l.d.Ctl("apply", "-f", file)
	if err != nil || !strings.Contains(out, "unchanged") {
		t.Fatalf("second apply: %v\n%s", err, out)
	}
	if out, err := l.d.Ctl("backend", "drain", "office", "127.0.0.22"); err != nil {
		t.Fatalf("drain: %v\n%s", err, out)
	}
	out, err = l.d.Ctl("service", "get", "office", "-o", "json")
	if err != nil || !strings.Contains(out, "BACKEND_STATE_DRAIN") {
		t.Fatalf("get: %v\n%s", err, out)
	}
	l.run(t, 10, "127.13.0.0")
	out, err = l.d.Ctl("affinity", "list", "--service", "vpn")
	if err != nil || strings.Count(out, "127.13.0.") != 10 {
		t.Fatalf("affinity list: %v\n%s", err, out)
	}
}
