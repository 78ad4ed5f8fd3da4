package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

// fakeServer is an in-memory AdminService with the semantics ikelbctl
// relies on: versions that grow on every write, compare-and-set on update,
// NotFound/AlreadyExists, backends matched by address, and paged affinity
// listing. It sorts backends by address, as a real server may reorder them.
type fakeServer struct {
	ikelbv1.UnimplementedAdminServiceServer

	// pageCap bounds ListAffinities pages whatever the client asks, so that
	// following page tokens is exercised.
	pageCap int

	mu          sync.Mutex
	version     uint64
	services    map[string]*ikelbv1.Service
	affinities  []*ikelbv1.Affinity
	node        *ikelbv1.GetNodeStatusResponse
	cluster     *ikelbv1.GetClusterStatusResponse
	health      []*ikelbv1.BackendHealthStatus
	counters    []*ikelbv1.ServiceCounters
	calls       []string // method names, in order
	lastExpect  uint64   // expected_version of the last UpdateService
	beforeWrite func()   // called (without mu) before UpdateService applies
	blockStatus bool     // GetNodeStatus waits for the deadline
	stop        func()   // set by serve: stops the server (as a killed ikelbd)
}

func newFake() *fakeServer {
	return &fakeServer{pageCap: 100, services: map[string]*ikelbv1.Service{}}
}

// serve starts f on 127.0.0.1:0 and returns the address.
func (f *fakeServer) serve(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.serveOn(t, lis)
	return lis.Addr().String()
}

// serveOn starts f on lis.
func (f *fakeServer) serveOn(t *testing.T, lis net.Listener) {
	s := grpc.NewServer()
	ikelbv1.RegisterAdminServiceServer(s, f)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Serve(lis)
	}()
	f.stop = func() {
		s.Stop()
		<-done
	}
	t.Cleanup(f.stop)
}

func (f *fakeServer) called(m string) {
	f.calls = append(f.calls, m)
}

// writes returns the write methods called so far.
func (f *fakeServer) writes() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, c := range f.calls {
		if !strings.HasPrefix(c, "Get") && !strings.HasPrefix(c, "List") && !strings.HasPrefix(c, "Lookup") {
			out = append(out, c)
		}
	}
	return out
}

func (f *fakeServer) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.calls)
}

func (f *fakeServer) expectedVersion() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lastExpect
}

// bumpBeforeUpdate makes every UpdateService find that someone else wrote
// service name since the client read it.
func (f *fakeServer) bumpBeforeUpdate(name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.beforeWrite = func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.version++
		f.services[name].Version = f.version
	}
}

func (f *fakeServer) service(name string) *ikelbv1.Service {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s := f.services[name]; s != nil {
		return proto.Clone(s).(*ikelbv1.Service)
	}
	return nil
}

func notFound(name string) error { return status.Errorf(codes.NotFound, "service %q not found", name) }

// storeLocked saves s with a new version.
func (f *fakeServer) storeLocked(s *ikelbv1.Service) *ikelbv1.Service {
	f.version++
	s = proto.Clone(s).(*ikelbv1.Service)
	s.Version = f.version
	slices.SortFunc(s.Backends, func(a, b *ikelbv1.Backend) int { return strings.Compare(a.Address, b.Address) })
	f.services[s.Name] = s
	return proto.Clone(s).(*ikelbv1.Service)
}

func (f *fakeServer) CreateService(_ context.Context, r *ikelbv1.CreateServiceRequest) (*ikelbv1.CreateServiceResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("CreateService")
	s := r.GetService()
	if s.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "service.name: must be set")
	}
	if f.services[s.GetName()] != nil {
		return nil, status.Errorf(codes.AlreadyExists, "service %q already exists", s.GetName())
	}
	return &ikelbv1.CreateServiceResponse{Service: f.storeLocked(s)}, nil
}

func (f *fakeServer) GetService(_ context.Context, r *ikelbv1.GetServiceRequest) (*ikelbv1.GetServiceResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("GetService")
	s := f.services[r.GetName()]
	if s == nil {
		return nil, notFound(r.GetName())
	}
	return &ikelbv1.GetServiceResponse{Service: proto.Clone(s).(*ikelbv1.Service)}, nil
}

func (f *fakeServer) ListServices(context.Context, *ikelbv1.ListServicesRequest) (*ikelbv1.ListServicesResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("ListServices")
	resp := &ikelbv1.ListServicesResponse{}
	for _, s := range f.services {
		resp.Services = append(resp.Services, proto.Clone(s).(*ikelbv1.Service))
	}
	slices.SortFunc(resp.Services, func(a, b *ikelbv1.Service) int { return strings.Compare(a.Name, b.Name) })
	return resp, nil
}

func (f *fakeServer) UpdateService(_ context.Context, r *ikelbv1.UpdateServiceRequest) (*ikelbv1.UpdateServiceResponse, error) {
	f.mu.Lock()
	hook := f.beforeWrite
	f.mu.Unlock()
	if hook != nil {
		hook()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("UpdateService")
	f.lastExpect = r.GetExpectedVersion()
	cur := f.services[r.GetService().GetName()]
	if cur == nil {
		return nil, notFound(r.GetService().GetName())
	}
	if ev := r.GetExpectedVersion(); ev != 0 && ev != cur.Version {
		return nil, status.Errorf(codes.Aborted, "version conflict: service %q is at version %d, not %d", cur.Name, cur.Version, ev)
	}
	// Backends keep their health, matched by address.
	next := proto.Clone(r.GetService()).(*ikelbv1.Service)
	for _, b := range next.Backends {
		for _, old := range cur.Backends {
			if old.Address == b.Address {
				b.Health, b.HealthChanged = old.Health, old.HealthChanged
			}
		}
	}
	return &ikelbv1.UpdateServiceResponse{Service: f.storeLocked(next)}, nil
}

func (f *fakeServer) DeleteService(_ context.Context, r *ikelbv1.DeleteServiceRequest) (*ikelbv1.DeleteServiceResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("DeleteService")
	if f.services[r.GetName()] == nil {
		return nil, notFound(r.GetName())
	}
	delete(f.services, r.GetName())
	return &ikelbv1.DeleteServiceResponse{}, nil
}

func (f *fakeServer) AddBackend(_ context.Context, r *ikelbv1.AddBackendRequest) (*ikelbv1.AddBackendResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("AddBackend")
	s := f.services[r.GetService()]
	if s == nil {
		return nil, notFound(r.GetService())
	}
	b := proto.Clone(r.GetBackend()).(*ikelbv1.Backend)
	if net.ParseIP(b.GetAddress()) == nil {
		return nil, status.Errorf(codes.InvalidArgument, "backend.address: %q is not an IP address", b.GetAddress())
	}
	for _, old := range s.Backends {
		if old.Address == b.Address {
			return nil, status.Errorf(codes.AlreadyExists, "service %q already has backend %s", s.Name, b.Address)
		}
	}
	s = proto.Clone(s).(*ikelbv1.Service)
	s.Backends = append(s.Backends, b)
	return &ikelbv1.AddBackendResponse{Service: f.storeLocked(s)}, nil
}

func (f *fakeServer) findBackendLocked(service, addr string) (*ikelbv1.Service, int, error) {
	s := f.services[service]
	if s == nil {
		return nil, 0, notFound(service)
	}
	for i, b := range s.Backends {
		if b.Address == addr {
			return proto.Clone(s).(*ikelbv1.Service), i, nil
		}
	}
	return nil, 0, status.Errorf(codes.NotFound, "service %q has no backend %s", service, addr)
}

func (f *fakeServer) RemoveBackend(_ context.Context, r *ikelbv1.RemoveBackendRequest) (*ikelbv1.RemoveBackendResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("RemoveBackend")
	s, i, err := f.findBackendLocked(r.GetService(), r.GetAddress())
	if err != nil {
		return nil, err
	}
	s.Backends = slices.Delete(s.Backends, i, i+1)
	return &ikelbv1.RemoveBackendResponse{Service: f.storeLocked(s)}, nil
}

func (f *fakeServer) SetBackend(_ context.Context, r *ikelbv1.SetBackendRequest) (*ikelbv1.SetBackendResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("SetBackend")
	s, i, err := f.findBackendLocked(r.GetService(), r.GetAddress())
	if err != nil {
		return nil, err
	}
	if r.GetState() != 0 {
		s.Backends[i].State = r.GetState()
	}
	if r.GetWeight() != 0 {
		s.Backends[i].Weight = r.GetWeight()
	}
	return &ikelbv1.SetBackendResponse{Service: f.storeLocked(s)}, nil
}

func (f *fakeServer) LookupAffinity(_ context.Context, r *ikelbv1.LookupAffinityRequest) (*ikelbv1.LookupAffinityResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("LookupAffinity")
	for _, a := range f.affinities {
		if a.Service == r.GetService() && a.Client == r.GetClient() {
			return &ikelbv1.LookupAffinityResponse{Affinity: a}, nil
		}
	}
	return nil, status.Errorf(codes.NotFound, "no affinity for %s in %q", r.GetClient(), r.GetService())
}

func (f *fakeServer) ListAffinities(_ context.Context, r *ikelbv1.ListAffinitiesRequest) (*ikelbv1.ListAffinitiesResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("ListAffinities")
	start := 0
	if tok := r.GetPageToken(); tok != "" {
		n, err := strconv.Atoi(tok)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "page_token: %q is not valid", tok)
		}
		start = n
	}
	size := int(r.GetPageSize())
	if size == 0 || size > f.pageCap {
		size = f.pageCap
	}
	resp := &ikelbv1.ListAffinitiesResponse{}
	i := start
	for ; i < len(f.affinities) && len(resp.Affinities) < size; i++ {
		a := f.affinities[i]
		if (r.GetService() == "" || a.Service == r.GetService()) && (r.GetBackend() == "" || a.Backend == r.GetBackend()) {
			resp.Affinities = append(resp.Affinities, a)
		}
	}
	if i < len(f.affinities) {
		resp.NextPageToken = strconv.Itoa(i)
	}
	return resp, nil
}

func (f *fakeServer) DeleteAffinity(_ context.Context, r *ikelbv1.DeleteAffinityRequest) (*ikelbv1.DeleteAffinityResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("DeleteAffinity")
	for i, a := range f.affinities {
		if a.Service == r.GetService() && a.Client == r.GetClient() {
			f.affinities = slices.Delete(f.affinities, i, i+1)
			return &ikelbv1.DeleteAffinityResponse{}, nil
		}
	}
	return nil, status.Errorf(codes.NotFound, "no affinity for %s in %q", r.GetClient(), r.GetService())
}

func (f *fakeServer) FlushAffinities(_ context.Context, r *ikelbv1.FlushAffinitiesRequest) (*ikelbv1.FlushAffinitiesResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("FlushAffinities")
	n := len(f.affinities)
	f.affinities = slices.DeleteFunc(f.affinities, func(a *ikelbv1.Affinity) bool {
		return a.Service == r.GetService() && (r.GetBackend() == "" || a.Backend == r.GetBackend())
	})
	return &ikelbv1.FlushAffinitiesResponse{Deleted: uint64(n - len(f.affinities))}, nil
}

func (f *fakeServer) GetHealth(_ context.Context, r *ikelbv1.GetHealthRequest) (*ikelbv1.GetHealthResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("GetHealth")
	resp := &ikelbv1.GetHealthResponse{}
	for _, h := range f.health {
		if r.GetService() == "" || h.Service == r.GetService() {
			resp.Backends = append(resp.Backends, h)
		}
	}
	return resp, nil
}

func (f *fakeServer) GetCounters(_ context.Context, r *ikelbv1.GetCountersRequest) (*ikelbv1.GetCountersResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("GetCounters")
	resp := &ikelbv1.GetCountersResponse{}
	for _, c := range f.counters {
		if r.GetService() == "" || c.Name == r.GetService() {
			resp.Services = append(resp.Services, c)
		}
	}
	return resp, nil
}

func (f *fakeServer) GetNodeStatus(ctx context.Context, _ *ikelbv1.GetNodeStatusRequest) (*ikelbv1.GetNodeStatusResponse, error) {
	f.mu.Lock()
	f.called("GetNodeStatus")
	block, node := f.blockStatus, f.node
	f.mu.Unlock()
	if block {
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if node == nil {
		return nil, status.Error(codes.Unavailable, "node is shut down")
	}
	return node, nil
}

func (f *fakeServer) GetClusterStatus(context.Context, *ikelbv1.GetClusterStatusRequest) (*ikelbv1.GetClusterStatusResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.called("GetClusterStatus")
	return f.cluster, nil
}

// result is one ikelbctl run.
type result struct {
	stdout, stderr string
	code           int
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// ctl runs ikelbctl against addr with IKELB_ADDR unset.
func ctl(t *testing.T, addr string, args ...string) result {
	t.Helper()
	return ctlIn(t, addr, "", args...)
}

func ctlIn(t *testing.T, addr, stdin string, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(t.Context(), append([]string{"--addr", addr}, args...), strings.NewReader(stdin), &out, &errb,
		func(string) string { return "" })
	return result{out.String(), errb.String(), code}
}

// ok runs ikelbctl and fails the test unless it exits 0 with nothing on
// stderr.
func ok(t *testing.T, addr string, args ...string) string {
	t.Helper()
	r := ctl(t, addr, args...)
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("ikelbctl %s: %v", strings.Join(args, " "), r)
	}
	return r.stdout
}
