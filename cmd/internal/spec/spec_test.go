package spec

import (
	"bytes"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
	"gopkg.in/yaml.v3"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

const example = `services:
  - name: vpn
    vip: 198.18.2.100
    ports: [500, 4500]
    persistence_timeout: 8h
    forwarding_mode: nat
    affinity_key: source-ip
    snat_address: 198.18.2.100
    health_check: {type: ikev2, interval: 5s, timeout: 2s, rise: 2, fall: 3, port: 500}
    backends:
      - {address: 10.0.0.11, weight: 100, state: active}
      - {address: 10.0.0.12, weight: 50, state: drain}
  - name: vpn6
    vip: 2001:db8::100
    forwarding_mode: transparent
    backends:
      - 2001:db8::11
`

func exampleProto() []*ikelbv1.Service {
	return []*ikelbv1.Service{{
		Name:               "vpn",
		Vip:                "198.18.2.100",
		Ports:              []uint32{500, 4500},
		PersistenceTimeout: durationpb.New(8 * time.Hour),
		ForwardingMode:     ikelbv1.ForwardingMode_FORWARDING_MODE_NAT,
		AffinityKey:        ikelbv1.AffinityKey_AFFINITY_KEY_SOURCE_IP,
		SnatAddress:        "198.18.2.100",
		HealthCheck: &ikelbv1.HealthCheck{
			Type: ikelbv1.HealthCheckType_HEALTH_CHECK_TYPE_IKEV2, Interval: durationpb.New(5 * time.Second),
			Timeout: durationpb.New(2 * time.Second), Rise: 2, Fall: 3, Port: 500,
		},
		Backends: []*ikelbv1.Backend{
			{Address: "10.0.0.11", Weight: 100, State: ikelbv1.BackendState_BACKEND_STATE_ACTIVE},
			{Address: "10.0.0.12", Weight: 50, State: ikelbv1.BackendState_BACKEND_STATE_DRAIN},
		},
	}, {
		// Every default filled in explicitly.
		Name:               "vpn6",
		Vip:                "2001:db8::100",
		Ports:              []uint32{500, 4500},
		PersistenceTimeout: durationpb.New(5 * time.Minute),
		ForwardingMode:     ikelbv1.ForwardingMode_FORWARDING_MODE_TRANSPARENT,
		AffinityKey:        ikelbv1.AffinityKey_AFFINITY_KEY_SOURCE_IP,
		HealthCheck: &ikelbv1.HealthCheck{
			Type: ikelbv1.HealthCheckType_HEALTH_CHECK_TYPE_ICMP, Interval: durationpb.New(5 * time.Second),
			Timeout: durationpb.New(2 * time.Second), Rise: 2, Fall: 3, Port: 500,
		},
		Backends: []*ikelbv1.Backend{
			{Address: "2001:db8::11", Weight: 100, State: ikelbv1.BackendState_BACKEND_STATE_ACTIVE},
		},
	}}
}

func equalServices(t *testing.T, got, want []*ikelbv1.Service) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d services, want %d:\n%v", len(got), len(want), got)
	}
	for i := range got {
		if !proto.Equal(got[i], want[i]) {
			t.Errorf("service %d:\n got %v\nwant %v", i, got[i], want[i])
		}
	}
}

func TestParseExample(t *testing.T) {
	got, err := Parse([]byte(example), "vpn.yaml")
	if err != nil {
		t.Fatal(err)
	}
	equalServices(t, got, exampleProto())
}

func TestParseEmpty(t *testing.T) {
	for _, in := range []string{"", "# nothing\n", "services:\n", "services: []\n", "~\n"} {
		got, err := Parse([]byte(in), "f")
		if err != nil || len(got) != 0 {
			t.Errorf("Parse(%q) = %v, %v; want no services, no error", in, got, err)
		}
	}
}

func TestAddressesAreCanonical(t *testing.T) {
	got, err := Parse([]byte(`services:
  - {name: a, vip: "2001:DB8:0::1", backends: ["::ffff:10.0.0.1"], snat_address: "2001:db8:0:0::2"}
`), "f")
	if err == nil {
		t.Fatalf("IPv4-mapped backend for an IPv6 VIP accepted: %v", got)
	}
	got, err = Parse([]byte(`services:
  - {name: a, vip: "2001:DB8:0::1", backends: ["2001:db8:0:0::0:11"], snat_address: "2001:db8:0:0::2"}
  - {name: b, vip: "::ffff:10.0.0.1", backends: ["::ffff:10.0.0.2"]}
`), "f")
	if err != nil {
		t.Fatal(err)
	}
	if g := got[0]; g.Vip != "2001:db8::1" || g.SnatAddress != "2001:db8::2" || g.Backends[0].Address != "2001:db8::11" {
		t.Errorf("not canonical: %v", g)
	}
	if g := got[1]; g.Vip != "10.0.0.1" || g.Backends[0].Address != "10.0.0.2" {
		t.Errorf("IPv4-mapped not unmapped: %v", g)
	}
}

func TestRoundTrip(t *testing.T) {
	first, err := Parse([]byte(example), "vpn.yaml")
	if err != nil {
		t.Fatal(err)
	}
	out, err := ToYAML(first)
	if err != nil {
		t.Fatal(err)
	}
	second, err := Parse(out, "roundtrip")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	equalServices(t, second, first)
	// The written form is the operator's form: short durations, one
	// backend per line.
	for _, want := range []string{
		"persistence_timeout: 8h\n",
		"health_check: {type: ikev2, interval: 5s, timeout: 2s, rise: 2, fall: 3, port: 500}\n",
		"- {address: 10.0.0.12, weight: 50, state: drain}\n",
		"ports: [500, 4500]\n",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("ToYAML output lacks %q:\n%s", want, out)
		}
	}
}

// A service as the server returns it (version, health, unspecified enums)
// comes back through ToYAML and Parse as its normalized form.
func TestRoundTripFromServer(t *testing.T) {
	srv := &ikelbv1.Service{
		Name: "vpn", Vip: "10.1.0.1", Ports: []uint32{4500, 500}, Version: 42,
		PersistenceTimeout: durationpb.New(90 * time.Second),
		Backends: []*ikelbv1.Backend{{
			Address: "10.0.0.2", Weight: 7, Health: ikelbv1.BackendHealth_BACKEND_HEALTH_UP,
			HealthChanged: timestamppb.Now(),
		}},
	}
	out, err := ToYAML([]*ikelbv1.Service{srv})
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(out, []byte("version")) || bytes.Contains(out, []byte("health:")) {
		t.Errorf("output-only fields written:\n%s", out)
	}
	got, err := Parse(out, "f")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if want := Normalize(srv); len(got) != 1 || Changes(got[0], want) != nil {
		t.Errorf("got %v\nwant %v", got, want)
	}
	if got[0].PersistenceTimeout.AsDuration() != 90*time.Second {
		t.Errorf("persistence_timeout = %v", got[0].PersistenceTimeout.AsDuration())
	}
}

// TestErrors checks that every problem names its field by full path and
// line, and that all problems are reported together.
func TestErrors(t *testing.T) {
	svc := func(body string) string {
		// line 1: services:, line 2: - name: vpn, line 3: vip, line 4+: body
		return "services:\n  - name: vpn\n    vip: 10.0.0.1\n" + body
	}
	tests := []struct {
		name, in string
		want     []string // each a whole error line
	}{
		{"syntax", "services: [\n", []string{"f: invalid service spec: yaml: line 1: did not find expected node content"}},
		{"top not mapping", "- name: vpn\n", []string{"the file must be a mapping with a services: list (f line 1)"}},
		{"top unknown", "servics: []\n", []string{`servics: unknown field (did you mean "services"?) (f line 1)`}},
		{"top twice", "services: []\nservices: []\n", []string{"services: is defined twice (f line 2)"}},
		{"two documents", "services: []\n---\nservices: []\n", []string{"only one YAML document is supported (f line 2)"}},
		{"services not list", "services: {name: vpn}\n", []string{"services: must be a list (f line 1)"}},
		{"service not mapping", "services:\n  - vpn\n", []string{
			`services[0]: must be a mapping of fields, not "vpn" (f line 2)`,
			`services[0].name: must be set (f line 2)`,
			`services[0].vip: must be set to an IP address (f line 2)`,
		}},
		{"unknown field", svc("    ports: [500]\n    prots: [4500]\n"), []string{`services[0].prots: unknown field (did you mean "ports"?) (f line 5)`}},
		{"unknown field no suggestion", svc("    colour: blue\n"), []string{`services[0].colour: unknown field (f line 4)`}},
		{"duplicate field", svc("    vip: 10.0.0.2\n"), []string{`services[0].vip: is defined twice (f line 4)`}},
		{"name missing", "services:\n  - vip: 10.0.0.1\n", []string{`services[0].name: must be set (f line 2)`}},
		{"name bad", "services:\n  - name: VPN_1\n    vip: 10.0.0.1\n", []string{
			`services[0].name: "VPN_1" must be 1 to 63 lower-case letters, digits and dashes, starting with a letter or digit (f line 2)`}},
		{"name list", "services:\n  - name: [a]\n    vip: 10.0.0.1\n", []string{
			`services[0].name: must be a single value, not a list (f line 2)`, `services[0].name: must be set (f line 2)`}},
		{"duplicate service", svc("  - name: vpn\n    vip: 10.0.0.2\n"), []string{
			`services[1].name: "vpn" is already the name of services[0] (f line 4)`}},
		{"vip missing", "services:\n  - name: vpn\n", []string{`services[0].vip: must be set to an IP address (f line 2)`}},
		{"vip bad", "services:\n  - name: vpn\n    vip: vpn.example.com\n", []string{`services[0].vip: "vpn.example.com" is not an IP address (f line 3)`}},
		{"vip zone", "services:\n  - name: vpn\n    vip: fe80::1%eth0\n", []string{`services[0].vip: "fe80::1%eth0" is not an IP address (f line 3)`}},
		{"vip unspecified", "services:\n  - name: vpn\n    vip: 0.0.0.0\n", []string{`services[0].vip: 0.0.0.0 is not a unicast address (f line 3)`}},
		{"ports", svc("    ports:\n      - 500\n      - 0\n      - 70000\n      - x\n      - 500\n"), []string{
			`services[0].ports[1]: 0 is out of range 1..65535 (f line 6)`,
			`services[0].ports[2]: 70000 is out of range 1..65535 (f line 7)`,
			`services[0].ports[3]: "x" is not a whole number (f line 8)`,
			`services[0].ports[4]: 500 is already listed as ports[0] (f line 9)`,
		}},
		{"ports mapping", svc("    ports: {a: 1}\n"), []string{`services[0].ports: must be a list of ports, not a mapping (f line 4)`}},
		{"timeout bad", svc("    persistence_timeout: 5 min\n"), []string{
			`services[0].persistence_timeout: "5 min" is not a duration (write it like 90s, 5m or 8h) (f line 4)`}},
		{"timeout number", svc("    persistence_timeout: 300\n"), []string{
			`services[0].persistence_timeout: "300" is not a duration (write it like 90s, 5m or 8h) (f line 4)`}},
		{"timeout negative", svc("    persistence_timeout: -5m\n"), []string{`services[0].persistence_timeout: -5m must be positive (f line 4)`}},
		{"timeout empty", svc("    persistence_timeout:\n"), []string{
			`services[0].persistence_timeout: must be a duration such as 90s, 5m or 8h, not empty (f line 4)`}},
		{"mode", svc("    forwarding_mode: dsr\n"), []string{`services[0].forwarding_mode: "dsr" is not one of nat, transparent (f line 4)`}},
		{"affinity key", svc("    affinity_key: source-port\n"), []string{`services[0].affinity_key: "source-port" is not one of source-ip (f line 4)`}},
		{"snat bad", svc("    snat_address: x\n"), []string{`services[0].snat_address: "x" is not an IP address (f line 4)`}},
		{"snat family", svc("    snat_address: 2001:db8::1\n"), []string{
			`services[0].snat_address: 2001:db8::1 is not of the same address family as vip 10.0.0.1 (f line 4)`}},
		{"snat transparent", svc("    forwarding_mode: transparent\n    snat_address: 10.0.0.9\n"), []string{
			`services[0].snat_address: only applies to forwarding_mode nat, not transparent (f line 5)`}},
		{"health not mapping", svc("    health_check: icmp\n"), []string{`services[0].health_check: must be a mapping of fields, not "icmp" (f line 4)`}},
		{"health fields", svc("    health_check:\n      type: http\n      interval: 1 s\n      rise: 0\n      fall: 101\n      port: 0\n      tmeout: 1s\n"), []string{
			`services[0].health_check.type: "http" is not one of icmp, ikev2, none (f line 5)`,
			`services[0].health_check.interval: "1 s" is not a duration (write it like 90s, 5m or 8h) (f line 6)`,
			`services[0].health_check.rise: 0 is out of range 1..100 (f line 7)`,
			`services[0].health_check.fall: 101 is out of range 1..100 (f line 8)`,
			`services[0].health_check.port: 0 is out of range 1..65535 (f line 9)`,
			`services[0].health_check.tmeout: unknown field (did you mean "timeout"?) (f line 10)`,
		}},
		{"health timeout exceeds interval", svc("    health_check: {interval: 2s, timeout: 3s}\n"), []string{
			`services[0].health_check.timeout: 3s must not exceed the interval 2s (f line 4)`}},
		{"backends not list", svc("    backends: 10.0.0.2\n"), []string{`services[0].backends: must be a list of backends, not "10.0.0.2" (f line 4)`}},
		{"backends", svc(`    backends:
      - {address: 10.0.0.11, weight: 100, state: active}
      - {address: 10.0.0.12, weight: 100, state: actve}
      - {address: 10.0.0.11}
      - {weight: 5}
      - {address: 2001:db8::1, weight: 0}
      - {address: 10.0.0.13, weight: 1001, wieght: 5}
      - {address: 10.0.0.14, weight: heavy}
      - [10.0.0.15]
`), []string{
			`services[0].backends[1].state: "actve" is not one of active, drain, disabled (f line 6)`,
			`services[0].backends[2].address: 10.0.0.11 is already listed as backends[0] (f line 7)`,
			`services[0].backends[3].address: must be set to an IP address (f line 8)`,
			`services[0].backends[4].weight: 0 is out of range 1..1000 (f line 9)`,
			`services[0].backends[4].address: 2001:db8::1 is not of the same address family as vip 10.0.0.1 (f line 9)`,
			`services[0].backends[5].weight: 1001 is out of range 1..1000 (f line 10)`,
			`services[0].backends[5].wieght: unknown field (did you mean "weight"?) (f line 10)`,
			`services[0].backends[6].weight: "heavy" is not a whole number (f line 11)`,
			`services[0].backends[7]: must be a mapping of fields, not a list (f line 12)`,
			`services[0].backends[7].address: must be set to an IP address (f line 12)`,
		}},
		// Backends that are ikelb's own VIPs on its ports: every datagram
		// would come back as a new client.
		{"backend is the vip", svc("    backends:\n      - address: 10.0.0.2\n      - address: 10.0.0.1\n"), []string{
			`services[0].backends[1].address: 10.0.0.1 is the service's vip: ikelb would forward the datagrams to itself (f line 6)`}},
		{"backend is another vip", svc("  - name: b\n    vip: 10.0.0.9\n    backends: [{address: 10.0.0.1}]\n"), []string{
			`services[1].backends[0].address: 10.0.0.1 is the vip of services[0], which listens on port 500 too: ikelb would forward the datagrams to itself (f line 6)`}},
		{"vip is another's backend", svc("    backends: [{address: 10.0.0.9}]\n  - name: b\n    vip: 10.0.0.9\n    ports: [4500]\n"), []string{
			`services[1].vip: 10.0.0.9 is services[0].backends[0], which listens on port 4500 too: ikelb would forward the datagrams to itself (f line 6)`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.in), "f")
			if err == nil {
				t.Fatalf("no error for:\n%s", tt.in)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("error does not match ErrInvalid: %v", err)
			}
			got := strings.Split(err.Error(), "\n")
			slices.Sort(got)
			want := slices.Clone(tt.want)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Errorf("errors:\n got %q\nwant %q", got, want)
			}
		})
	}
}

// ikelbdConfig stands for ikelbd's config file, which embeds the services
// list and decodes it with its own strict decoder.
type ikelbdConfig struct {
	Node     string    `yaml:"node"`
	Services []Service `yaml:"services"`
}

func TestEmbeddedInConfig(t *testing.T) {
	in := `node: a
services:
  - name: vpn
    vip: 10.0.0.1
    backends:
      - {address: 10.0.0.11}
  - name: vpn2
    vip: 10.0.0.2
    backends:
      - {address: 10.0.0.12, state: actve}
`
	var cfg ikelbdConfig
	dec := yaml.NewDecoder(strings.NewReader(in))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		t.Fatal(err)
	}
	err := Validate(cfg.Services)
	want := `services[1].backends[0].state: "actve" is not one of active, drain, disabled (line 10)`
	if err == nil || err.Error() != want {
		t.Fatalf("Validate = %v; want %s", err, want)
	}
	fes := FieldErrors(err)
	if len(fes) != 1 || fes[0].Path != "services[1].backends[0].state" || fes[0].Line != 10 {
		t.Errorf("FieldErrors = %+v", fes)
	}

	cfg.Services[1].Backends[0].State = "drain"
	got, err := ToProto(cfg.Services)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[1].Backends[0].State != ikelbv1.BackendState_BACKEND_STATE_DRAIN {
		t.Errorf("ToProto = %v", got)
	}

	// Unknown fields of the surrounding struct still fail in the caller's
	// decoder.
	dec = yaml.NewDecoder(strings.NewReader("nodes: a\n"))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err == nil {
		t.Error("unknown config field accepted")
	}
}

// A service built in Go has no lines: errors name the field alone.
func TestProgrammaticService(t *testing.T) {
	s := Service{Name: "vpn", VIP: "10.0.0.1", Backends: []Backend{{Address: "10.0.0.2", Weight: 2000}}}
	_, err := s.Proto()
	if err == nil || err.Error() != "backends[0].weight: 2000 is out of range 1..1000" {
		t.Errorf("Proto() = %v", err)
	}
	s.Backends[0].Weight = 0
	pb, err := s.Proto()
	if err != nil {
		t.Fatal(err)
	}
	if pb.Backends[0].Weight != DefaultWeight {
		t.Errorf("weight = %d, want default %d", pb.Backends[0].Weight, DefaultWeight)
	}
	if _, err := ToProto([]Service{{Name: "x", VIP: "10.0.0.1", PersistenceTimeout: -time.Second}}); err == nil ||
		err.Error() != "services[0].persistence_timeout: -1s must be positive" {
		t.Errorf("ToProto = %v", err)
	}
}

func TestChanges(t *testing.T) {
	want := exampleProto()[0]
	// As a server might return it: other order, output-only fields,
	// canonical but differently ordered ports.
	srv := proto.Clone(want).(*ikelbv1.Service)
	srv.Version = 9
	slices.Reverse(srv.Backends)
	slices.Reverse(srv.Ports)
	srv.Backends[0].Health = ikelbv1.BackendHealth_BACKEND_HEALTH_DOWN
	if c := Changes(srv, want); c != nil {
		t.Errorf("Changes of an equivalent service = %v", c)
	}

	// Unspecified values equal their defaults.
	bare := &ikelbv1.Service{Name: "a", Vip: "10.0.0.1"}
	full, err := (&Service{Name: "a", VIP: "10.0.0.1"}).Proto()
	if err != nil {
		t.Fatal(err)
	}
	if c := Changes(bare, full); c != nil {
		t.Errorf("Changes(bare, defaults) = %v", c)
	}

	changed := proto.Clone(want).(*ikelbv1.Service)
	changed.Backends[1].Weight = 1
	changed.PersistenceTimeout = durationpb.New(time.Hour)
	changed.HealthCheck.Rise = 5
	changed.Vip = "198.18.2.101"
	got := Changes(srv, changed)
	if w := []string{"vip", "persistence_timeout", "health_check", "backends"}; !slices.Equal(got, w) {
		t.Errorf("Changes = %v, want %v", got, w)
	}
}

func TestFormatDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0: "", 8 * time.Hour: "8h", 90 * time.Minute: "1h30m", 5 * time.Minute: "5m",
		90 * time.Second: "1m30s", 2 * time.Second: "2s", 1500 * time.Millisecond: "1.5s",
		time.Hour + time.Second: "1h0m1s",
	} {
		if got := FormatDuration(d); got != want {
			t.Errorf("FormatDuration(%v) = %q, want %q", d, got, want)
		}
		if d == 0 {
			continue
		}
		if back, err := time.ParseDuration(FormatDuration(d)); err != nil || back != d {
			t.Errorf("FormatDuration(%v) does not parse back: %v %v", d, back, err)
		}
	}
}

func TestEnumNames(t *testing.T) {
	for _, s := range backendStates {
		v, err := ParseState(s)
		if err != nil || StateName(v) != s {
			t.Errorf("state %q: %v %v", s, v, err)
		}
	}
	if _, err := ParseState("gone"); !errors.Is(err, ErrInvalid) {
		t.Errorf("ParseState(gone) = %v", err)
	}
	if StateName(ikelbv1.BackendState_BACKEND_STATE_UNSPECIFIED) != "" || ModeName(99) != "" {
		t.Error("unspecified or unknown enum has a name")
	}
}

// Shorthands: a single port, a backend written as its address, anchors.
func TestShorthands(t *testing.T) {
	got, err := Parse([]byte(`services:
  - name: a
    vip: 10.0.0.1
    ports: 4500
    health_check: &hc {type: none}
    backends: [10.0.0.2]
  - name: b
    vip: 10.0.0.3
    health_check: *hc
`), "f")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got[0].Ports, []uint32{4500}) || got[0].Backends[0].Address != "10.0.0.2" ||
		got[1].HealthCheck.Type != ikelbv1.HealthCheckType_HEALTH_CHECK_TYPE_NONE {
		t.Errorf("got %v", got)
	}
}
