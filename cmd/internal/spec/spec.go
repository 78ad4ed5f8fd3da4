package spec

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

// Defaults applied by ToProto to fields left out (zero).
const (
	DefaultPersistenceTimeout = 5 * time.Minute
	DefaultForwardingMode     = "nat"
	DefaultAffinityKey        = "source-ip"
	DefaultHealthCheckType    = "icmp"
	DefaultHealthInterval     = 5 * time.Second
	DefaultHealthTimeout      = 2 * time.Second
	DefaultHealthRise         = 2
	DefaultHealthFall         = 3
	DefaultHealthPort         = 500
	DefaultWeight             = 100
	DefaultState              = "active"
	// MaxWeight is the largest backend weight.
	MaxWeight = 1000
	// MaxRiseFall bounds health_check.rise and health_check.fall.
	MaxRiseFall = 100
)

// DefaultPorts are the ports of a service that lists none: IKE and NAT-T.
var DefaultPorts = []uint16{500, 4500}

// The accepted spellings of the enumerations, in the order error messages
// list them.
var (
	forwardingModes  = []string{"nat", "transparent"}
	affinityKeys     = []string{"source-ip"}
	backendStates    = []string{"active", "drain", "disabled"}
	healthCheckTypes = []string{"icmp", "ikev2", "none"}
)

// File is the top level of a file read by Parse.
type File struct {
	Services []Service `yaml:"services"`
}

// Service is one service as written in YAML. Zero fields take the defaults
// above. Enumerations are kept as the strings written so that ToProto can
// name a bad value with its line.
type Service struct {
	Name               string        `yaml:"name"`
	VIP                string        `yaml:"vip"`
	Ports              []uint16      `yaml:"ports,flow,omitempty"`
	PersistenceTimeout time.Duration `yaml:"persistence_timeout,omitempty"`
	ForwardingMode     string        `yaml:"forwarding_mode,omitempty"` // nat | transparent
	AffinityKey        string        `yaml:"affinity_key,omitempty"`    // source-ip
	SNATAddress        string        `yaml:"snat_address,omitempty"`
	HealthCheck        *HealthCheck  `yaml:"health_check,omitempty"`
	Backends           []Backend     `yaml:"backends"`

	// src is where the service came from; nil when built in Go.
	src *source
}

// HealthCheck is a service's backend health check.
type HealthCheck struct {
	Type     string        `yaml:"type,omitempty"` // icmp | ikev2 | none
	Interval time.Duration `yaml:"interval,omitempty"`
	Timeout  time.Duration `yaml:"timeout,omitempty"`
	Rise     uint32        `yaml:"rise,omitempty"`
	Fall     uint32        `yaml:"fall,omitempty"`
	Port     uint16        `yaml:"port,omitempty"` // IKEv2 probe port
}

// Backend is one VPN server of a service.
type Backend struct {
	Address string `yaml:"address"`
	Weight  uint32 `yaml:"weight,omitempty"` // 1..1000; 0 = default
	State   string `yaml:"state,omitempty"`  // active | drain | disabled
}

// source records what UnmarshalYAML saw: the line of every field by its
// path relative to the service ("" is the service itself), and the
// problems found while decoding, also with relative paths.
type source struct {
	lines map[string]int
	errs  []*FieldError
}

// failed reports whether decoding already found a problem at path.
func (s *source) failed(path string) bool {
	if s == nil {
		return false
	}
	for _, e := range s.errs {
		if e.Path == path {
			return true
		}
	}
	return false
}

// line returns the line of path, or of its nearest ancestor that has one.
func (s *source) line(path string) int {
	if s == nil {
		return 0
	}
	for {
		if l, ok := s.lines[path]; ok {
			return l
		}
		if path == "" {
			return 0
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			path = ""
		} else {
			path = path[:i]
		}
	}
}

// Parse reads a file holding a `services:` list and returns the services,
// validated and with every default filled in. source names the file in
// error messages. An empty file has no services.
func Parse(data []byte, source string) ([]*ikelbv1.Service, error) {
	svcs, err := Decode(data, source)
	if err != nil {
		return nil, err
	}
	out, err := ToProto(svcs)
	if err != nil {
		return nil, withSource(err, source)
	}
	return out, nil
}

// Decode reads a file holding a `services:` list without validating the
// services' content (ToProto does that). Unknown top-level fields and YAML
// syntax errors fail here.
func Decode(data []byte, source string) ([]Service, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		return nil, fmt.Errorf("%s: %w: %w", source, ErrInvalid, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		if err != nil {
			return nil, fmt.Errorf("%s: %w: %w", source, ErrInvalid, err)
		}
		return nil, withSource(&FieldError{Line: extra.Line, Msg: "only one YAML document is supported"}, source)
	}
	if len(doc.Content) == 0 {
		return nil, nil
	}
	top := resolve(doc.Content[0])
	if top.Kind == yaml.ScalarNode && top.Tag == "!!null" {
		return nil, nil
	}
	if top.Kind != yaml.MappingNode {
		return nil, withSource(&FieldError{Line: top.Line, Msg: "the file must be a mapping with a services: list"}, source)
	}
	var svcs []Service
	var errs []error
	seen := map[string]bool{}
	for i := 0; i+1 < len(top.Content); i += 2 {
		k, v := top.Content[i], resolve(top.Content[i+1])
		switch {
		case seen[k.Value]:
			errs = append(errs, &FieldError{Path: k.Value, Line: k.Line, Msg: "is defined twice"})
		case k.Value == "services":
			seen[k.Value] = true
			if v.Kind == yaml.ScalarNode && v.Tag == "!!null" {
				continue
			}
			if v.Kind != yaml.SequenceNode {
				errs = append(errs, &FieldError{Path: "services", Line: v.Line, Msg: "must be a list"})
				continue
			}
			svcs = make([]Service, len(v.Content))
			for j, n := range v.Content {
				// Never fails: problems are recorded for ToProto.
				_ = svcs[j].UnmarshalYAML(n)
			}
		default:
			errs = append(errs, &FieldError{Path: k.Value, Line: k.Line, Msg: "unknown field" + suggest(k.Value, []string{"services"})})
		}
	}
	if len(errs) > 0 {
		return nil, withSource(errors.Join(errs...), source)
	}
	return svcs, nil
}

// UnmarshalYAML decodes one service strictly. It never returns an error:
// problems are kept with the line of every field, and ToProto or Validate
// reports them under the service's full path.
func (s *Service) UnmarshalYAML(n *yaml.Node) error {
	d := &decoder{src: &source{lines: map[string]int{}}}
	*s = Service{src: d.src}
	n = resolve(n)
	d.src.lines[""] = n.Line
	d.mapping("", n, map[string]func(string, *yaml.Node){
		"name":                func(p string, v *yaml.Node) { s.Name = d.str(p, v) },
		"vip":                 func(p string, v *yaml.Node) { s.VIP = d.str(p, v) },
		"ports":               func(p string, v *yaml.Node) { s.Ports = d.ports(p, v) },
		"persistence_timeout": func(p string, v *yaml.Node) { s.PersistenceTimeout = d.duration(p, v) },
		"forwarding_mode":     func(p string, v *yaml.Node) { s.ForwardingMode = d.str(p, v) },
		"affinity_key":        func(p string, v *yaml.Node) { s.AffinityKey = d.str(p, v) },
		"snat_address":        func(p string, v *yaml.Node) { s.SNATAddress = d.str(p, v) },
		"health_check":        func(p string, v *yaml.Node) { s.HealthCheck = d.healthCheck(p, v) },
		"backends":            func(p string, v *yaml.Node) { s.Backends = d.backends(p, v) },
	})
	return nil
}

// decoder turns yaml.Nodes into values, recording lines and problems.
type decoder struct{ src *source }

func (d *decoder) fail(path string, n *yaml.Node, format string, args ...any) {
	d.src.errs = append(d.src.errs, &FieldError{Path: path, Line: n.Line, Msg: fmt.Sprintf(format, args...)})
}

// resolve follows aliases (*anchor) to the node they name.
func resolve(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool { return n.Kind == yaml.ScalarNode && n.Tag == "!!null" }

func join(path, field string) string {
	if field == "" {
		return path
	}
	if path == "" {
		return field
	}
	return path + "." + field
}

// mapping decodes a mapping node field by field: unknown and duplicate
// fields are problems.
func (d *decoder) mapping(path string, n *yaml.Node, fields map[string]func(string, *yaml.Node)) bool {
	if n.Kind != yaml.MappingNode {
		d.fail(path, n, "must be a mapping of fields, not %s", kindName(n))
		return false
	}
	names := make([]string, 0, len(fields))
	for k := range fields {
		names = append(names, k)
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], resolve(n.Content[i+1])
		p := join(path, k.Value)
		f, ok := fields[k.Value]
		switch {
		case !ok:
			d.fail(p, k, "unknown field%s", suggest(k.Value, names))
		case seen[k.Value]:
			d.fail(p, k, "is defined twice")
		default:
			seen[k.Value] = true
			d.src.lines[p] = v.Line
			f(p, v)
		}
	}
	return true
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if isNull(n) {
			return "empty"
		}
		return fmt.Sprintf("%q", n.Value)
	}
	return "an unsupported YAML node"
}

func (d *decoder) str(path string, n *yaml.Node) string {
	if n.Kind != yaml.ScalarNode {
		d.fail(path, n, "must be a single value, not %s", kindName(n))
		return ""
	}
	if isNull(n) {
		return ""
	}
	return n.Value
}

// uint decodes an unsigned integer in [lo, hi].
func (d *decoder) uint(path string, n *yaml.Node, lo, hi uint64) (uint64, bool) {
	if n.Kind != yaml.ScalarNode || isNull(n) {
		d.fail(path, n, "must be a number, not %s", kindName(n))
		return 0, false
	}
	v, err := strconv.ParseUint(n.Value, 10, 64)
	if err != nil {
		d.fail(path, n, "%q is not a whole number", n.Value)
		return 0, false
	}
	if v < lo || v > hi {
		d.fail(path, n, "%d is out of range %d..%d", v, lo, hi)
		return 0, false
	}
	return v, true
}

func (d *decoder) duration(path string, n *yaml.Node) time.Duration {
	if n.Kind != yaml.ScalarNode || isNull(n) {
		d.fail(path, n, "must be a duration such as 90s, 5m or 8h, not %s", kindName(n))
		return 0
	}
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		d.fail(path, n, "%q is not a duration (write it like 90s, 5m or 8h)", n.Value)
		return 0
	}
	if v <= 0 {
		d.fail(path, n, "%s must be positive", n.Value)
		return 0
	}
	return v
}

func (d *decoder) ports(path string, n *yaml.Node) []uint16 {
	if n.Kind == yaml.ScalarNode && !isNull(n) {
		// `ports: 500` is a list of one.
		if v, ok := d.uint(path, n, 1, 65535); ok {
			return []uint16{uint16(v)}
		}
		return nil
	}
	if n.Kind != yaml.SequenceNode {
		d.fail(path, n, "must be a list of ports, not %s", kindName(n))
		return nil
	}
	// A bad port stays as 0 so that the others keep their index.
	out := make([]uint16, len(n.Content))
	for i, e := range n.Content {
		e = resolve(e)
		p := fmt.Sprintf("%s[%d]", path, i)
		d.src.lines[p] = e.Line
		v, _ := d.uint(p, e, 1, 65535)
		out[i] = uint16(v)
	}
	return out
}

func (d *decoder) healthCheck(path string, n *yaml.Node) *HealthCheck {
	if isNull(n) {
		return nil
	}
	hc := &HealthCheck{}
	d.mapping(path, n, map[string]func(string, *yaml.Node){
		"type":     func(p string, v *yaml.Node) { hc.Type = d.str(p, v) },
		"interval": func(p string, v *yaml.Node) { hc.Interval = d.duration(p, v) },
		"timeout":  func(p string, v *yaml.Node) { hc.Timeout = d.duration(p, v) },
		"rise": func(p string, v *yaml.Node) {
			x, _ := d.uint(p, v, 1, MaxRiseFall)
			hc.Rise = uint32(x)
		},
		"fall": func(p string, v *yaml.Node) {
			x, _ := d.uint(p, v, 1, MaxRiseFall)
			hc.Fall = uint32(x)
		},
		"port": func(p string, v *yaml.Node) {
			x, _ := d.uint(p, v, 1, 65535)
			hc.Port = uint16(x)
		},
	})
	return hc
}

func (d *decoder) backends(path string, n *yaml.Node) []Backend {
	if isNull(n) {
		return nil
	}
	if n.Kind != yaml.SequenceNode {
		d.fail(path, n, "must be a list of backends, not %s", kindName(n))
		return nil
	}
	out := make([]Backend, len(n.Content))
	for i, e := range n.Content {
		e = resolve(e)
		p := fmt.Sprintf("%s[%d]", path, i)
		d.src.lines[p] = e.Line
		b := &out[i]
		if e.Kind == yaml.ScalarNode && !isNull(e) {
			// `- 10.0.0.11` is a backend with every default.
			b.Address = e.Value
			d.src.lines[p+".address"] = e.Line
			continue
		}
		d.mapping(p, e, map[string]func(string, *yaml.Node){
			"address": func(p string, v *yaml.Node) { b.Address = d.str(p, v) },
			"weight": func(p string, v *yaml.Node) {
				x, _ := d.uint(p, v, 1, MaxWeight)
				b.Weight = uint32(x)
			},
			"state": func(p string, v *yaml.Node) { b.State = d.str(p, v) },
		})
	}
	return out
}

// suggest returns ` (did you mean "x"?)` when name is a likely typo of one of
// the known names, else "".
func suggest(name string, known []string) string {
	best, bestDist := "", 3
	for _, k := range known {
		if dist := editDistance(name, k); dist < bestDist || (dist == bestDist && k < best) {
			best, bestDist = k, dist
		}
	}
	if best == "" || bestDist > len(name)/2 {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
