package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestClusterBootstrapConfig: cluster.bootstrap_expect's bad combinations
// name the field, and the good ones map to cluster.Config as documented.
func TestClusterBootstrapConfig(t *testing.T) {
	const gossip = "cluster: {gossip_address: 127.0.0.1:7946, "
	cases := []struct {
		yaml   string
		want   string // error naming this; "" valid
		alone  bool
		expect int
	}{
		{"", "", true, 0}, // the single-node default
		{"cluster: {bootstrap_expect: 1}", "", true, 0},
		{gossip + "join: []}", "", true, 0},
		{gossip + "join: [127.0.0.1:7946, 127.0.0.2:7946], bootstrap_expect: 0}", "", false, 0},
		{gossip + "join: [127.0.0.1:7946, 127.0.0.2:7946, 127.0.0.3:7946], bootstrap_expect: 3}", "", false, 3},
		{gossip + "join: [], bootstrap_expect: 2}", "", false, 2},
		{gossip + "join: [], bootstrap_expect: 1}", "", true, 0},
		{"cluster: {bootstrap_expect: -1}", "cluster.bootstrap_expect:", false, 0},
		{"cluster: {bootstrap_expect: 3}", "cluster.bootstrap_expect: 3 needs cluster.gossip_address", false, 0},
		{"cluster: {join: [127.0.0.1:7946]}", "cluster.join: needs cluster.gossip_address", false, 0},
		{gossip + "join: [127.0.0.2:7946], bootstrap_expect: 1}", "cluster.bootstrap_expect: 1", false, 0},
	}
	for _, c := range cases {
		path := filepath.Join(t.TempDir(), "c.yaml")
		if err := os.WriteFile(path, []byte(c.yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := LoadConfig(path)
		if c.want != "" {
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("%q: got %v, want an error naming %s", c.yaml, err, c.want)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", c.yaml, err)
			continue
		}
		if alone, expect := cfg.Cluster.bootstrap(); alone != c.alone || expect != c.expect {
			t.Errorf("%q: bootstrap() = %v, %d; want %v, %d", c.yaml, alone, expect, c.alone, c.expect)
		}
	}
}
