package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestEmbeddedDefaultLoads(t *testing.T) {
	cfg, err := LoadConfig("")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.AdminAddress != "127.0.0.1:7450" || cfg.Cluster.Role != "voter" || cfg.DataDir == "" || cfg.Node == "" {
		t.Fatalf("unexpected default: %+v", cfg)
	}
}

func TestConfigErrorsNameTheField(t *testing.T) {
	cases := []struct{ yaml, want string }{
		{"admin_address: nowhere", "admin_address:"},
		{"admin_address: example.com:7450", "admin_address:"},
		{"log_level: loud", "log_level:"},
		{"raft: {heartbeat_timeout: -1s}", "raft.heartbeat_timeout:"},
		{"raft: {leader_lease_timeout: 2s}", "raft.leader_lease_timeout:"},
		{"raft: {batch_max: 0}", "raft.batch_max:"},
		{"raft: {bind_address: '0.0.0.0:7452'}", "raft.advertise_address:"},
		{"cluster: {role: arbiter}", "cluster.role:"},
		{"cluster: {join: [nohost]}", "cluster.join[0]:"},
		{"services: [{name: vpn, vip: 10.0.0.1, backends: [{address: 10.0.0.300}]}]", "services[0].backends[0].address"},
		{"servics: []", "servics"},
		{"data_dir: ''", "data_dir:"},
	}
	for _, c := range cases {
		path := filepath.Join(t.TempDir(), "c.yaml")
		if err := os.WriteFile(path, []byte(c.yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := LoadConfig(path)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: got %v, want an error naming %s", c.yaml, err, c.want)
		}
	}
}

func TestConfigOverlayKeepsDefaults(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(path, []byte("node: lb1\nraft: {heartbeat_timeout: 1s, election_timeout: 1s}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Node != "lb1" || cfg.Raft.HeartbeatTimeout != time.Second || cfg.Raft.BatchMax != 4096 || cfg.AdminAddress != "127.0.0.1:7450" {
		t.Fatalf("overlay lost defaults: %+v", cfg)
	}
}

// TestDemo runs the README's quick-start demonstration (a three-node
// cluster on loopback losing its leader) with fewer clients.
func TestDemo(t *testing.T) {
	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if err := runDemo(ctx, &out, demoOptions{clients: 40, shared: 10}); err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	for _, want := range []string{"ok   no client split", "ok   losing the leader moves no client to another server", "ok   the restarted node has every committed affinity"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
}
