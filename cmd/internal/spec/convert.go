package spec

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"gopkg.in/yaml.v3"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// ToProto validates services as the `services:` list (errors are named
// services[i].field) and converts them to the admin API's messages with
// every default filled in and addresses in canonical form. It reports every
// problem at once, including those UnmarshalYAML recorded.
func ToProto(svcs []Service) ([]*ikelbv1.Service, error) {
	out := make([]*ikelbv1.Service, 0, len(svcs))
	var errs []error
	names := map[string]int{}
	for i := range svcs {
		path := fmt.Sprintf("services[%d]", i)
		pb, err := svcs[i].toProto(path)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if j, dup := names[pb.Name]; dup {
			errs = append(errs, &FieldError{Path: path + ".name", Line: svcs[i].src.line("name"),
				Msg: fmt.Sprintf("%q is already the name of services[%d]", pb.Name, j)})
			continue
		}
		names[pb.Name] = i
		errs = append(errs, loopError(svcs, out, pb, i)...)
		out = append(out, pb)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}

// loopError reports services[i] (pb) forwarding to another service of the
// file that listens on one of its ports, or being forwarded to by one:
// ikelb would send the datagrams to itself. prev holds the services before
// it that converted, in order, with svcs their sources.
func loopError(svcs []Service, prev []*ikelbv1.Service, pb *ikelbv1.Service, i int) []error {
	var errs []error
	for _, o := range prev {
		port := -1
		for _, p := range pb.Ports {
			if slices.Contains(o.Ports, p) {
				port = int(p)
				break
			}
		}
		if port < 0 {
			continue
		}
		j := slices.IndexFunc(svcs, func(s Service) bool { return s.Name == o.Name })
		for k, b := range pb.Backends {
			if b.Address == o.Vip {
				rel := fmt.Sprintf("backends[%d].address", k)
				errs = append(errs, &FieldError{Path: fmt.Sprintf("services[%d].%s", i, rel), Line: svcs[i].src.line(rel),
					Msg: fmt.Sprintf("%s is the vip of services[%d], which listens on port %d too: ikelb would forward the datagrams to itself", b.Address, j, port)})
			}
		}
		for k, b := range o.Backends {
			if b.Address == pb.Vip {
				errs = append(errs, &FieldError{Path: fmt.Sprintf("services[%d].vip", i), Line: svcs[i].src.line("vip"),
					Msg: fmt.Sprintf("%s is services[%d].backends[%d], which listens on port %d too: ikelb would forward the datagrams to itself", pb.Vip, j, k, port)})
			}
		}
	}
	return errs
}

// Validate reports what ToProto would: nil when svcs are valid.
func Validate(svcs []Service) error {
	_, err := ToProto(svcs)
	return err
}

// Proto validates one service on its own (errors are named by the field,
// e.g. `backends[0].weight`) and converts it like ToProto.
func (s *Service) Proto() (*ikelbv1.Service, error) { return s.toProto("") }

// check collects the problems of one service.
type check struct {
	prefix string
	src    *source
	errs   []error
}

func (c *check) fail(rel, format string, args ...any) {
	c.errs = append(c.errs, &FieldError{Path: join(c.prefix, rel), Line: c.src.line(rel), Msg: fmt.Sprintf(format, args...)})
}

func (c *check) addr(rel, v string, required bool) netip.Addr {
	if v == "" {
		if required {
			c.fail(rel, "must be set to an IP address")
		}
		return netip.Addr{}
	}
	a, err := netip.ParseAddr(v)
	if err != nil || a.Zone() != "" {
		c.fail(rel, "%q is not an IP address", v)
		return netip.Addr{}
	}
	a = a.Unmap()
	if a.IsUnspecified() || a.IsMulticast() {
		c.fail(rel, "%s is not a unicast address", a)
		return netip.Addr{}
	}
	return a
}

func (c *check) enum(rel, v, def string, allowed []string) string {
	if v == "" {
		return def
	}
	if !slices.Contains(allowed, v) {
		c.fail(rel, "%q is not one of %s", v, strings.Join(allowed, ", "))
		return def
	}
	return v
}

func (s *Service) toProto(prefix string) (*ikelbv1.Service, error) {
	c := &check{prefix: prefix, src: s.src}
	if s.src != nil {
		for _, fe := range s.src.errs {
			e := *fe
			e.Path = join(prefix, fe.Path)
			c.errs = append(c.errs, &e)
		}
	}
	pb := &ikelbv1.Service{Name: s.Name}
	switch {
	case s.Name == "":
		c.fail("name", "must be set")
	case !nameRE.MatchString(s.Name):
		c.fail("name", "%q must be 1 to 63 lower-case letters, digits and dashes, starting with a letter or digit", s.Name)
	}
	vip := c.addr("vip", s.VIP, true)
	if vip.IsValid() {
		pb.Vip = vip.String()
	}
	sameFamily := func(rel string, a netip.Addr) {
		if vip.IsValid() && a.IsValid() && a.Is4() != vip.Is4() {
			c.fail(rel, "%s is not of the same address family as vip %s", a, vip)
		}
	}

	ports := s.Ports
	if len(ports) == 0 {
		ports = DefaultPorts
	}
	seenPort := map[uint16]int{}
	for i, p := range ports {
		rel := fmt.Sprintf("ports[%d]", i)
		if p == 0 {
			if !s.src.failed(rel) {
				c.fail(rel, "0 is not a port")
			}
			continue
		}
		if j, dup := seenPort[p]; dup {
			c.fail(rel, "%d is already listed as ports[%d]", p, j)
			continue
		}
		seenPort[p] = i
		pb.Ports = append(pb.Ports, uint32(p))
	}

	switch {
	case s.PersistenceTimeout < 0:
		c.fail("persistence_timeout", "%v must be positive", s.PersistenceTimeout)
	case s.PersistenceTimeout == 0:
		pb.PersistenceTimeout = durationpb.New(DefaultPersistenceTimeout)
	default:
		pb.PersistenceTimeout = durationpb.New(s.PersistenceTimeout)
	}

	mode := c.enum("forwarding_mode", s.ForwardingMode, DefaultForwardingMode, forwardingModes)
	pb.ForwardingMode = modeToProto[mode]
	key := c.enum("affinity_key", s.AffinityKey, DefaultAffinityKey, affinityKeys)
	pb.AffinityKey = keyToProto[key]

	if snat := c.addr("snat_address", s.SNATAddress, false); snat.IsValid() {
		sameFamily("snat_address", snat)
		if mode != "nat" {
			c.fail("snat_address", "only applies to forwarding_mode nat, not %s", mode)
		}
		pb.SnatAddress = snat.String()
	}

	pb.HealthCheck = c.healthCheck(s.HealthCheck)

	seenAddr := map[netip.Addr]int{}
	for i, b := range s.Backends {
		rel := fmt.Sprintf("backends[%d]", i)
		a := c.addr(rel+".address", b.Address, true)
		sameFamily(rel+".address", a)
		if j, dup := seenAddr[a]; dup && a.IsValid() {
			c.fail(rel+".address", "%s is already listed as backends[%d]", a, j)
		}
		if a.IsValid() && a == vip {
			c.fail(rel+".address", "%s is the service's vip: ikelb would forward the datagrams to itself", a)
		}
		seenAddr[a] = i
		w := b.Weight
		if w == 0 {
			w = DefaultWeight
		} else if w > MaxWeight {
			c.fail(rel+".weight", "%d is out of range 1..%d", w, MaxWeight)
		}
		st := c.enum(rel+".state", b.State, DefaultState, backendStates)
		var addr string
		if a.IsValid() {
			addr = a.String()
		}
		pb.Backends = append(pb.Backends, &ikelbv1.Backend{Address: addr, Weight: w, State: stateToProto[st]})
	}
	if len(c.errs) > 0 {
		// Report in file order when the lines are known.
		slices.SortStableFunc(c.errs, func(a, b error) int {
			return a.(*FieldError).Line - b.(*FieldError).Line
		})
		return nil, errors.Join(c.errs...)
	}
	return pb, nil
}

func (c *check) healthCheck(hc *HealthCheck) *ikelbv1.HealthCheck {
	if hc == nil {
		hc = &HealthCheck{}
	}
	typ := c.enum("health_check.type", hc.Type, DefaultHealthCheckType, healthCheckTypes)
	interval := orDefault(hc.Interval, DefaultHealthInterval)
	// A short interval without a timeout gets a timeout of one interval.
	timeout := orDefault(hc.Timeout, min(DefaultHealthTimeout, interval))
	out := &ikelbv1.HealthCheck{
		Type:     healthToProto[typ],
		Interval: durationpb.New(interval),
		Timeout:  durationpb.New(timeout),
		Rise:     orDefault(hc.Rise, DefaultHealthRise),
		Fall:     orDefault(hc.Fall, DefaultHealthFall),
		Port:     uint32(orDefault(hc.Port, DefaultHealthPort)),
	}
	if hc.Interval < 0 {
		c.fail("health_check.interval", "%v must be positive", hc.Interval)
	}
	if hc.Timeout < 0 {
		c.fail("health_check.timeout", "%v must be positive", hc.Timeout)
	}
	if timeout > interval && interval > 0 {
		c.fail("health_check.timeout", "%v must not exceed the interval %v", timeout, interval)
	}
	if out.Rise > MaxRiseFall {
		c.fail("health_check.rise", "%d is out of range 1..%d", out.Rise, MaxRiseFall)
	}
	if out.Fall > MaxRiseFall {
		c.fail("health_check.fall", "%d is out of range 1..%d", out.Fall, MaxRiseFall)
	}
	return out
}

func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

var (
	modeToProto = map[string]ikelbv1.ForwardingMode{
		"nat":         ikelbv1.ForwardingMode_FORWARDING_MODE_NAT,
		"transparent": ikelbv1.ForwardingMode_FORWARDING_MODE_TRANSPARENT,
	}
	keyToProto = map[string]ikelbv1.AffinityKey{
		"source-ip": ikelbv1.AffinityKey_AFFINITY_KEY_SOURCE_IP,
	}
	stateToProto = map[string]ikelbv1.BackendState{
		"active":   ikelbv1.BackendState_BACKEND_STATE_ACTIVE,
		"drain":    ikelbv1.BackendState_BACKEND_STATE_DRAIN,
		"disabled": ikelbv1.BackendState_BACKEND_STATE_DISABLED,
	}
	healthToProto = map[string]ikelbv1.HealthCheckType{
		"icmp":  ikelbv1.HealthCheckType_HEALTH_CHECK_TYPE_ICMP,
		"ikev2": ikelbv1.HealthCheckType_HEALTH_CHECK_TYPE_IKEV2,
		"none":  ikelbv1.HealthCheckType_HEALTH_CHECK_TYPE_NONE,
	}
)

// enumName returns the YAML spelling of an enum value; "" for UNSPECIFIED or a
// value this version does not know.
func enumName[E comparable](m map[string]E, v E) string {
	for k, e := range m {
		if e == v {
			return k
		}
	}
	return ""
}

// ModeName, StateName, HealthCheckTypeName and AffinityKeyName return the
// YAML spelling of an enum value (as used by ikelbctl's tables); "" for
// UNSPECIFIED.
func ModeName(m ikelbv1.ForwardingMode) string             { return enumName(modeToProto, m) }
func StateName(s ikelbv1.BackendState) string              { return enumName(stateToProto, s) }
func HealthCheckTypeName(t ikelbv1.HealthCheckType) string { return enumName(healthToProto, t) }
func AffinityKeyName(k ikelbv1.AffinityKey) string         { return enumName(keyToProto, k) }

// ParseState parses a backend state as written in YAML (active, drain,
// disabled).
func ParseState(s string) (ikelbv1.BackendState, error) {
	if v, ok := stateToProto[s]; ok {
		return v, nil
	}
	return 0, fmt.Errorf("%q is not one of %s: %w", s, strings.Join(backendStates, ", "), ErrInvalid)
}

// FromProto converts an admin API service to its YAML form. Output-only
// fields (version, health) are dropped; UNSPECIFIED enums become "".
func FromProto(pb *ikelbv1.Service) Service {
	s := Service{
		Name:           pb.GetName(),
		VIP:            pb.GetVip(),
		ForwardingMode: ModeName(pb.GetForwardingMode()),
		AffinityKey:    AffinityKeyName(pb.GetAffinityKey()),
		SNATAddress:    pb.GetSnatAddress(),
	}
	for _, p := range pb.GetPorts() {
		s.Ports = append(s.Ports, uint16(p))
	}
	if d := pb.GetPersistenceTimeout(); d != nil {
		s.PersistenceTimeout = d.AsDuration()
	}
	if hc := pb.GetHealthCheck(); hc != nil {
		s.HealthCheck = &HealthCheck{
			Type: HealthCheckTypeName(hc.GetType()),
			Rise: hc.GetRise(),
			Fall: hc.GetFall(),
			Port: uint16(hc.GetPort()),
		}
		if d := hc.GetInterval(); d != nil {
			s.HealthCheck.Interval = d.AsDuration()
		}
		if d := hc.GetTimeout(); d != nil {
			s.HealthCheck.Timeout = d.AsDuration()
		}
	}
	for _, b := range pb.GetBackends() {
		s.Backends = append(s.Backends, Backend{
			Address: b.GetAddress(),
			Weight:  b.GetWeight(),
			State:   StateName(b.GetState()),
		})
	}
	return s
}

// ToYAML writes services as a file Parse reads back (`services:` list,
// backends and health check one per line in flow style).
func ToYAML(svcs []*ikelbv1.Service) ([]byte, error) {
	f := File{Services: make([]Service, 0, len(svcs))}
	for _, pb := range svcs {
		f.Services = append(f.Services, FromProto(pb))
	}
	var b strings.Builder
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(f); err != nil {
		return nil, fmt.Errorf("encode yaml: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encode yaml: %w", err)
	}
	return []byte(b.String()), nil
}

// serviceYAML is Service as written: durations in their short form.
type serviceYAML struct {
	Name               string       `yaml:"name"`
	VIP                string       `yaml:"vip"`
	Ports              []uint16     `yaml:"ports,flow,omitempty"`
	PersistenceTimeout string       `yaml:"persistence_timeout,omitempty"`
	ForwardingMode     string       `yaml:"forwarding_mode,omitempty"`
	AffinityKey        string       `yaml:"affinity_key,omitempty"`
	SNATAddress        string       `yaml:"snat_address,omitempty"`
	HealthCheck        *HealthCheck `yaml:"health_check,omitempty"`
	Backends           []Backend    `yaml:"backends"`
}

type healthCheckYAML struct {
	Type     string `yaml:"type,omitempty"`
	Interval string `yaml:"interval,omitempty"`
	Timeout  string `yaml:"timeout,omitempty"`
	Rise     uint32 `yaml:"rise,omitempty"`
	Fall     uint32 `yaml:"fall,omitempty"`
	Port     uint16 `yaml:"port,omitempty"`
}

// MarshalYAML writes durations as 8h rather than 8h0m0s.
func (s Service) MarshalYAML() (any, error) {
	return serviceYAML{
		Name: s.Name, VIP: s.VIP, Ports: s.Ports,
		PersistenceTimeout: FormatDuration(s.PersistenceTimeout),
		ForwardingMode:     s.ForwardingMode, AffinityKey: s.AffinityKey,
		SNATAddress: s.SNATAddress, HealthCheck: s.HealthCheck,
		Backends: s.Backends,
	}, nil
}

// MarshalYAML writes the health check on one line.
func (hc HealthCheck) MarshalYAML() (any, error) {
	return flow(healthCheckYAML{
		Type: hc.Type, Interval: FormatDuration(hc.Interval), Timeout: FormatDuration(hc.Timeout),
		Rise: hc.Rise, Fall: hc.Fall, Port: hc.Port,
	})
}

// MarshalYAML writes the backend on one line.
func (b Backend) MarshalYAML() (any, error) {
	type plain Backend
	return flow(plain(b))
}

func flow(v any) (*yaml.Node, error) {
	var n yaml.Node
	if err := n.Encode(v); err != nil {
		return nil, err
	}
	n.Style = yaml.FlowStyle
	return &n, nil
}

// FormatDuration writes d in Go syntax without trailing zero units (8h, not
// 8h0m0s); "" for 0.
func FormatDuration(d time.Duration) string {
	if d == 0 {
		return ""
	}
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// Normalize returns a copy of s in canonical form for comparison: defaults
// filled in, addresses canonical, ports and backends sorted, output-only
// fields (version, health) cleared. A service that does not convert (which a
// server should never return) is returned as a plain clone minus output-only
// fields.
func Normalize(s *ikelbv1.Service) *ikelbv1.Service {
	sp := FromProto(s)
	n, err := sp.Proto()
	if err != nil {
		n = proto.Clone(s).(*ikelbv1.Service)
		n.Version = 0
		for _, b := range n.Backends {
			b.Health, b.HealthChanged = 0, nil
		}
	}
	slices.Sort(n.Ports)
	slices.SortFunc(n.Backends, func(a, b *ikelbv1.Backend) int { return strings.Compare(a.Address, b.Address) })
	return n
}

// Changes names the YAML fields of a service that differ between current
// (as returned by the server) and desired, after Normalize; nil when the
// service is unchanged.
func Changes(current, desired *ikelbv1.Service) []string {
	a, b := Normalize(current), Normalize(desired)
	var out []string
	diff := func(field string, x, y proto.Message) {
		if !proto.Equal(x, y) {
			out = append(out, field)
		}
	}
	str := func(field, x, y string) {
		if x != y {
			out = append(out, field)
		}
	}
	str("vip", a.Vip, b.Vip)
	if !slices.Equal(a.Ports, b.Ports) {
		out = append(out, "ports")
	}
	diff("persistence_timeout", a.PersistenceTimeout, b.PersistenceTimeout)
	str("forwarding_mode", a.ForwardingMode.String(), b.ForwardingMode.String())
	str("affinity_key", a.AffinityKey.String(), b.AffinityKey.String())
	str("snat_address", a.SnatAddress, b.SnatAddress)
	diff("health_check", a.HealthCheck, b.HealthCheck)
	if !slices.EqualFunc(a.Backends, b.Backends, func(x, y *ikelbv1.Backend) bool { return proto.Equal(x, y) }) {
		out = append(out, "backends")
	}
	return out
}
