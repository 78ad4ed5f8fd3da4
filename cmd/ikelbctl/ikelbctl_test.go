package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/ikelb/ikelb/cmd/internal/spec"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

// lines splits output into lines with trailing spaces removed.
func lines(s string) []string {
	out := strings.Split(strings.TrimRight(s, "\n"), "\n")
	for i := range out {
		out[i] = strings.TrimRight(out[i], " ")
	}
	return out
}

func wantLines(t *testing.T, got string, want ...string) {
	t.Helper()
	if g := lines(got); !slices.Equal(g, want) {
		t.Errorf("output:\n%s\nwant:\n%s", strings.Join(g, "\n"), strings.Join(want, "\n"))
	}
}

func TestServiceCommands(t *testing.T) {
	f := newFake()
	addr := f.serve(t)

	wantLines(t, ok(t, addr, "service", "create", "vpn", "--vip", "198.18.2.100", "--persistence-timeout", "8h",
		"--backend", "10.0.0.12:50", "--backend", "10.0.0.11", "--health", "ikev2", "--snat", "198.18.2.100"),
		"service vpn created (version 1)")
	got := f.service("vpn")
	want := &ikelbv1.Service{
		Name: "vpn", Vip: "198.18.2.100", Ports: []uint32{500, 4500}, Version: 1,
		PersistenceTimeout: durationpb.New(8 * time.Hour),
		ForwardingMode:     ikelbv1.ForwardingMode_FORWARDING_MODE_NAT,
		AffinityKey:        ikelbv1.AffinityKey_AFFINITY_KEY_SOURCE_IP,
		SnatAddress:        "198.18.2.100",
		HealthCheck: &ikelbv1.HealthCheck{Type: ikelbv1.HealthCheckType_HEALTH_CHECK_TYPE_IKEV2,
			Interval: durationpb.New(5 * time.Second), Timeout: durationpb.New(2 * time.Second), Rise: 2, Fall: 3, Port: 500},
		Backends: []*ikelbv1.Backend{
			{Address: "10.0.0.11", Weight: 100, State: ikelbv1.BackendState_BACKEND_STATE_ACTIVE},
			{Address: "10.0.0.12", Weight: 50, State: ikelbv1.BackendState_BACKEND_STATE_ACTIVE},
		},
	}
	if !proto.Equal(got, want) {
		t.Fatalf("created:\n%v\nwant\n%v", got, want)
	}
	ok(t, addr, "service", "create", "web", "--vip", "2001:db8::1", "--ports", "4500", "--mode", "transparent", "--health", "none")

	// The server reports health; the tables show it.
	f.mu.Lock()
	f.services["vpn"].Backends[0].Health = ikelbv1.BackendHealth_BACKEND_HEALTH_UP
	f.services["vpn"].Backends[0].HealthChanged = timestamppb.New(time.Now().Add(-3*time.Minute - time.Second))
	f.services["vpn"].Backends[1].Health = ikelbv1.BackendHealth_BACKEND_HEALTH_DOWN
	f.mu.Unlock()

	wantLines(t, ok(t, addr, "service", "list"),
		"NAME  VIP           PORTS     MODE                     PERSISTENCE  HEALTH-CHECK  BACKENDS-UP  VERSION",
		"vpn   198.18.2.100  500,4500  nat (snat 198.18.2.100)  8h           ikev2/5s      1/2          1",
		"web   2001:db8::1   4500      transparent              5m           none          0/0          2",
	)
	wantLines(t, ok(t, addr, "service", "get", "vpn"),
		"Name:                vpn",
		"VIP:                 198.18.2.100",
		"Ports:               500,4500",
		"Persistence timeout: 8h",
		"Forwarding mode:     nat (snat 198.18.2.100)",
		"SNAT address:        198.18.2.100",
		"Affinity key:        source-ip",
		"Health check:        ikev2 every 5s, timeout 2s, rise 2, fall 3, port 500",
		"Version:             1",
		"",
		"ADDRESS    WEIGHT  STATE   HEALTH  SINCE",
		"10.0.0.11  100     active  up      3m",
		"10.0.0.12  50      active  down    -",
	)

	// -o json is the Service message with proto field names.
	out := ok(t, addr, "-o", "json", "service", "get", "vpn")
	var fromJSON ikelbv1.Service
	if err := protojson.Unmarshal([]byte(out), &fromJSON); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	f.mu.Lock()
	same := proto.Equal(&fromJSON, f.services["vpn"])
	f.mu.Unlock()
	if !same {
		t.Errorf("json service differs:\n%s", out)
	}
	for _, w := range []string{`"persistence_timeout": "28800s"`, `"snat_address": "198.18.2.100"`, `"health": "BACKEND_HEALTH_UP"`} {
		if !strings.Contains(out, w) {
			t.Errorf("json lacks %s:\n%s", w, out)
		}
	}
	if out2 := ok(t, addr, "-o", "json", "service", "get", "vpn"); out2 != out {
		t.Errorf("json output is not stable:\n%s\n%s", out, out2)
	}
	var list map[string][]map[string]any
	if err := json.Unmarshal([]byte(ok(t, addr, "-o", "json", "service", "list")), &list); err != nil || len(list["services"]) != 2 {
		t.Errorf("service list -o json: %v %v", list, err)
	}

	// -o yaml is the apply format and reads back to the same service.
	y := ok(t, addr, "-o", "yaml", "service", "get", "vpn")
	parsed, err := spec.Parse([]byte(y), "get")
	if err != nil {
		t.Fatalf("%v\n%s", err, y)
	}
	if c := spec.Changes(f.service("vpn"), parsed[0]); c != nil {
		t.Errorf("yaml round trip changed %v:\n%s", c, y)
	}

	wantLines(t, ok(t, addr, "service", "delete", "web"), "service web deleted")
	if f.service("web") != nil {
		t.Error("web not deleted")
	}
}

func TestServiceCreateUsage(t *testing.T) {
	f := newFake()
	addr := f.serve(t)
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"service", "create", "vpn"}, "error: service create: --vip is required"},
		{[]string{"service", "create"}, "error: ikelbctl service create takes 1 argument(s): NAME (got 0)"},
		{[]string{"service", "create", "vpn", "--vip", "10.0.0.1", "--backend", "10.0.0.2:heavy"},
			`error: --backend "10.0.0.2:heavy": weight "heavy" is not a number in 1..1000`},
		{[]string{"service", "create", "vpn", "--vip", "10.0.0.1", "--mode", "dsr", "--backend", "2001:db8::1"},
			`error: invalid service: forwarding_mode: "dsr" is not one of nat, transparent; ` +
				`backends[0].address: 2001:db8::1 is not of the same address family as vip 10.0.0.1`},
		{[]string{"service", "create", "vpn", "--vip", "10.0.0.1", "--ports", "70000"}, "error: --ports: 70000 is not a port"},
		{[]string{"service", "create", "vpn", "--vip", "10.0.0.1", "--persistence-timeout", "5 min"},
			`error: invalid argument "5 min" for "--persistence-timeout" flag: time: unknown unit " min" in duration "5 min"`},
	} {
		r := ctl(t, addr, tt.args...)
		if r.code != exitUsage || r.stdout != "" || lines(r.stderr)[0] != tt.want ||
			!strings.Contains(r.stderr, "Run 'ikelbctl service create --help' for usage.") {
			t.Errorf("ikelbctl %s: %v\nwant first line %s", strings.Join(tt.args, " "), r, tt.want)
		}
	}
	if w := f.writes(); w != nil {
		t.Errorf("usage errors reached the server: %v", w)
	}
}

func TestParseBackendFlag(t *testing.T) {
	for in, want := range map[string]spec.Backend{
		"10.0.0.1":            {Address: "10.0.0.1"},
		"10.0.0.1:50":         {Address: "10.0.0.1", Weight: 50},
		"2001:db8::1":         {Address: "2001:db8::1"},
		"[2001:db8::1]:1000":  {Address: "2001:db8::1", Weight: 1000},
		"vpn1.example.com":    {Address: "vpn1.example.com"}, // rejected later, by spec
		"vpn1.example.com:10": {Address: "vpn1.example.com", Weight: 10},
	} {
		got, err := parseBackendFlag(in)
		if err != nil || got != want {
			t.Errorf("parseBackendFlag(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{"10.0.0.1:0", "10.0.0.1:1001", "[2001:db8::1]:x"} {
		if _, err := parseBackendFlag(in); err == nil {
			t.Errorf("parseBackendFlag(%q) accepted", in)
		}
	}
}

func TestServiceUpdate(t *testing.T) {
	f := newFake()
	addr := f.serve(t)
	ok(t, addr, "service", "create", "vpn", "--vip", "10.0.0.1", "--backend", "10.0.0.11")

	wantLines(t, ok(t, addr, "service", "update", "vpn", "--persistence-timeout", "8h", "--health-interval", "10s"),
		"service vpn updated: persistence_timeout, health_check (version 2)")
	if f.expectedVersion() != 1 {
		t.Errorf("expected_version = %d, want 1 (the version read)", f.expectedVersion())
	}
	s := f.service("vpn")
	if s.PersistenceTimeout.AsDuration() != 8*time.Hour || s.HealthCheck.Interval.AsDuration() != 10*time.Second ||
		len(s.Backends) != 1 || s.Vip != "10.0.0.1" {
		t.Errorf("after update: %v", s)
	}
	wantLines(t, ok(t, addr, "service", "update", "vpn", "--persistence-timeout", "8h"), "service vpn unchanged")
	wantLines(t, ok(t, addr, "service", "update", "vpn", "--backend", "10.0.0.12", "--backend", "10.0.0.13:7"),
		"service vpn updated: backends (version 3)")
	if s := f.service("vpn"); len(s.Backends) != 2 || s.Backends[1].Weight != 7 {
		t.Errorf("backends not replaced: %v", s.Backends)
	}

	// A concurrent writer between the read and the write: Aborted, exit 1.
	f.bumpBeforeUpdate("vpn")
	r := ctl(t, addr, "service", "update", "vpn", "--mode", "transparent")
	if r.code != exitError || r.stderr != "error: Aborted: version conflict: service \"vpn\" is at version 4, not 3\n" {
		t.Errorf("conflicting update: %v", r)
	}

	r = ctl(t, addr, "service", "update", "nope", "--vip", "10.0.0.2")
	if r.code != exitError || r.stderr != "error: NotFound: service \"nope\" not found\n" {
		t.Errorf("update of a missing service: %v", r)
	}
}

func TestBackendCommands(t *testing.T) {
	f := newFake()
	addr := f.serve(t)
	ok(t, addr, "service", "create", "vpn", "--vip", "10.0.0.1", "--backend", "10.0.0.11")

	wantLines(t, ok(t, addr, "backend", "add", "vpn", "10.0.0.12", "--weight", "20", "--state", "disabled"),
		"backend 10.0.0.12 added to vpn")
	wantLines(t, ok(t, addr, "backend", "set", "vpn", "10.0.0.12", "--state", "active", "--weight", "30"),
		"backend 10.0.0.12 of vpn: state active, weight 30")
	wantLines(t, ok(t, addr, "backend", "drain", "vpn", "10.0.0.11"),
		"backend 10.0.0.11 of vpn: draining (keeps its clients, takes no new ones)")
	wantLines(t, ok(t, addr, "backend", "list", "vpn"),
		"ADDRESS    WEIGHT  STATE   HEALTH   SINCE",
		"10.0.0.11  100     drain   unknown  -",
		"10.0.0.12  30      active  unknown  -",
	)
	// -o json prints the resulting service.
	out := ok(t, addr, "-o", "json", "backend", "set", "vpn", "10.0.0.12", "--weight", "40")
	var s ikelbv1.Service
	if err := protojson.Unmarshal([]byte(out), &s); err != nil || s.Backends[1].Weight != 40 {
		t.Errorf("backend set -o json: %v\n%s", err, out)
	}
	wantLines(t, ok(t, addr, "backend", "remove", "vpn", "10.0.0.11"), "backend 10.0.0.11 removed from vpn")
	if s := f.service("vpn"); len(s.Backends) != 1 || s.Backends[0].Address != "10.0.0.12" {
		t.Errorf("after remove: %v", s.Backends)
	}

	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"backend", "set", "vpn", "10.0.0.12"}, exitUsage, "error: backend set: give --state and/or --weight"},
		{[]string{"backend", "set", "vpn", "10.0.0.12", "--state", "paused"}, exitUsage, `error: --state: "paused" is not one of active, drain, disabled`},
		{[]string{"backend", "add", "vpn", "10.0.0.13", "--weight", "0"}, exitUsage, "error: --weight: 0 is out of range 1..1000"},
		// The server's InvalidArgument is a usage error too.
		{[]string{"backend", "add", "vpn", "vpn3"}, exitUsage, `error: InvalidArgument: backend.address: "vpn3" is not an IP address`},
		{[]string{"backend", "add", "vpn", "10.0.0.12"}, exitError, `error: AlreadyExists: service "vpn" already has backend 10.0.0.12`},
		{[]string{"backend", "drain", "vpn", "10.9.9.9"}, exitError, `error: NotFound: service "vpn" has no backend 10.9.9.9`},
		{[]string{"backend", "remove", "nope", "10.9.9.9"}, exitError, `error: NotFound: service "nope" not found`},
	} {
		r := ctl(t, addr, tt.args...)
		if r.code != tt.code || r.stdout != "" || lines(r.stderr)[0] != tt.want {
			t.Errorf("ikelbctl %s: %v\nwant exit %d, %s", strings.Join(tt.args, " "), r, tt.code, tt.want)
		}
	}
}

func TestAffinityCommands(t *testing.T) {
	f := newFake()
	f.pageCap = 100
	now := time.Now()
	for i := range 250 {
		backend := "10.0.0.11"
		if i%2 == 1 {
			backend = "10.0.0.12"
		}
		f.affinities = append(f.affinities, &ikelbv1.Affinity{
			Service: "vpn", Client: fmt.Sprintf("192.0.2.%d", i), Backend: backend,
			Created: timestamppb.New(now.Add(-2 * time.Hour)), LastSeen: timestamppb.New(now.Add(-10 * time.Second)),
		})
	}
	f.affinities = append(f.affinities, &ikelbv1.Affinity{Service: "web", Client: "198.51.100.1", Backend: "10.1.0.1"})
	addr := f.serve(t)

	wantLines(t, ok(t, addr, "affinity", "lookup", "vpn", "192.0.2.7"),
		"SERVICE  CLIENT     BACKEND    AGE   LAST-SEEN",
		"vpn      192.0.2.7  10.0.0.12  2h0m  10s",
	)

	// --limit stops early and says so on stderr.
	r := ctl(t, addr, "affinity", "list", "--limit", "120")
	if r.code != 0 || len(lines(r.stdout)) != 121 || r.stderr != "(first 120 shown; use --limit N or --all for more)\n" {
		t.Errorf("list --limit 120: %d lines, %v", len(lines(r.stdout)), r.stderr)
	}
	// --all follows the page tokens: 3 pages of at most 100.
	before := f.callCount()
	out := ok(t, addr, "affinity", "list", "--all")
	if n := len(lines(out)) - 1; n != 251 {
		t.Errorf("list --all printed %d affinities, want 251", n)
	}
	if pages := f.callCount() - before; pages != 3 {
		t.Errorf("list --all made %d requests, want 3", pages)
	}
	// Filters are passed on; JSON holds every affinity.
	out = ok(t, addr, "-o", "json", "affinity", "list", "--all", "--service", "vpn", "--backend", "10.0.0.12")
	var resp ikelbv1.ListAffinitiesResponse
	if err := protojson.Unmarshal([]byte(out), &resp); err != nil || len(resp.Affinities) != 125 || resp.NextPageToken != "" {
		t.Errorf("list -o json: %d affinities, token %q, %v", len(resp.Affinities), resp.NextPageToken, err)
	}
	for _, a := range resp.Affinities {
		if a.Backend != "10.0.0.12" || a.Service != "vpn" {
			t.Fatalf("filter not applied: %v", a)
		}
	}

	wantLines(t, ok(t, addr, "affinity", "delete", "vpn", "192.0.2.7"), "affinity of 192.0.2.7 in vpn deleted")
	r = ctl(t, addr, "affinity", "lookup", "vpn", "192.0.2.7")
	if r.code != exitError || r.stderr != "error: NotFound: no affinity for 192.0.2.7 in \"vpn\"\n" {
		t.Errorf("lookup after delete: %v", r)
	}
	wantLines(t, ok(t, addr, "affinity", "flush", "vpn", "--backend", "10.0.0.11"), "125 affinities of vpn backend 10.0.0.11 deleted")
	wantLines(t, ok(t, addr, "-o", "json", "affinity", "flush", "vpn"), "{", `  "deleted": "124"`, "}")
	if r := ctl(t, addr, "affinity", "list", "--limit", "0"); r.code != exitUsage {
		t.Errorf("--limit 0: %v", r)
	}
}

func TestObservabilityCommands(t *testing.T) {
	f := newFake()
	now := time.Now()
	f.health = []*ikelbv1.BackendHealthStatus{
		{Service: "vpn", Backend: "10.0.0.11", Health: ikelbv1.BackendHealth_BACKEND_HEALTH_UP, Changed: timestamppb.New(now.Add(-26 * time.Hour))},
		{Service: "vpn", Backend: "10.0.0.12", Health: ikelbv1.BackendHealth_BACKEND_HEALTH_DOWN, Changed: timestamppb.New(now.Add(-5 * time.Second)),
			LastError: "ikev2: no response in 2s"},
		{Service: "web", Backend: "10.1.0.1"},
	}
	f.counters = []*ikelbv1.ServiceCounters{{
		Name: "vpn", Packets: 1000, Bytes: 123456, ReplyPackets: 900, ReplyBytes: 100000, Drops: 3, ActiveClients: 2,
		Backends: []*ikelbv1.BackendCounters{
			{Address: "10.0.0.11", Packets: 600, Bytes: 70000, ReplyPackets: 500, ReplyBytes: 60000, ActiveClients: 1},
			{Address: "10.0.0.12", Packets: 400, Bytes: 53456, ReplyPackets: 400, ReplyBytes: 40000, ActiveClients: 1},
		},
	}}
	f.node = &ikelbv1.GetNodeStatusResponse{
		Name: "lb1", Version: "v0.1.0", RaftState: "Leader", Leader: "lb1", LastIndex: 120, CommitIndex: 119,
		AppliedIndex: 118, Services: 2, Affinities: 2, ProposalsDropped: 7, Role: "voter",
	}
	f.cluster = &ikelbv1.GetClusterStatusResponse{
		Leader: "lb1", Term: 4, CommitIndex: 119, LastIndex: 120,
		Members: []*ikelbv1.ClusterMember{
			{Name: "lb1", Role: "voter", Suffrage: "Voter", Status: "alive", Leader: true, RaftAddress: "10.9.0.1:7452",
				AdminAddress: "127.0.0.1:7450", GossipAddress: "10.9.0.1:7453", MatchIndex: 120},
			{Name: "w1", Role: "witness", Suffrage: "Voter", Status: "suspect", RaftAddress: "10.9.0.3:7452", MatchIndex: 100, Lag: 20},
		},
	}
	addr := f.serve(t)

	wantLines(t, ok(t, addr, "health"),
		"SERVICE  BACKEND    HEALTH   SINCE  LAST-ERROR",
		"vpn      10.0.0.11  up       1d2h   -",
		"vpn      10.0.0.12  down     5s     ikev2: no response in 2s",
		"web      10.1.0.1   unknown  -      -",
	)
	if out := ok(t, addr, "health", "web"); len(lines(out)) != 2 {
		t.Errorf("health web:\n%s", out)
	}
	wantLines(t, ok(t, addr, "counters", "vpn"),
		"SERVICE  BACKEND    PACKETS  BYTES   REPLY-PACKETS  REPLY-BYTES  DROPS  CLIENTS",
		"vpn      *          1000     123456  900            100000       3      2",
		"vpn      10.0.0.11  600      70000   500            60000        -      1",
		"vpn      10.0.0.12  400      53456   400            40000        -      1",
	)
	wantLines(t, ok(t, addr, "status"),
		"Node:              lb1",
		"Version:           v0.1.0",
		"Role:              voter",
		"Raft state:        Leader",
		"Leader:            lb1",
		"Indexes:           last 120, commit 119, applied 118",
		"Degraded:          no",
		"Dataplane:         ok",
		"Services:          2",
		"Affinities:        2",
		"Proposals dropped: 7",
		"Started:           -",
	)
	wantLines(t, ok(t, addr, "cluster", "status"),
		"Leader:  lb1",
		"Term:    4",
		"Indexes: last 120, commit 119",
		"",
		"NAME  ROLE     SUFFRAGE  STATUS   LEADER  RAFT-ADDRESS   ADMIN-ADDRESS   MATCH-INDEX  LAG",
		"lb1   voter    Voter     alive    *       10.9.0.1:7452  127.0.0.1:7450  120          0",
		"w1    witness  Voter     suspect  -       10.9.0.3:7452  -               100          20",
	)

	// JSON: proto field names, zero values included.
	out := ok(t, addr, "-o", "json", "status")
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatal(err)
	}
	if m["degraded"] != false || m["raft_state"] != "Leader" || m["proposals_dropped"] != "7" {
		t.Errorf("status -o json:\n%s", out)
	}
	out = ok(t, addr, "-o", "yaml", "cluster", "status")
	if !strings.Contains(out, "leader: lb1\n") || !strings.Contains(out, "match_index: \"100\"") {
		t.Errorf("cluster status -o yaml:\n%s", out)
	}
	out = ok(t, addr, "-o", "json", "counters")
	var cr ikelbv1.GetCountersResponse
	if err := protojson.Unmarshal([]byte(out), &cr); err != nil || !proto.Equal(cr.Services[0], f.counters[0]) {
		t.Errorf("counters -o json: %v\n%s", err, out)
	}
}

const applyFile = `services:
  - name: vpn
    vip: 198.18.2.100
    persistence_timeout: 8h
    health_check: {type: ikev2}
    backends:
      - {address: 10.0.0.12, weight: 50}
      - 10.0.0.11
  - name: web
    vip: 198.18.2.101
    ports: [4500]
`

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "services.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestApply(t *testing.T) {
	f := newFake()
	addr := f.serve(t)
	file := writeFile(t, applyFile)

	wantLines(t, ok(t, addr, "apply", "--dry-run", "-f", file),
		"service/vpn created (dry run)",
		"service/web created (dry run)")
	if w := f.writes(); w != nil {
		t.Fatalf("dry run wrote: %v", w)
	}
	wantLines(t, ok(t, addr, "apply", "-f", file), "service/vpn created", "service/web created")
	if s := f.service("vpn"); s == nil || len(s.Backends) != 2 || s.HealthCheck.GetType() != ikelbv1.HealthCheckType_HEALTH_CHECK_TYPE_IKEV2 {
		t.Fatalf("vpn as created: %v", s)
	}
	// The server reordered the backends and reports health: still unchanged.
	wantLines(t, ok(t, addr, "apply", "-f", file), "service/vpn unchanged", "service/web unchanged")

	// Change one service; add an unrelated one on the server.
	ok(t, addr, "service", "create", "old", "--vip", "198.18.2.200")
	changed := strings.Replace(applyFile, "weight: 50", "weight: 60, state: drain", 1)
	changed = strings.Replace(changed, "8h", "24h", 1)
	file2 := writeFile(t, changed)
	nWrites := len(f.writes())
	wantLines(t, ok(t, addr, "apply", "--dry-run", "--prune", "-f", file2),
		"service/vpn updated: persistence_timeout, backends (dry run)",
		"service/web unchanged",
		"service/old deleted (dry run)")
	if len(f.writes()) != nWrites {
		t.Fatalf("dry run wrote: %v", f.writes()[nWrites:])
	}
	versionBefore := f.service("vpn").Version
	wantLines(t, ok(t, addr, "apply", "--prune", "-f", file2),
		"service/vpn updated: persistence_timeout, backends",
		"service/web unchanged",
		"service/old deleted")
	if f.expectedVersion() != versionBefore {
		t.Errorf("update sent expected_version %d, want %d", f.expectedVersion(), versionBefore)
	}
	if s := f.service("vpn"); s.PersistenceTimeout.AsDuration() != 24*time.Hour || s.Backends[1].State != ikelbv1.BackendState_BACKEND_STATE_DRAIN {
		t.Errorf("vpn after update: %v", s)
	}
	if f.service("old") != nil {
		t.Error("--prune left service old")
	}

	// stdin and -o json.
	r := ctlIn(t, addr, changed, "-o", "json", "apply", "-f", "-")
	var res struct {
		DryRun  bool          `json:"dry_run"`
		Results []applyResult `json:"results"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &res); r.code != 0 || err != nil || len(res.Results) != 2 ||
		res.Results[0].Service != "vpn" || res.Results[0].Action != "unchanged" {
		t.Errorf("apply -o json: %v %+v", r, res)
	}
}

func TestApplyErrors(t *testing.T) {
	f := newFake()
	addr := f.serve(t)

	bad := writeFile(t, `services:
  - name: vpn
    vip: 198.18.2.100
    backends:
      - {address: 10.0.0.11, state: actve}
      - {adress: 10.0.0.12}
`)
	r := ctl(t, addr, "apply", "-f", bad)
	want := fmt.Sprintf(`error: %[1]s is not valid:
  services[0].backends[0].state: "actve" is not one of active, drain, disabled (%[1]s line 5)
  services[0].backends[1].adress: unknown field (did you mean "address"?) (%[1]s line 6)
  services[0].backends[1].address: must be set to an IP address (%[1]s line 6)
Run 'ikelbctl apply --help' for usage.
`, bad)
	if r.code != exitUsage || r.stderr != want {
		t.Errorf("invalid file: %v\nwant stderr:\n%s", r, want)
	}

	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"apply"}, "error: apply: -f FILE is required"},
		{[]string{"apply", "-f", writeFile(t, ""), "--prune"}, "defines no services: refusing to --prune every service"},
		{[]string{"apply", "-f", writeFile(t, "services: [\n")}, "did not find expected node content"},
	} {
		r := ctl(t, addr, tt.args...)
		if r.code != exitUsage || !strings.Contains(r.stderr, tt.want) {
			t.Errorf("ikelbctl %s: %v\nwant %s", strings.Join(tt.args, " "), r, tt.want)
		}
	}
	r = ctl(t, addr, "apply", "-f", filepath.Join(t.TempDir(), "missing.yaml"))
	if r.code != exitError || !strings.Contains(r.stderr, "no such file or directory") {
		t.Errorf("missing file: %v", r)
	}
	if w := f.writes(); w != nil {
		t.Errorf("invalid input reached the server: %v", w)
	}

	// A concurrent change between apply's Get and its Update: Aborted, the
	// results so far are printed, exit 1.
	file := writeFile(t, applyFile)
	ok(t, addr, "apply", "-f", file)
	f.bumpBeforeUpdate("web")
	r = ctl(t, addr, "apply", "-f", writeFile(t, strings.Replace(applyFile, "[4500]", "[4500, 4501]", 1)))
	if r.code != exitError || r.stdout != "service/vpn unchanged\n" ||
		!strings.HasPrefix(r.stderr, `error: Aborted: update service web: version conflict: service "web" is at version`) {
		t.Errorf("conflict: %v", r)
	}
}

func TestCheckReady(t *testing.T) {
	ready := &ikelbv1.GetNodeStatusResponse{Name: "lb1", RaftState: "Follower", Leader: "lb2", Services: 1, Role: "voter"}
	for _, tt := range []struct {
		name   string
		mutate func(*ikelbv1.GetNodeStatusResponse)
		args   []string
		code   int
		out    string
	}{
		{"ready", func(*ikelbv1.GetNodeStatusResponse) {}, nil, exitOK, "ready\n"},
		{"degraded", func(s *ikelbv1.GetNodeStatusResponse) { s.Degraded = true; s.Leader = "" }, nil, exitError, "not ready: degraded: no raft quorum\n"},
		{"degraded allowed", func(s *ikelbv1.GetNodeStatusResponse) { s.Degraded = true; s.Leader = "" }, []string{"--allow-degraded"}, exitOK, "ready\n"},
		{"no leader", func(s *ikelbv1.GetNodeStatusResponse) { s.Leader = "" }, nil, exitError, "not ready: no raft leader\n"},
		{"no services", func(s *ikelbv1.GetNodeStatusResponse) { s.Services = 0 }, nil, exitError, "not ready: no services\n"},
		{"witness", func(s *ikelbv1.GetNodeStatusResponse) { s.Role = "witness" }, nil, exitError, "not ready: node is a witness (no dataplane)\n"},
		{"dataplane error", func(s *ikelbv1.GetNodeStatusResponse) {
			s.DataplaneError = "listen failed: 10.0.0.1:500: bind: permission denied"
		}, nil, exitError, "not ready: dataplane: listen failed: 10.0.0.1:500: bind: permission denied\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFake()
			f.node = proto.Clone(ready).(*ikelbv1.GetNodeStatusResponse)
			tt.mutate(f.node)
			addr := f.serve(t)
			r := ctl(t, addr, append([]string{"check", "ready"}, tt.args...)...)
			got := r.stdout + r.stderr
			if r.code != tt.code || got != tt.out {
				t.Errorf("%v\nwant exit %d, %q", r, tt.code, tt.out)
			}
		})
	}

	t.Run("server down", func(t *testing.T) {
		r := ctl(t, closedAddr(t), "check", "ready")
		if r.code != exitError || !strings.HasPrefix(r.stderr, "not ready: Unavailable: ") {
			t.Errorf("%v", r)
		}
	})
	t.Run("server hangs", func(t *testing.T) {
		f := newFake()
		f.blockStatus = true
		addr := f.serve(t)
		start := time.Now()
		r := ctl(t, addr, "check", "ready", "--timeout", "200ms")
		if el := time.Since(start); el > 3*time.Second {
			t.Errorf("check took %v with --timeout 200ms", el)
		}
		if r.code != exitError || !strings.HasPrefix(r.stderr, "not ready: DeadlineExceeded: ") {
			t.Errorf("%v", r)
		}
	})
	t.Run("default timeout is 1s", func(t *testing.T) {
		f := newFake()
		f.blockStatus = true
		addr := f.serve(t)
		start := time.Now()
		r := ctl(t, addr, "check", "ready")
		if el := time.Since(start); el < 900*time.Millisecond || el > 3*time.Second {
			t.Errorf("check ready gave up after %v, want about 1s (not the global 10s)", el)
		}
		if r.code != exitError || !strings.HasPrefix(r.stderr, "not ready: DeadlineExceeded: ") {
			t.Errorf("%v", r)
		}
	})
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	return addr
}

func TestErrorsAndExitCodes(t *testing.T) {
	f := newFake()
	addr := f.serve(t)
	for _, tt := range []struct {
		args   []string
		code   int
		stderr string
	}{
		{[]string{"service", "get", "nope"}, exitError, "error: NotFound: service \"nope\" not found\n"},
		{[]string{"service", "delete", "nope"}, exitError, "error: NotFound: service \"nope\" not found\n"},
		{[]string{"status"}, exitError, "error: Unavailable: node is shut down\n"},
		{[]string{"bogus"}, exitUsage, "error: unknown command \"bogus\" for \"ikelbctl\"\nRun 'ikelbctl --help' for usage.\n"},
		{[]string{"service", "bogus"}, exitUsage, "error: unknown command \"bogus\" for \"ikelbctl service\"\nRun 'ikelbctl service --help' for usage.\n"},
		{[]string{"service", "list", "extra"}, exitUsage, "error: ikelbctl service list takes 0 argument(s):  (got 1)\nRun 'ikelbctl service list --help' for usage.\n"},
		{[]string{"health", "a", "b"}, exitUsage, "error: ikelbctl health takes at most 1 argument(s): [SERVICE] (got 2)\nRun 'ikelbctl health --help' for usage.\n"},
		{[]string{"-o", "xml", "service", "list"}, exitUsage, "error: --output: \"xml\" is not one of table, json, yaml\nRun 'ikelbctl service list --help' for usage.\n"},
		{[]string{"--timeout", "0s", "status"}, exitUsage, "error: --timeout: must be positive, got 0s\nRun 'ikelbctl status --help' for usage.\n"},
		{[]string{"service", "list", "--bogus"}, exitUsage, "error: unknown flag: --bogus\nRun 'ikelbctl service list --help' for usage.\n"},
	} {
		r := ctl(t, addr, tt.args...)
		if r.code != tt.code || r.stderr != tt.stderr || r.stdout != "" {
			t.Errorf("ikelbctl %s: %v\nwant exit %d, stderr %q", strings.Join(tt.args, " "), r, tt.code, tt.stderr)
		}
	}

	r := ctl(t, closedAddr(t), "service", "list")
	if r.code != exitError || !strings.HasPrefix(r.stderr, "error: Unavailable: ") {
		t.Errorf("server down: %v", r)
	}

	// A group alone prints its help and succeeds.
	if r := ctl(t, addr, "affinity"); r.code != 0 || !strings.Contains(r.stdout, "Available Commands:") {
		t.Errorf("ikelbctl affinity: %v", r)
	}
}

func TestAddrFromEnv(t *testing.T) {
	f := newFake()
	f.node = &ikelbv1.GetNodeStatusResponse{Name: "lb1", Leader: "lb1", Services: 1, Role: "voter"}
	addr := f.serve(t)
	var out, errb strings.Builder
	code := run(t.Context(), []string{"check", "ready"}, strings.NewReader(""), &out, &errb,
		func(k string) string {
			if k == "IKELB_ADDR" {
				return addr
			}
			return ""
		})
	if code != 0 || out.String() != "ready\n" {
		t.Errorf("IKELB_ADDR not used: exit %d, %q %q", code, out.String(), errb.String())
	}
}

func TestCompactDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0: "0s", 45 * time.Second: "45s", 12*time.Minute + 40*time.Second: "12m", 3*time.Hour + 12*time.Minute: "3h12m",
		50 * time.Hour: "2d2h",
	} {
		if got := compactDuration(d); got != want {
			t.Errorf("compactDuration(%v) = %q, want %q", d, got, want)
		}
	}
}

// check ready --track-file keeps the file at 0 while the node is ready and
// 1 otherwise: not ready at start until --rise checks pass, after --fall
// not-ready answers in a row (a moment without a leader is not enough), at
// once for a dead server, and on exit.
func TestCheckReadyTrackFile(t *testing.T) {
	f := newFake()
	f.node = &ikelbv1.GetNodeStatusResponse{Name: "lb1", RaftState: "Follower", Leader: "lb2", Services: 1, Role: "voter"}
	addr := f.serve(t)
	file := filepath.Join(t.TempDir(), "ready")
	ctx, cancel := context.WithCancel(t.Context())
	var out, errb bytes.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"--addr", addr, "check", "ready", "--track-file", file, "--interval", "20ms"},
			strings.NewReader(""), &out, &errb, func(string) string { return "" })
	}()
	waitValue := func(want string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			b, _ := os.ReadFile(file)
			if string(b) == want+"\n" {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s holds %q, want %q", file, b, want)
			}
			time.Sleep(5 * time.Millisecond) // polling the file the watcher writes, with a deadline
		}
	}
	waitValue("0")
	setLeader := func(leader string) { // a new message: the server may still be marshalling the last one
		f.mu.Lock()
		n := proto.Clone(f.node).(*ikelbv1.GetNodeStatusResponse)
		n.Degraded, n.Leader = leader == "", leader
		f.node = n
		f.mu.Unlock()
	}
	// An election: leaderless for less than --fall checks.
	setLeader("")
	time.Sleep(60 * time.Millisecond) // 3 checks of 20 ms, below --fall 10
	setLeader("lb2")
	time.Sleep(60 * time.Millisecond)
	if b, _ := os.ReadFile(file); string(b) != "0\n" {
		t.Fatalf("a leaderless moment of 3 checks flipped the file to %q", b)
	}
	setLeader("")
	waitValue("1")
	setLeader("lb2")
	waitValue("0")
	killed := time.Now()
	f.stop() // ikelbd killed
	waitValue("1")
	if el := time.Since(killed); el > time.Second {
		t.Errorf("a dead server noticed after %v (interval 20ms)", el)
	}
	cancel()
	select {
	case code := <-done:
		if code != exitOK {
			t.Errorf("exit %d: %s", code, errb.String())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the watcher did not stop with its context")
	}
	waitValue("1")
	for _, want := range []string{"not ready: starting", " ready\n", "not ready: degraded: no raft quorum", "not ready: Unavailable: "} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	if r := ctl(t, addr, "check", "ready", "--track-file", file, "--rise", "0"); r.code != exitUsage {
		t.Errorf("--rise 0: %v", r)
	}
}

// A watcher started while ikelbd is down sees it come up within about a
// second (gRPC's reconnect backoff would otherwise grow to minutes).
func TestCheckReadyTrackFileSeesLateServer(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	file := filepath.Join(t.TempDir(), "ready")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var out, errb bytes.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"--addr", addr, "check", "ready", "--track-file", file, "--interval", "20ms"},
			strings.NewReader(""), &out, &errb, func(string) string { return "" })
	}()
	time.Sleep(6 * time.Second) // down long enough for the default backoff (1 s × 1.6ⁿ) to pass 4 s
	f := newFake()
	f.node = &ikelbv1.GetNodeStatusResponse{Name: "lb1", RaftState: "Leader", Leader: "lb1", Services: 1, Role: "voter"}
	lis, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("port %s taken meanwhile: %v", addr, err)
	}
	up := time.Now()
	f.serveOn(t, lis)
	for {
		if b, _ := os.ReadFile(file); string(b) == "0\n" {
			break
		}
		if time.Since(up) > 2*time.Second {
			t.Fatalf("not ready %v after the server came up:\n%s", time.Since(up), out.String())
		}
		time.Sleep(10 * time.Millisecond) // polling the file the watcher writes, with a deadline
	}
	cancel()
	<-done
}
