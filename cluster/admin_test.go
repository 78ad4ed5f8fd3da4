package cluster

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ikelb/ikelb/dataplane"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/types/known/durationpb"
)

func contains(s, sub string) bool { return strings.Contains(s, sub) }

func assertCode(t testing.TB, err error, code, msg string) {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code().String() != code || !strings.Contains(st.Message(), msg) {
		t.Fatalf("got %v %q, want %s containing %q", st.Code(), st.Message(), code, msg)
	}
}

// adminClient serves NewAdminServer(n) over bufconn and returns a client.
func adminClient(t testing.TB, n *Node) ikelbv1.AdminServiceClient {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer()
	ikelbv1.RegisterAdminServiceServer(srv, NewAdminServer(n))
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(lis)
	}()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		srv.Stop()
		<-done
	})
	return ikelbv1.NewAdminServiceClient(conn)
}

func adminNode(t testing.TB, eng Dataplane) (*Node, ikelbv1.AdminServiceClient) {
	cfg := testConfig(t)
	cfg.Stores = inmemStores()
	n := startNode(t, cfg, eng)
	return n, adminClient(t, n)
}

func TestAdminServiceCRUD(t *testing.T) {
	_, c := adminNode(t, &fakeEngine{})
	ctx := context.Background()
	created, err := c.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: apiService("vpn", "10.0.0.1", "10.1.0.1", "10.1.0.2")})
	if err != nil {
		t.Fatal(err)
	}
	s := created.GetService()
	if s.GetVersion() == 0 || len(s.GetPorts()) != 2 || s.GetPersistenceTimeout().AsDuration() != 5*time.Minute ||
		s.GetForwardingMode() != ikelbv1.ForwardingMode_FORWARDING_MODE_NAT || s.GetAffinityKey() != ikelbv1.AffinityKey_AFFINITY_KEY_SOURCE_IP ||
		s.GetBackends()[0].GetWeight() != 100 || s.GetBackends()[0].GetState() != ikelbv1.BackendState_BACKEND_STATE_ACTIVE ||
		s.GetHealthCheck().GetType() != ikelbv1.HealthCheckType_HEALTH_CHECK_TYPE_ICMP || s.GetHealthCheck().GetInterval().AsDuration() != 5*time.Second ||
		s.GetHealthCheck().GetTimeout().AsDuration() != 2*time.Second || s.GetHealthCheck().GetRise() != 2 || s.GetHealthCheck().GetFall() != 3 || s.GetHealthCheck().GetPort() != 500 {
		t.Fatalf("defaults not applied: %v", s)
	}
	_, err = c.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: apiService("vpn", "10.0.0.9")})
	assertCode(t, err, "AlreadyExists", "vpn")
	_, err = c.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: apiService("other", "10.0.0.1")})
	assertCode(t, err, "AlreadyExists", "port 500")

	got, err := c.GetService(ctx, &ikelbv1.GetServiceRequest{Name: "vpn"})
	if err != nil || got.GetService().GetVip() != "10.0.0.1" {
		t.Fatalf("get: %v %v", got, err)
	}
	_, err = c.GetService(ctx, &ikelbv1.GetServiceRequest{Name: "nope"})
	assertCode(t, err, "NotFound", "nope")

	// Update with compare-and-set.
	upd := apiService("vpn", "10.0.0.1", "10.1.0.2", "10.1.0.3")
	upd.PersistenceTimeout = durationpb.New(8 * time.Hour)
	upd.ForwardingMode = ikelbv1.ForwardingMode_FORWARDING_MODE_TRANSPARENT
	_, err = c.UpdateService(ctx, &ikelbv1.UpdateServiceRequest{Service: upd, ExpectedVersion: s.GetVersion() + 100})
	assertCode(t, err, "Aborted", "version")
	u, err := c.UpdateService(ctx, &ikelbv1.UpdateServiceRequest{Service: upd, ExpectedVersion: s.GetVersion()})
	if err != nil {
		t.Fatal(err)
	}
	if u.GetService().GetVersion() <= s.GetVersion() || u.GetService().GetPersistenceTimeout().AsDuration() != 8*time.Hour || len(u.GetService().GetBackends()) != 2 {
		t.Fatalf("updated %v", u.GetService())
	}
	_, err = c.UpdateService(ctx, &ikelbv1.UpdateServiceRequest{Service: apiService("nope", "10.0.0.7")})
	assertCode(t, err, "NotFound", "nope")

	c.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: apiService("v6", "2001:db8::1", "2001:db8:1::1")})
	list, err := c.ListServices(ctx, &ikelbv1.ListServicesRequest{})
	if err != nil || len(list.GetServices()) != 2 || list.GetServices()[0].GetName() != "v6" {
		t.Fatalf("list: %v %v", list, err)
	}
	if _, err := c.DeleteService(ctx, &ikelbv1.DeleteServiceRequest{Name: "v6"}); err != nil {
		t.Fatal(err)
	}
	_, err = c.DeleteService(ctx, &ikelbv1.DeleteServiceRequest{Name: "v6"})
	assertCode(t, err, "NotFound", "v6")
}

func TestAdminBackendOps(t *testing.T) {
	_, c := adminNode(t, &fakeEngine{})
	ctx := context.Background()
	if _, err := c.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: apiService("vpn", "10.0.0.1", "10.1.0.1")}); err != nil {
		t.Fatal(err)
	}
	r, err := c.AddBackend(ctx, &ikelbv1.AddBackendRequest{Service: "vpn", Backend: &ikelbv1.Backend{Address: "10.1.0.2", Weight: 7}})
	if err != nil || len(r.GetService().GetBackends()) != 2 || r.GetService().GetBackends()[1].GetWeight() != 7 {
		t.Fatalf("add: %v %v", r, err)
	}
	_, err = c.AddBackend(ctx, &ikelbv1.AddBackendRequest{Service: "vpn", Backend: &ikelbv1.Backend{Address: "10.1.0.2"}})
	assertCode(t, err, "AlreadyExists", "10.1.0.2")
	_, err = c.AddBackend(ctx, &ikelbv1.AddBackendRequest{Service: "vpn", Backend: &ikelbv1.Backend{Address: "2001:db8::5"}})
	assertCode(t, err, "InvalidArgument", "backend.address")
	_, err = c.AddBackend(ctx, &ikelbv1.AddBackendRequest{Service: "nope", Backend: &ikelbv1.Backend{Address: "10.1.0.5"}})
	assertCode(t, err, "NotFound", "nope")
	// A backend that is a VIP of ikelb's own, on a port it listens on,
	// would send every datagram back to ikelb as a new client.
	_, err = c.AddBackend(ctx, &ikelbv1.AddBackendRequest{Service: "vpn", Backend: &ikelbv1.Backend{Address: "10.0.0.1"}})
	assertCode(t, err, "InvalidArgument", `backend.address: "10.0.0.1" is the service's VIP`)
	if _, err := c.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: apiService("other", "10.0.0.2", "10.1.0.9")}); err != nil {
		t.Fatal(err)
	}
	_, err = c.AddBackend(ctx, &ikelbv1.AddBackendRequest{Service: "vpn", Backend: &ikelbv1.Backend{Address: "10.0.0.2"}})
	assertCode(t, err, "InvalidArgument", `backend.address: 10.0.0.2 is the VIP of service "other", which listens on port 500 too`)
	// On ports the other service does not listen on, it is only an address.
	alt := apiService("alt", "10.0.0.3", "10.0.0.2")
	alt.Ports = []uint32{5500}
	if _, err := c.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: alt}); err != nil {
		t.Fatalf("a backend that is another service's VIP on other ports: %v", err)
	}
	if _, err := c.DeleteService(ctx, &ikelbv1.DeleteServiceRequest{Name: "alt"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.DeleteService(ctx, &ikelbv1.DeleteServiceRequest{Name: "other"}); err != nil {
		t.Fatal(err)
	}

	s, err := c.SetBackend(ctx, &ikelbv1.SetBackendRequest{Service: "vpn", Address: "10.1.0.1", State: ikelbv1.BackendState_BACKEND_STATE_DRAIN})
	if err != nil || s.GetService().GetBackends()[0].GetState() != ikelbv1.BackendState_BACKEND_STATE_DRAIN || s.GetService().GetBackends()[0].GetWeight() != 100 {
		t.Fatalf("set state: %v %v", s, err)
	}
	s, err = c.SetBackend(ctx, &ikelbv1.SetBackendRequest{Service: "vpn", Address: "10.1.0.1", Weight: 3})
	if err != nil || s.GetService().GetBackends()[0].GetState() != ikelbv1.BackendState_BACKEND_STATE_DRAIN || s.GetService().GetBackends()[0].GetWeight() != 3 {
		t.Fatalf("set weight: %v %v", s, err)
	}
	_, err = c.SetBackend(ctx, &ikelbv1.SetBackendRequest{Service: "vpn", Address: "10.1.0.9", Weight: 3})
	assertCode(t, err, "NotFound", "10.1.0.9")

	rm, err := c.RemoveBackend(ctx, &ikelbv1.RemoveBackendRequest{Service: "vpn", Address: "10.1.0.1"})
	if err != nil || len(rm.GetService().GetBackends()) != 1 || rm.GetService().GetBackends()[0].GetAddress() != "10.1.0.2" {
		t.Fatalf("remove: %v %v", rm, err)
	}
	_, err = c.RemoveBackend(ctx, &ikelbv1.RemoveBackendRequest{Service: "vpn", Address: "10.1.0.1"})
	assertCode(t, err, "NotFound", "10.1.0.1")
}

func clientN(i int) string {
	return netip.AddrFrom4([4]byte{192, 0, byte(2 + i/250), byte(1 + i%250)}).String()
}

func TestAdminAffinities(t *testing.T) {
	n, c := adminNode(t, &fakeEngine{})
	ctx := context.Background()
	if _, err := c.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: apiService("vpn", "10.0.0.1", "10.1.0.1", "10.1.0.2")}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: apiService("b", "10.0.0.2", "10.1.0.1")}); err != nil {
		t.Fatal(err)
	}
	const total = 300
	for i := range total {
		n.Proposer().Propose(dataplane.Proposal{Kind: dataplane.ProposeBind, Key: key(1, clientN(i)), Backend: uint32(1 + i%3/2), At: testEpoch + int64(i+1)})
	}
	n.Proposer().Propose(dataplane.Proposal{Kind: dataplane.ProposeBind, Key: key(2, "192.0.2.1"), Backend: 1, At: testEpoch})
	waitFor(t, "binds", func() bool { return n.Table().Len() == total+1 })

	look, err := c.LookupAffinity(ctx, &ikelbv1.LookupAffinityRequest{Service: "vpn", Client: clientN(2)})
	if err != nil || look.GetAffinity().GetBackend() != "10.1.0.2" || look.GetAffinity().GetCreated().AsTime().UnixNano() != testEpoch+3 {
		t.Fatalf("lookup: %v %v", look, err)
	}
	_, err = c.LookupAffinity(ctx, &ikelbv1.LookupAffinityRequest{Service: "vpn", Client: "198.51.100.1"})
	assertCode(t, err, "NotFound", "198.51.100.1")

	// Page through everything of vpn on backend 10.1.0.1 (i%3 != 2 → 200 clients).
	seen := map[string]bool{}
	token, pages := "", 0
	last := ""
	for {
		resp, err := c.ListAffinities(ctx, &ikelbv1.ListAffinitiesRequest{Service: "vpn", Backend: "10.1.0.1", PageSize: 64, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		pages++
		for _, a := range resp.GetAffinities() {
			if a.GetBackend() != "10.1.0.1" || a.GetService() != "vpn" || seen[a.GetClient()] {
				t.Fatalf("unexpected %v (seen %v)", a, seen[a.GetClient()])
			}
			k := netip.MustParseAddr(a.GetClient())
			if last != "" && netip.MustParseAddr(last).Compare(k) >= 0 {
				t.Fatalf("out of order: %s after %s", a.GetClient(), last)
			}
			last = a.GetClient()
			seen[a.GetClient()] = true
		}
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
	}
	if len(seen) != 200 || pages != 4 {
		t.Fatalf("listed %d clients in %d pages, want 200 in 4", len(seen), pages)
	}
	all, err := c.ListAffinities(ctx, &ikelbv1.ListAffinitiesRequest{PageSize: 10000})
	if err != nil || len(all.GetAffinities()) != total+1 || all.GetNextPageToken() != "" {
		t.Fatalf("list all: %d %v", len(all.GetAffinities()), err)
	}

	if _, err := c.DeleteAffinity(ctx, &ikelbv1.DeleteAffinityRequest{Service: "vpn", Client: clientN(0)}); err != nil {
		t.Fatal(err)
	}
	_, err = c.DeleteAffinity(ctx, &ikelbv1.DeleteAffinityRequest{Service: "vpn", Client: clientN(0)})
	assertCode(t, err, "NotFound", clientN(0))

	fl, err := c.FlushAffinities(ctx, &ikelbv1.FlushAffinitiesRequest{Service: "vpn", Backend: "10.1.0.2"})
	if err != nil || fl.GetDeleted() != 100 {
		t.Fatalf("flush backend: %v %v", fl, err)
	}
	fl, err = c.FlushAffinities(ctx, &ikelbv1.FlushAffinitiesRequest{Service: "vpn"})
	if err != nil || fl.GetDeleted() != 199 {
		t.Fatalf("flush service: %v %v", fl, err)
	}
	if n.Table().Len() != 1 {
		t.Fatalf("%d left, want service b's 1", n.Table().Len())
	}
}

func TestAdminCountersAndStatus(t *testing.T) {
	eng := &fakeEngine{counters: []dataplane.ServiceCounters{{
		ID: 1, Name: "vpn", Packets: 10, Bytes: 1000, ReplyPackets: 9, ReplyBytes: 900, Drops: 2,
		Backends: []dataplane.BackendCounters{{ID: 1, Addr: netip.MustParseAddr("10.1.0.1"), Packets: 10, Bytes: 1000, ReplyPackets: 9, ReplyBytes: 900}},
	}}}
	n, c := adminNode(t, eng)
	ctx := context.Background()
	if _, err := c.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: apiService("vpn", "10.0.0.1", "10.1.0.1", "10.1.0.2")}); err != nil {
		t.Fatal(err)
	}
	proposeBinds(t, n, 5)
	resp, err := c.GetCounters(ctx, &ikelbv1.GetCountersRequest{Service: "vpn"})
	if err != nil || len(resp.GetServices()) != 1 {
		t.Fatalf("counters: %v %v", resp, err)
	}
	s := resp.GetServices()[0]
	if s.GetPackets() != 10 || s.GetReplyBytes() != 900 || s.GetDrops() != 2 || s.GetActiveClients() != 5 ||
		len(s.GetBackends()) != 2 || s.GetBackends()[0].GetActiveClients() != 5 || s.GetBackends()[0].GetPackets() != 10 || s.GetBackends()[1].GetPackets() != 0 {
		t.Fatalf("counters %v", s)
	}
	_, err = c.GetCounters(ctx, &ikelbv1.GetCountersRequest{Service: "nope"})
	assertCode(t, err, "NotFound", "nope")

	st, err := c.GetNodeStatus(ctx, &ikelbv1.GetNodeStatusRequest{})
	if err != nil || st.GetRaftState() != "Leader" || st.GetDegraded() || st.GetAffinities() != 5 || st.GetServices() != 1 ||
		st.GetRole() != "voter" || st.GetAppliedIndex() == 0 || st.GetLeader() != n.RaftAddr() || st.GetStarted() == nil {
		t.Fatalf("node status %v %v", st, err)
	}
	cs, err := c.GetClusterStatus(ctx, &ikelbv1.GetClusterStatusRequest{})
	if err != nil || len(cs.GetMembers()) != 1 || !cs.GetMembers()[0].GetLeader() || cs.GetMembers()[0].GetStatus() != "alive" || cs.GetTerm() == 0 {
		t.Fatalf("cluster status %v %v", cs, err)
	}
	h, err := c.GetHealth(ctx, &ikelbv1.GetHealthRequest{})
	if err != nil || len(h.GetBackends()) != 2 || h.GetBackends()[0].GetHealth() != ikelbv1.BackendHealth_BACKEND_HEALTH_UNSPECIFIED {
		t.Fatalf("health %v %v", h, err)
	}
}

func TestAdminInvalidRequests(t *testing.T) {
	_, c := adminNode(t, &fakeEngine{})
	ctx := context.Background()
	if _, err := c.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: apiService("vpn", "10.0.0.1", "10.1.0.1")}); err != nil {
		t.Fatal(err)
	}
	svc := func(edit func(s *ikelbv1.Service)) *ikelbv1.Service {
		s := apiService("new", "10.0.0.5", "10.1.0.1", "10.1.0.2")
		edit(s)
		return s
	}
	dur := durationpb.New
	creates := []struct {
		name string
		svc  *ikelbv1.Service
		want string
	}{
		{"nil", nil, "service: required"},
		{"no name", svc(func(s *ikelbv1.Service) { s.Name = "" }), "service.name: required"},
		{"bad name", svc(func(s *ikelbv1.Service) { s.Name = "Bad_Name" }), "service.name: \"Bad_Name\""},
		{"bad vip", svc(func(s *ikelbv1.Service) { s.Vip = "10.0.0.300" }), `service.vip: "10.0.0.300" is not an IP address`},
		{"no vip", svc(func(s *ikelbv1.Service) { s.Vip = "" }), "service.vip: required"},
		{"unspecified vip", svc(func(s *ikelbv1.Service) { s.Vip = "0.0.0.0" }), "service.vip"},
		{"zero port", svc(func(s *ikelbv1.Service) { s.Ports = []uint32{500, 0} }), "service.ports[1]"},
		{"big port", svc(func(s *ikelbv1.Service) { s.Ports = []uint32{70000} }), "service.ports[0]"},
		{"dup port", svc(func(s *ikelbv1.Service) { s.Ports = []uint32{500, 4500, 500} }), "service.ports: duplicate port 500"},
		{"bad backend", svc(func(s *ikelbv1.Service) { s.Backends[1].Address = "nope" }), "service.backends[1].address"},
		{"mixed family", svc(func(s *ikelbv1.Service) { s.Backends[0].Address = "2001:db8::1" }), "service.backends[0].address: \"2001:db8::1\" is IPv6 but the VIP is IPv4"},
		{"dup backend", svc(func(s *ikelbv1.Service) { s.Backends[1].Address = "10.1.0.1" }), "service.backends[1].address"},
		{"backend is the vip", svc(func(s *ikelbv1.Service) { s.Backends[1].Address = "10.0.0.5" }), `service.backends[1].address: "10.0.0.5" is the service's VIP`},
		{"backend is another vip", svc(func(s *ikelbv1.Service) { s.Backends[0].Address = "10.0.0.1" }), `service.backends[0].address: 10.0.0.1 is the VIP of service "vpn"`},
		{"vip is another's backend", svc(func(s *ikelbv1.Service) { s.Vip = "10.1.0.1"; s.Backends[0].Address = "10.1.0.3" }), `service.vip: 10.1.0.1 is a backend of service "vpn"`},
		{"weight", svc(func(s *ikelbv1.Service) { s.Backends[1].Weight = 1001 }), "service.backends[1].weight: must be 1..1000"},
		{"state", svc(func(s *ikelbv1.Service) { s.Backends[0].State = 9 }), "service.backends[0].state"},
		{"short timeout", svc(func(s *ikelbv1.Service) { s.PersistenceTimeout = dur(time.Millisecond) }), "service.persistence_timeout"},
		{"negative timeout", svc(func(s *ikelbv1.Service) { s.PersistenceTimeout = dur(-time.Minute) }), "service.persistence_timeout"},
		{"check type", svc(func(s *ikelbv1.Service) { s.HealthCheck = &ikelbv1.HealthCheck{Type: 7} }), "service.health_check.type"},
		{"check timeout", svc(func(s *ikelbv1.Service) {
			s.HealthCheck = &ikelbv1.HealthCheck{Interval: dur(time.Second), Timeout: dur(2 * time.Second)}
		}), "service.health_check.timeout"},
		{"rise", svc(func(s *ikelbv1.Service) { s.HealthCheck = &ikelbv1.HealthCheck{Rise: 1000} }), "service.health_check.rise"},
		{"fall", svc(func(s *ikelbv1.Service) { s.HealthCheck = &ikelbv1.HealthCheck{Fall: 1000} }), "service.health_check.fall"},
		{"check port", svc(func(s *ikelbv1.Service) { s.HealthCheck = &ikelbv1.HealthCheck{Port: 65536} }), "service.health_check.port"},
		{"mode", svc(func(s *ikelbv1.Service) { s.ForwardingMode = 5 }), "service.forwarding_mode"},
		{"key", svc(func(s *ikelbv1.Service) { s.AffinityKey = 5 }), "service.affinity_key"},
		{"snat family", svc(func(s *ikelbv1.Service) { s.SnatAddress = "2001:db8::9" }), "service.snat_address"},
		{"snat transparent", svc(func(s *ikelbv1.Service) {
			s.SnatAddress = "10.0.0.9"
			s.ForwardingMode = ikelbv1.ForwardingMode_FORWARDING_MODE_TRANSPARENT
		}), "service.snat_address: only used in NAT mode"},
	}
	for _, tt := range creates {
		t.Run("create/"+tt.name, func(t *testing.T) {
			_, err := c.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: tt.svc})
			assertCode(t, err, "InvalidArgument", tt.want)
		})
	}
	others := []struct {
		name string
		call func() error
		want string
	}{
		{"get no name", func() error { _, err := c.GetService(ctx, &ikelbv1.GetServiceRequest{}); return err }, "name: required"},
		{"delete bad name", func() error { _, err := c.DeleteService(ctx, &ikelbv1.DeleteServiceRequest{Name: "A"}); return err }, "name: "},
		{"add nil backend", func() error {
			_, err := c.AddBackend(ctx, &ikelbv1.AddBackendRequest{Service: "vpn"})
			return err
		}, "backend: required"},
		{"add weight", func() error {
			_, err := c.AddBackend(ctx, &ikelbv1.AddBackendRequest{Service: "vpn", Backend: &ikelbv1.Backend{Address: "10.1.0.7", Weight: 5000}})
			return err
		}, "backend.weight: must be 1..1000"},
		{"remove bad address", func() error {
			_, err := c.RemoveBackend(ctx, &ikelbv1.RemoveBackendRequest{Service: "vpn", Address: "x"})
			return err
		}, `address: "x" is not an IP address`},
		{"set nothing", func() error {
			_, err := c.SetBackend(ctx, &ikelbv1.SetBackendRequest{Service: "vpn", Address: "10.1.0.1"})
			return err
		}, "state: state or weight must be set"},
		{"set weight", func() error {
			_, err := c.SetBackend(ctx, &ikelbv1.SetBackendRequest{Service: "vpn", Address: "10.1.0.1", Weight: 1001})
			return err
		}, "weight: must be 1..1000"},
		{"lookup bad client", func() error {
			_, err := c.LookupAffinity(ctx, &ikelbv1.LookupAffinityRequest{Service: "vpn", Client: "1.2.3"})
			return err
		}, `client: "1.2.3" is not an IP address`},
		{"lookup client of the other family", func() error {
			_, err := c.LookupAffinity(ctx, &ikelbv1.LookupAffinityRequest{Service: "vpn", Client: "2001:db8::7"})
			return err
		}, `client: "2001:db8::7" is IPv6 but service "vpn"'s VIP is IPv4`},
		{"lookup no client", func() error {
			_, err := c.LookupAffinity(ctx, &ikelbv1.LookupAffinityRequest{Service: "vpn"})
			return err
		}, "client: required"},
		{"page size", func() error {
			_, err := c.ListAffinities(ctx, &ikelbv1.ListAffinitiesRequest{PageSize: 10001})
			return err
		}, "page_size: at most 10000"},
		{"page token", func() error {
			_, err := c.ListAffinities(ctx, &ikelbv1.ListAffinitiesRequest{PageToken: "!!"})
			return err
		}, "page_token: malformed"},
		{"list backend", func() error {
			_, err := c.ListAffinities(ctx, &ikelbv1.ListAffinitiesRequest{Backend: "x"})
			return err
		}, "backend: "},
		{"flush no service", func() error { _, err := c.FlushAffinities(ctx, &ikelbv1.FlushAffinitiesRequest{}); return err }, "service: required"},
		{"flush bad backend", func() error {
			_, err := c.FlushAffinities(ctx, &ikelbv1.FlushAffinitiesRequest{Service: "vpn", Backend: "::zz"})
			return err
		}, "backend: "},
		{"delete affinity bad client", func() error {
			_, err := c.DeleteAffinity(ctx, &ikelbv1.DeleteAffinityRequest{Service: "vpn", Client: "fe80::1%eth0"})
			return err
		}, "client: "},
	}
	for _, tt := range others {
		t.Run(tt.name, func(t *testing.T) { assertCode(t, tt.call(), "InvalidArgument", tt.want) })
	}
}

func TestGRPCErrorMapping(t *testing.T) {
	for _, tt := range []struct {
		err  error
		code string
	}{
		{ErrNotFound, "NotFound"}, {ErrExists, "AlreadyExists"}, {ErrAddrInUse, "AlreadyExists"},
		{ErrConflict, "Aborted"}, {ErrNotLeader, "Unavailable"}, {ErrShutdown, "Unavailable"},
		{ErrTimeout, "DeadlineExceeded"}, {context.DeadlineExceeded, "DeadlineExceeded"},
		{ErrInvalid, "InvalidArgument"}, {ErrUnsupported, "FailedPrecondition"}, {fmt.Errorf("boom"), "Internal"},
	} {
		wrapped := fmt.Errorf("context: %w", tt.err)
		assertCode(t, grpcError(wrapped), tt.code, "context: ")
	}
	if grpcError(nil) != nil {
		t.Fatal("nil error mapped to a status")
	}
}
