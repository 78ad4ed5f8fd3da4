package cluster

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/ikelb/ikelb/dataplane"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	raftlogv1 "github.com/ikelb/ikelb/proto/raftlog/v1"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// AdminServer implements ikelbv1.AdminServiceServer on a Node. Reads are
// served from this node's committed state; writes are committed through
// Raft on the leader. A write sent to a follower is forwarded to the leader
// (ClusterService.ForwardApply) and, once committed, this node waits
// briefly until it has applied it too, so that a read sent here next sees
// it. With no leader known a write fails with UNAVAILABLE.
//
// TRANSPARENT forwarding mode is accepted and committed as is; whether the
// dataplane can serve it is the dataplane's business (it reports a rejected
// service set in the node's log). Rejecting it here would make the committed
// state depend on one node's capabilities.
type AdminServer struct {
	// Embedded for forward compatibility only: every RPC is implemented.
	ikelbv1.UnimplementedAdminServiceServer

	node *Node
	w    applier
}

var _ ikelbv1.AdminServiceServer = (*AdminServer)(nil)

// NewAdminServer returns the admin API of n. Register it with
// ikelbv1.RegisterAdminServiceServer.
func NewAdminServer(n *Node) *AdminServer { return &AdminServer{node: n, w: forwarder{n}} }

// maxCASAttempts bounds the retries of a read-modify-write on a service
// that others modify at the same time.
const maxCASAttempts = 5

func (s *AdminServer) service(name string) (*service, error) {
	svc, ok := s.node.fsm.serviceByName(name)
	if !ok {
		return nil, grpcError(fmt.Errorf("service %q: %w", name, ErrNotFound))
	}
	return svc, nil
}

func (s *AdminServer) put(ctx context.Context, m *raftlogv1.PutService) (*ikelbv1.Service, error) {
	r, err := s.w.applyEntry(ctx, entryPutService, m)
	if err != nil {
		return nil, grpcError(err)
	}
	return toAPI(r.service), nil
}

func (s *AdminServer) CreateService(ctx context.Context, req *ikelbv1.CreateServiceRequest) (*ikelbv1.CreateServiceResponse, error) {
	rec, err := validService(req.GetService())
	if err != nil {
		return nil, err
	}
	if err := s.checkNoLoop(rec, serviceBackendField); err != nil {
		return nil, err
	}
	svc, err := s.put(ctx, &raftlogv1.PutService{Service: rec, Create: true})
	if err != nil {
		return nil, err
	}
	return &ikelbv1.CreateServiceResponse{Service: svc}, nil
}

func (s *AdminServer) GetService(_ context.Context, req *ikelbv1.GetServiceRequest) (*ikelbv1.GetServiceResponse, error) {
	if err := validateName("name", req.GetName()); err != nil {
		return nil, err
	}
	svc, err := s.service(req.GetName())
	if err != nil {
		return nil, err
	}
	return &ikelbv1.GetServiceResponse{Service: toAPI(svc.rec)}, nil
}

func (s *AdminServer) ListServices(context.Context, *ikelbv1.ListServicesRequest) (*ikelbv1.ListServicesResponse, error) {
	resp := &ikelbv1.ListServicesResponse{}
	for _, svc := range s.node.fsm.services() {
		resp.Services = append(resp.Services, toAPI(svc.rec))
	}
	return resp, nil
}

func (s *AdminServer) UpdateService(ctx context.Context, req *ikelbv1.UpdateServiceRequest) (*ikelbv1.UpdateServiceResponse, error) {
	rec, err := validService(req.GetService())
	if err != nil {
		return nil, err
	}
	if err := s.checkNoLoop(rec, serviceBackendField); err != nil {
		return nil, err
	}
	svc, err := s.put(ctx, &raftlogv1.PutService{Service: rec, ExpectedVersion: req.GetExpectedVersion()})
	if err != nil {
		return nil, err
	}
	return &ikelbv1.UpdateServiceResponse{Service: svc}, nil
}

func (s *AdminServer) DeleteService(ctx context.Context, req *ikelbv1.DeleteServiceRequest) (*ikelbv1.DeleteServiceResponse, error) {
	if err := validateName("name", req.GetName()); err != nil {
		return nil, err
	}
	if _, err := s.w.applyEntry(ctx, entryDeleteService, &raftlogv1.DeleteService{Name: req.GetName()}); err != nil {
		return nil, grpcError(err)
	}
	return &ikelbv1.DeleteServiceResponse{}, nil
}

// modifyService reads the named service, lets edit change a copy of its
// record, and commits it with compare-and-set on the version read, retrying
// when another write came in between.
func (s *AdminServer) modifyService(ctx context.Context, name string, edit func(r *raftlogv1.ServiceRecord, vip netip.Addr) error) (*ikelbv1.Service, error) {
	for attempt := 1; ; attempt++ {
		svc, err := s.service(name)
		if err != nil {
			return nil, err
		}
		rec := proto.Clone(svc.rec).(*raftlogv1.ServiceRecord)
		if err := edit(rec, svc.dp.VIP); err != nil {
			return nil, err
		}
		r, err := s.w.applyEntry(ctx, entryPutService, &raftlogv1.PutService{Service: rec, ExpectedVersion: svc.rec.GetVersion()})
		if errors.Is(err, ErrConflict) && attempt < maxCASAttempts {
			continue
		}
		if err != nil {
			return nil, grpcError(err)
		}
		return toAPI(r.service), nil
	}
}

// checkNoLoop fails with InvalidArgument when rec would make ikelb
// forward to itself through another service: one of its backends is the
// VIP of a service listening on one of its ports, or its VIP is a backend
// of such a service. Every datagram would come back as a new client flow
// (nat: from the node's own address; a single datagram filled the flow
// table in a test). backendField names the field of rec's backend i in
// the request. A backend equal to the service's own VIP is caught by
// validBackend. Checked against the committed services when the request
// comes in: two racing writes can still make a loop, as with any
// read-then-write check outside the log.
func (s *AdminServer) checkNoLoop(rec *raftlogv1.ServiceRecord, backendField func(i int) string) error {
	vip, _ := addrFromBytes(rec.GetVip())
	for _, o := range s.node.fsm.services() {
		if o.rec.GetName() == rec.GetName() {
			continue
		}
		i := slices.IndexFunc(rec.GetPorts(), func(p uint32) bool { return slices.Contains(o.rec.GetPorts(), p) })
		if i < 0 {
			continue
		}
		port := rec.GetPorts()[i]
		if j := backendIndex(rec, o.dp.VIP); j >= 0 {
			return invalid(backendField(j), "%v is the VIP of service %q, which listens on port %d too: ikelb would forward the datagrams to itself", o.dp.VIP, o.rec.GetName(), port)
		}
		if backendIndex(o.rec, vip) >= 0 {
			return invalid("service.vip", "%v is a backend of service %q, which listens on port %d too: ikelb would forward the datagrams to itself", vip, o.rec.GetName(), port)
		}
	}
	return nil
}

func serviceBackendField(i int) string { return fmt.Sprintf("service.backends[%d].address", i) }

// backendIndex returns the index of the backend with address addr.
func backendIndex(r *raftlogv1.ServiceRecord, addr netip.Addr) int {
	return slices.IndexFunc(r.GetBackends(), func(b *raftlogv1.BackendRecord) bool {
		a, _ := addrFromBytes(b.GetAddr())
		return a == addr
	})
}

func (s *AdminServer) AddBackend(ctx context.Context, req *ikelbv1.AddBackendRequest) (*ikelbv1.AddBackendResponse, error) {
	if err := validateName("service", req.GetService()); err != nil {
		return nil, err
	}
	svc, err := s.modifyService(ctx, req.GetService(), func(r *raftlogv1.ServiceRecord, vip netip.Addr) error {
		b, err := validBackend("backend", req.GetBackend(), vip)
		if err != nil {
			return err
		}
		a, _ := addrFromBytes(b.GetAddr())
		if backendIndex(r, a) >= 0 {
			return grpcError(fmt.Errorf("backend %v of service %q: %w", a, r.GetName(), ErrExists))
		}
		if len(r.Backends) >= maxBackends {
			return invalid("backend", "service %q already has %d backends", r.GetName(), maxBackends)
		}
		r.Backends = append(r.Backends, b)
		return s.checkNoLoop(r, func(int) string { return "backend.address" })
	})
	if err != nil {
		return nil, err
	}
	return &ikelbv1.AddBackendResponse{Service: svc}, nil
}

// findBackend parses addr and returns its index in r.
func findBackend(r *raftlogv1.ServiceRecord, addr string) (int, error) {
	a, err := parseAddr("address", addr)
	if err != nil {
		return 0, err
	}
	i := backendIndex(r, a)
	if i < 0 {
		return 0, grpcError(fmt.Errorf("backend %v of service %q: %w", a, r.GetName(), ErrNotFound))
	}
	return i, nil
}

func (s *AdminServer) RemoveBackend(ctx context.Context, req *ikelbv1.RemoveBackendRequest) (*ikelbv1.RemoveBackendResponse, error) {
	if err := validateName("service", req.GetService()); err != nil {
		return nil, err
	}
	if _, err := parseAddr("address", req.GetAddress()); err != nil {
		return nil, err
	}
	svc, err := s.modifyService(ctx, req.GetService(), func(r *raftlogv1.ServiceRecord, _ netip.Addr) error {
		i, err := findBackend(r, req.GetAddress())
		if err != nil {
			return err
		}
		r.Backends = slices.Delete(r.Backends, i, i+1)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &ikelbv1.RemoveBackendResponse{Service: svc}, nil
}

func (s *AdminServer) SetBackend(ctx context.Context, req *ikelbv1.SetBackendRequest) (*ikelbv1.SetBackendResponse, error) {
	if err := validateName("service", req.GetService()); err != nil {
		return nil, err
	}
	if _, err := parseAddr("address", req.GetAddress()); err != nil {
		return nil, err
	}
	st, w := req.GetState(), req.GetWeight()
	if _, ok := ikelbv1.BackendState_name[int32(st)]; !ok {
		return nil, invalid("state", "unknown state %d", st)
	}
	if w > maxWeight {
		return nil, invalid("weight", "must be 1..%d", maxWeight)
	}
	if st == ikelbv1.BackendState_BACKEND_STATE_UNSPECIFIED && w == 0 {
		return nil, invalid("state", "state or weight must be set")
	}
	svc, err := s.modifyService(ctx, req.GetService(), func(r *raftlogv1.ServiceRecord, _ netip.Addr) error {
		i, err := findBackend(r, req.GetAddress())
		if err != nil {
			return err
		}
		if st != ikelbv1.BackendState_BACKEND_STATE_UNSPECIFIED {
			r.Backends[i].State = uint32(st)
		}
		if w != 0 {
			r.Backends[i].Weight = w
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &ikelbv1.SetBackendResponse{Service: svc}, nil
}

// affinityToAPI renders one committed affinity of svc.
func affinityToAPI(svc *service, k dataplane.ClientKey, e dataplane.Entry) *ikelbv1.Affinity {
	a := &ikelbv1.Affinity{
		Service:  svc.rec.GetName(),
		Client:   k.Client.String(),
		Created:  timestamppb.New(time.Unix(0, e.Created)),
		LastSeen: timestamppb.New(time.Unix(0, e.LastSeen)),
	}
	if i, ok := svc.backend[e.Backend]; ok {
		a.Backend = svc.dp.Backends[i].Addr.String()
	}
	return a
}

// clientKey validates a service name and a client address.
func (s *AdminServer) clientKey(name, client string) (*service, dataplane.ClientKey, error) {
	if err := validateName("service", name); err != nil {
		return nil, dataplane.ClientKey{}, err
	}
	c, err := netip.ParseAddr(client)
	if err != nil || c.Zone() != "" {
		if client == "" {
			return nil, dataplane.ClientKey{}, invalid("client", "required")
		}
		return nil, dataplane.ClientKey{}, invalid("client", "%q is not an IP address", client)
	}
	svc, err := s.service(name)
	if err != nil {
		return nil, dataplane.ClientKey{}, err
	}
	c = c.Unmap()
	if c.Is4() != svc.dp.VIP.Is4() {
		// No such client can exist: say so rather than "not found".
		return nil, dataplane.ClientKey{}, invalid("client", "%q is %s but service %q's VIP is %s", client, family(c), name, family(svc.dp.VIP))
	}
	return svc, dataplane.ClientKey{Service: svc.rec.GetId(), Client: dataplane.AddrFrom(c)}, nil
}

func (s *AdminServer) LookupAffinity(_ context.Context, req *ikelbv1.LookupAffinityRequest) (*ikelbv1.LookupAffinityResponse, error) {
	svc, k, err := s.clientKey(req.GetService(), req.GetClient())
	if err != nil {
		return nil, err
	}
	e, ok := s.node.fsm.Lookup(k)
	if !ok {
		return nil, grpcError(fmt.Errorf("affinity of %v in service %q: %w", k.Client, svc.rec.GetName(), ErrNotFound))
	}
	return &ikelbv1.LookupAffinityResponse{Affinity: affinityToAPI(svc, k, e)}, nil
}

func (s *AdminServer) ListAffinities(_ context.Context, req *ikelbv1.ListAffinitiesRequest) (*ikelbv1.ListAffinitiesResponse, error) {
	limit, err := validPageSize(req.GetPageSize())
	if err != nil {
		return nil, err
	}
	after, err := decodePageToken(req.GetPageToken())
	if err != nil {
		return nil, err
	}
	var backend netip.Addr
	if req.GetBackend() != "" {
		if backend, err = parseAddr("backend", req.GetBackend()); err != nil {
			return nil, err
		}
	}
	services := map[uint32]*service{}
	if req.GetService() != "" {
		if err := validateName("service", req.GetService()); err != nil {
			return nil, err
		}
		svc, err := s.service(req.GetService())
		if err != nil {
			return nil, err
		}
		services[svc.rec.GetId()] = svc
	} else {
		for _, svc := range s.node.fsm.services() {
			services[svc.rec.GetId()] = svc
		}
	}
	// wanted: service id → the backend id to match (0: any).
	wanted := map[uint32]uint32{}
	for id, svc := range services {
		if !backend.IsValid() {
			wanted[id] = 0
			continue
		}
		if i := backendIndex(svc.rec, backend); i >= 0 {
			wanted[id] = svc.rec.GetBackends()[i].GetId()
		}
	}
	page, more := s.node.fsm.listAffinities(after, limit, func(k dataplane.ClientKey, e dataplane.Entry) bool {
		b, ok := wanted[k.Service]
		return ok && (b == 0 || e.Backend == b)
	})
	resp := &ikelbv1.ListAffinitiesResponse{Affinities: make([]*ikelbv1.Affinity, 0, len(page))}
	for _, a := range page {
		resp.Affinities = append(resp.Affinities, affinityToAPI(services[a.key.Service], a.key, a.entry))
	}
	if more {
		resp.NextPageToken = encodePageToken(page[len(page)-1].key)
	}
	return resp, nil
}

func (s *AdminServer) DeleteAffinity(ctx context.Context, req *ikelbv1.DeleteAffinityRequest) (*ikelbv1.DeleteAffinityResponse, error) {
	svc, k, err := s.clientKey(req.GetService(), req.GetClient())
	if err != nil {
		return nil, err
	}
	r, err := s.w.applyEntry(ctx, entryDeleteAffinities, &raftlogv1.DeleteAffinities{ServiceId: k.Service, Client: clientBytes(k.Client)})
	if err != nil {
		return nil, grpcError(err)
	}
	if r.deleted == 0 {
		return nil, grpcError(fmt.Errorf("affinity of %v in service %q: %w", k.Client, svc.rec.GetName(), ErrNotFound))
	}
	return &ikelbv1.DeleteAffinityResponse{}, nil
}

func (s *AdminServer) FlushAffinities(ctx context.Context, req *ikelbv1.FlushAffinitiesRequest) (*ikelbv1.FlushAffinitiesResponse, error) {
	if err := validateName("service", req.GetService()); err != nil {
		return nil, err
	}
	svc, err := s.service(req.GetService())
	if err != nil {
		return nil, err
	}
	m := &raftlogv1.DeleteAffinities{ServiceId: svc.rec.GetId()}
	if req.GetBackend() != "" {
		a, err := parseAddr("backend", req.GetBackend())
		if err != nil {
			return nil, err
		}
		i := backendIndex(svc.rec, a)
		if i < 0 {
			return nil, grpcError(fmt.Errorf("backend %v of service %q: %w", a, svc.rec.GetName(), ErrNotFound))
		}
		m.BackendId = svc.rec.GetBackends()[i].GetId()
	}
	r, err := s.w.applyEntry(ctx, entryDeleteAffinities, m)
	if err != nil {
		return nil, grpcError(err)
	}
	return &ikelbv1.FlushAffinitiesResponse{Deleted: r.deleted}, nil
}

// selectServices returns the named service, or all when name is empty.
func (s *AdminServer) selectServices(name string) ([]*service, error) {
	if name == "" {
		return s.node.fsm.services(), nil
	}
	if err := validateName("service", name); err != nil {
		return nil, err
	}
	svc, err := s.service(name)
	if err != nil {
		return nil, err
	}
	return []*service{svc}, nil
}

func (s *AdminServer) GetHealth(_ context.Context, req *ikelbv1.GetHealthRequest) (*ikelbv1.GetHealthResponse, error) {
	services, err := s.selectServices(req.GetService())
	if err != nil {
		return nil, err
	}
	resp := &ikelbv1.GetHealthResponse{}
	for _, svc := range services {
		for _, b := range svc.rec.GetBackends() {
			resp.Backends = append(resp.Backends, &ikelbv1.BackendHealthStatus{
				Service:   svc.rec.GetName(),
				Backend:   addrString(b.GetAddr()),
				Health:    ikelbv1.BackendHealth(b.GetHealth()),
				Changed:   tsOrNil(b.GetHealthChangedNs()),
				LastError: s.node.probeErrorOf(svc.rec.GetId(), b.GetId()),
			})
		}
	}
	return resp, nil
}

func (s *AdminServer) GetCounters(_ context.Context, req *ikelbv1.GetCountersRequest) (*ikelbv1.GetCountersResponse, error) {
	services, err := s.selectServices(req.GetService())
	if err != nil {
		return nil, err
	}
	resp := &ikelbv1.GetCountersResponse{}
	for _, c := range s.node.Counters() {
		if !slices.ContainsFunc(services, func(svc *service) bool { return svc.rec.GetId() == c.ID }) {
			continue
		}
		sc := &ikelbv1.ServiceCounters{
			Name: c.Name, Packets: c.Packets, Bytes: c.Bytes, ReplyPackets: c.ReplyPackets,
			ReplyBytes: c.ReplyBytes, Drops: c.Drops, ActiveClients: c.ActiveClients,
		}
		for _, b := range c.Backends {
			sc.Backends = append(sc.Backends, &ikelbv1.BackendCounters{
				Address: b.Addr.String(), Packets: b.Packets, Bytes: b.Bytes,
				ReplyPackets: b.ReplyPackets, ReplyBytes: b.ReplyBytes, ActiveClients: b.ActiveClients,
			})
		}
		resp.Services = append(resp.Services, sc)
	}
	return resp, nil
}

func (s *AdminServer) GetNodeStatus(context.Context, *ikelbv1.GetNodeStatusRequest) (*ikelbv1.GetNodeStatusResponse, error) {
	st := s.node.Status()
	resp := &ikelbv1.GetNodeStatusResponse{
		Name: st.Name, Version: s.node.cfg.Version, RaftState: st.RaftState, Leader: st.Leader,
		LastIndex: st.LastIndex, CommitIndex: st.CommitIndex, AppliedIndex: st.AppliedIndex,
		Degraded: st.Degraded, Services: uint32(st.Services), Affinities: uint64(st.Affinities),
		ProposalsDropped: st.ProposalsDropped, Role: st.Role, DataplaneError: s.node.DataplaneError(),
	}
	if !st.Started.IsZero() {
		resp.Started = timestamppb.New(st.Started)
	}
	return resp, nil
}

func (s *AdminServer) GetClusterStatus(ctx context.Context, _ *ikelbv1.GetClusterStatusRequest) (*ikelbv1.GetClusterStatusResponse, error) {
	st := s.node.Status()
	members, err := s.node.ClusterStatus(ctx)
	if err != nil {
		return nil, grpcError(err)
	}
	resp := &ikelbv1.GetClusterStatusResponse{
		Leader: st.Leader, Term: st.Term, CommitIndex: st.CommitIndex, LastIndex: st.LastIndex,
	}
	for _, m := range members {
		resp.Members = append(resp.Members, &ikelbv1.ClusterMember{
			Name: m.Name, GossipAddress: m.GossipAddr, RaftAddress: m.RaftAddr, AdminAddress: m.AdminAddr,
			Role: m.Role, Suffrage: m.Suffrage, Status: m.Status, Leader: m.Leader,
			MatchIndex: m.LastIndex, Lag: m.Lag,
		})
	}
	return resp, nil
}
