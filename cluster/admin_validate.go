package cluster

import (
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"time"

	"github.com/ikelb/ikelb/dataplane"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	raftlogv1 "github.com/ikelb/ikelb/proto/raftlog/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Defaults and limits of the admin API (documented in admin.proto).
const (
	defaultTimeout       = 5 * time.Minute
	minTimeout           = time.Second
	maxTimeout           = 30 * 24 * time.Hour
	defaultWeight        = 100
	maxWeight            = 1000
	defaultCheckInterval = 5 * time.Second
	defaultCheckTimeout  = 2 * time.Second
	defaultCheckRise     = 2
	defaultCheckFall     = 3
	defaultCheckPort     = 500
	maxRiseFall          = 100
	defaultPageSize      = 100
	maxPageSize          = 10000
	maxPorts             = 64
	maxBackends          = 1024
)

var (
	defaultPorts = []uint32{500, 4500}
	nameRE       = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)
)

// invalid returns an InvalidArgument status naming field.
func invalid(field, format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, "%s: %s", field, fmt.Sprintf(format, args...))
}

func validateName(field, name string) error {
	if name == "" {
		return invalid(field, "required")
	}
	if !nameRE.MatchString(name) {
		return invalid(field, "%q must match [a-z0-9][a-z0-9-]{0,62}", name)
	}
	return nil
}

// parseAddr parses a required IP address without zone.
func parseAddr(field, s string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, invalid(field, "required")
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Addr{}, invalid(field, "%q is not an IP address", s)
	}
	a = a.Unmap()
	if a.IsUnspecified() || a.IsMulticast() {
		return netip.Addr{}, invalid(field, "%q is not a unicast address", s)
	}
	return a, nil
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}

func durationField(field string, d *durationpb.Duration, def, lo, hi time.Duration) (time.Duration, error) {
	if d == nil {
		return def, nil
	}
	if err := d.CheckValid(); err != nil {
		return 0, invalid(field, "%v", err)
	}
	v := d.AsDuration()
	if v == 0 {
		return def, nil
	}
	if v < lo || v > hi {
		return 0, invalid(field, "%v must be %v..%v", v, lo, hi)
	}
	return v, nil
}

// validBackend checks one backend against the VIP's family and returns
// its record. field is e.g. "service.backends[1]".
func validBackend(field string, b *ikelbv1.Backend, vip netip.Addr) (*raftlogv1.BackendRecord, error) {
	if b == nil {
		return nil, invalid(field, "required")
	}
	a, err := parseAddr(field+".address", b.GetAddress())
	if err != nil {
		return nil, err
	}
	if a.Is4() != vip.Is4() {
		return nil, invalid(field+".address", "%q is %s but the VIP is %s", b.GetAddress(), family(a), family(vip))
	}
	if a == vip {
		return nil, invalid(field+".address", "%q is the service's VIP: ikelb would forward the datagrams to itself, one new flow per pass", b.GetAddress())
	}
	w := b.GetWeight()
	if w == 0 {
		w = defaultWeight
	}
	if w > maxWeight {
		return nil, invalid(field+".weight", "must be 1..%d", maxWeight)
	}
	st := b.GetState()
	if st == ikelbv1.BackendState_BACKEND_STATE_UNSPECIFIED {
		st = ikelbv1.BackendState_BACKEND_STATE_ACTIVE
	}
	if _, ok := ikelbv1.BackendState_name[int32(st)]; !ok {
		return nil, invalid(field+".state", "unknown state %d", st)
	}
	return &raftlogv1.BackendRecord{Addr: addrBytes(a), Weight: w, State: uint32(st)}, nil
}

// validService checks s, applies defaults, and returns the record to
// propose. Output-only fields (version, health) are ignored.
func validService(s *ikelbv1.Service) (*raftlogv1.ServiceRecord, error) {
	if s == nil {
		return nil, invalid("service", "required")
	}
	if err := validateName("service.name", s.GetName()); err != nil {
		return nil, err
	}
	vip, err := parseAddr("service.vip", s.GetVip())
	if err != nil {
		return nil, err
	}
	r := &raftlogv1.ServiceRecord{Name: s.GetName(), Vip: addrBytes(vip)}

	ports := s.GetPorts()
	if len(ports) == 0 {
		ports = defaultPorts
	}
	if len(ports) > maxPorts {
		return nil, invalid("service.ports", "at most %d ports", maxPorts)
	}
	for i, p := range ports {
		if p == 0 || p > 65535 {
			return nil, invalid(fmt.Sprintf("service.ports[%d]", i), "%d is not a port (1..65535)", p)
		}
		if slices.Contains(ports[:i], p) {
			return nil, invalid("service.ports", "duplicate port %d", p)
		}
	}
	r.Ports = slices.Clone(ports)

	if len(s.GetBackends()) > maxBackends {
		return nil, invalid("service.backends", "at most %d backends", maxBackends)
	}
	seen := map[netip.Addr]int{}
	for i, b := range s.GetBackends() {
		field := fmt.Sprintf("service.backends[%d]", i)
		br, err := validBackend(field, b, vip)
		if err != nil {
			return nil, err
		}
		a, _ := addrFromBytes(br.GetAddr())
		if j, ok := seen[a]; ok {
			return nil, invalid(field+".address", "%q duplicates service.backends[%d]", b.GetAddress(), j)
		}
		seen[a] = i
		r.Backends = append(r.Backends, br)
	}

	t, err := durationField("service.persistence_timeout", s.GetPersistenceTimeout(), defaultTimeout, minTimeout, maxTimeout)
	if err != nil {
		return nil, err
	}
	r.PersistenceTimeoutNs = int64(t)

	hc, err := validHealthCheck(s.GetHealthCheck())
	if err != nil {
		return nil, err
	}
	r.HealthCheck = hc

	mode := s.GetForwardingMode()
	if mode == ikelbv1.ForwardingMode_FORWARDING_MODE_UNSPECIFIED {
		mode = ikelbv1.ForwardingMode_FORWARDING_MODE_NAT
	}
	if _, ok := ikelbv1.ForwardingMode_name[int32(mode)]; !ok {
		return nil, invalid("service.forwarding_mode", "unknown mode %d", mode)
	}
	r.ForwardingMode = uint32(mode)

	key := s.GetAffinityKey()
	if key == ikelbv1.AffinityKey_AFFINITY_KEY_UNSPECIFIED {
		key = ikelbv1.AffinityKey_AFFINITY_KEY_SOURCE_IP
	}
	if _, ok := ikelbv1.AffinityKey_name[int32(key)]; !ok {
		return nil, invalid("service.affinity_key", "unknown key %d", key)
	}
	r.AffinityKey = uint32(key)

	if sn := s.GetSnatAddress(); sn != "" {
		if mode != ikelbv1.ForwardingMode_FORWARDING_MODE_NAT {
			return nil, invalid("service.snat_address", "only used in NAT mode")
		}
		a, err := parseAddr("service.snat_address", sn)
		if err != nil {
			return nil, err
		}
		if a.Is4() != vip.Is4() {
			return nil, invalid("service.snat_address", "%q is %s but the VIP is %s", sn, family(a), family(vip))
		}
		r.SnatAddress = addrBytes(a)
	}
	return r, nil
}

func validHealthCheck(hc *ikelbv1.HealthCheck) (*raftlogv1.HealthCheckRecord, error) {
	typ := hc.GetType()
	if typ == ikelbv1.HealthCheckType_HEALTH_CHECK_TYPE_UNSPECIFIED {
		typ = ikelbv1.HealthCheckType_HEALTH_CHECK_TYPE_ICMP
	}
	if _, ok := ikelbv1.HealthCheckType_name[int32(typ)]; !ok {
		return nil, invalid("service.health_check.type", "unknown type %d", typ)
	}
	interval, err := durationField("service.health_check.interval", hc.GetInterval(), defaultCheckInterval, 100*time.Millisecond, time.Hour)
	if err != nil {
		return nil, err
	}
	timeout, err := durationField("service.health_check.timeout", hc.GetTimeout(), defaultCheckTimeout, 10*time.Millisecond, time.Hour)
	if err != nil {
		return nil, err
	}
	if timeout > interval {
		return nil, invalid("service.health_check.timeout", "%v exceeds the interval %v", timeout, interval)
	}
	rise, fall, port := hc.GetRise(), hc.GetFall(), hc.GetPort()
	if rise == 0 {
		rise = defaultCheckRise
	}
	if fall == 0 {
		fall = defaultCheckFall
	}
	if port == 0 {
		port = defaultCheckPort
	}
	if rise > maxRiseFall {
		return nil, invalid("service.health_check.rise", "must be 1..%d", maxRiseFall)
	}
	if fall > maxRiseFall {
		return nil, invalid("service.health_check.fall", "must be 1..%d", maxRiseFall)
	}
	if port > 65535 {
		return nil, invalid("service.health_check.port", "%d is not a port (1..65535)", port)
	}
	return &raftlogv1.HealthCheckRecord{
		Type: uint32(typ), IntervalNs: int64(interval), TimeoutNs: int64(timeout),
		Rise: rise, Fall: fall, Port: port,
	}, nil
}

// Page tokens are the base64 (URL, unpadded) of the last key returned:
// 4 bytes of service id, big-endian, then the 16-byte client address.

func encodePageToken(k dataplane.ClientKey) string {
	var b [20]byte
	binary.BigEndian.PutUint32(b[:4], k.Service)
	copy(b[4:], k.Client[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func decodePageToken(s string) (*dataplane.ClientKey, error) {
	if s == "" {
		return nil, nil
	}
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil || len(b) != 20 {
		return nil, invalid("page_token", "malformed")
	}
	k := &dataplane.ClientKey{Service: binary.BigEndian.Uint32(b[:4])}
	copy(k.Client[:], b[4:])
	return k, nil
}

func validPageSize(n uint32) (int, error) {
	if n == 0 {
		return defaultPageSize, nil
	}
	if n > maxPageSize {
		return 0, invalid("page_size", "at most %d", maxPageSize)
	}
	return int(n), nil
}
