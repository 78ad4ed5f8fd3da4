package main

import (
	"bytes"
	_ "embed"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/ikelb/ikelb/cmd/internal/spec"
)

// defaultConfigYAML is what ikelbd runs on when started without --config:
// one node, data in ./ikelb-data, admin API on 127.0.0.1:7450.
//
//go:embed default.yaml
var defaultConfigYAML []byte

// Config is ikelbd's configuration file. Every field has a default (see
// default.yaml); Validate names the offending field on error.
type Config struct {
	// Node is this node's name, unique in the cluster; default: the hostname.
	Node string `yaml:"node"`
	// DataDir holds the Raft log, stable store and snapshots.
	DataDir string `yaml:"data_dir"`
	// AdminAddress is the gRPC admin API's listen address.
	AdminAddress string `yaml:"admin_address"`
	// MetricsAddress serves Prometheus metrics on /metrics and readiness on
	// /readyz over HTTP; empty disables it.
	MetricsAddress string `yaml:"metrics_address"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `yaml:"log_level"`

	Raft    RaftConfig    `yaml:"raft"`
	Cluster ClusterConfig `yaml:"cluster"`
	// Dataplane are the forwarding settings beyond the services.
	Dataplane DataplaneConfig `yaml:"dataplane"`

	// Services are created at start when no service of that name exists yet;
	// afterwards the replicated state (driven by the admin API) is the truth.
	Services []spec.Service `yaml:"services"`
}

// RaftConfig are the consensus settings. The defaults give a failover of
// about a second on a LAN; see README "Tunables".
type RaftConfig struct {
	BindAddress      string        `yaml:"bind_address"`
	AdvertiseAddress string        `yaml:"advertise_address"`
	HeartbeatTimeout time.Duration `yaml:"heartbeat_timeout"`
	ElectionTimeout  time.Duration `yaml:"election_timeout"`
	LeaderLease      time.Duration `yaml:"leader_lease_timeout"`
	CommitTimeout    time.Duration `yaml:"commit_timeout"`
	SnapshotInterval time.Duration `yaml:"snapshot_interval"`
	SnapshotEntries  uint64        `yaml:"snapshot_threshold"`
	TrailingLogs     uint64        `yaml:"trailing_logs"`
	// Proposal batching from the packet path into Raft entries.
	BatchMax    int           `yaml:"batch_max"`
	BatchLinger time.Duration `yaml:"batch_linger"`
	QueueSize   int           `yaml:"queue_size"`
}

// DataplaneConfig are the node's forwarding settings.
type DataplaneConfig struct {
	// KernelFastPath lets the kernel (nftables DNAT from the committed
	// affinities) forward nat-mode clients whose binding has committed; new
	// clients still go through userspace first. Needs CAP_NET_ADMIN, nftables
	// and IP forwarding on; without them it is off with a log line. See
	// dataplane/DESIGN.md "Kernel fast path".
	KernelFastPath bool `yaml:"kernel_fast_path"`
	// NATFastPath is how the fast path carries nat-mode clients:
	// "ingress" (default) NATs each handed-over flow statelessly at the
	// interfaces' ingress, with the flow's own SNAT address and port,
	// where the host has Ethernet-like interfaces and the service is IPv4;
	// clients beyond the engine's flow limit, IPv6 services and other
	// hosts go through the DNAT and SNAT rules. "conntrack" keeps every
	// nat client on those rules. See README "Forwarding modes".
	NATFastPath string `yaml:"nat_fast_path"`
}

// ClusterConfig are the membership settings (several nodes).
type ClusterConfig struct {
	// Role is "voter" (a Raft voter with a dataplane) or "witness" (a voter
	// without a dataplane, to keep quorum for an HA pair).
	Role string `yaml:"role"`
	// GossipAddress is memberlist's bind address (UDP and TCP); empty:
	// single node.
	GossipAddress string `yaml:"gossip_address"`
	// GossipAdvertiseAddress is the address other members reach this one's
	// gossip at; default gossip_address.
	GossipAdvertiseAddress string `yaml:"gossip_advertise_address"`
	// AdminAdvertiseAddress is the address other members reach this node's
	// gRPC server (admin and node-to-node API) at, to forward writes to the
	// leader. Default: admin_address, or, when that is a wildcard, the Raft
	// advertise host with the admin port.
	AdminAdvertiseAddress string `yaml:"admin_advertise_address"`
	// Join lists members' gossip addresses; reaching any one is enough. It
	// may name this node too, so that every node can share one list. The
	// node keeps joining listed addresses that are not alive members, so a
	// node restarted alone or cut off finds the others again.
	Join []string `yaml:"join"`
	// BootstrapExpect is how a node with no Raft state gets into a cluster
	// (cluster/DESIGN.md, "Bootstrap"):
	//   - N ≥ 2: wait until gossip shows N alive voters (witnesses included),
	//     none with Raft state, then all N bootstrap one configuration; if a
	//     member has Raft state, wait to be added by its leader instead. Put
	//     the same join list and N in every node's configuration.
	//   - 1: bootstrap a cluster of this node alone (join must be empty).
	//   - 0 (default): alone when join is empty (or without gossip),
	//     otherwise only join an existing cluster.
	// A node with Raft state never bootstraps, whatever this says.
	BootstrapExpect int `yaml:"bootstrap_expect"`
	// EncryptKey is an optional base64 AES key (16, 24 or 32 bytes) for gossip.
	EncryptKey string `yaml:"encrypt_key"`
	// DeadServerTimeout: how long a failed member stays a Raft voter before
	// the leader removes it.
	DeadServerTimeout time.Duration `yaml:"dead_server_timeout"`
	// ReconcileInterval: how often the leader reconciles gossip with the
	// Raft configuration, besides on every membership event.
	ReconcileInterval time.Duration `yaml:"reconcile_interval"`
	// GossipTimers are memberlist's failure-detector timers.
	GossipTimers GossipTimers `yaml:"gossip_timers"`
}

// GossipTimers are memberlist's timers (cluster/membership.Tunables).
type GossipTimers struct {
	ProbeInterval           time.Duration `yaml:"probe_interval"`
	ProbeTimeout            time.Duration `yaml:"probe_timeout"`
	SuspicionMult           int           `yaml:"suspicion_mult"`
	SuspicionMaxTimeoutMult int           `yaml:"suspicion_max_timeout_mult"`
	GossipInterval          time.Duration `yaml:"gossip_interval"`
	PushPullInterval        time.Duration `yaml:"push_pull_interval"`
	TCPTimeout              time.Duration `yaml:"tcp_timeout"`
	DeadNodeReclaimTime     time.Duration `yaml:"dead_node_reclaim_time"`
}

// validateBootstrap checks cluster.bootstrap_expect against the gossip
// settings.
func (c *ClusterConfig) validateBootstrap() error {
	switch n := c.BootstrapExpect; {
	case n < 0:
		return fmt.Errorf("cluster.bootstrap_expect: must not be negative, got %d", n)
	case c.GossipAddress == "" && len(c.Join) > 0:
		return errors.New("cluster.join: needs cluster.gossip_address (without gossip this node is a cluster of one)")
	case c.GossipAddress == "" && n > 1:
		return fmt.Errorf("cluster.bootstrap_expect: %d needs cluster.gossip_address (without gossip this node is a cluster of one)", n)
	case n == 1 && len(c.Join) > 0:
		return errors.New("cluster.bootstrap_expect: 1 bootstraps this node alone, and every node given this join list would start a cluster of its own; " +
			"set it to the number of voters (witnesses included) that start together, or 0 to join an existing cluster")
	}
	return nil
}

// bootstrap returns cluster.Config's Bootstrap and BootstrapExpect for
// cluster.bootstrap_expect (see its doc).
func (c *ClusterConfig) bootstrap() (alone bool, expect int) {
	switch {
	case c.GossipAddress == "" || c.BootstrapExpect == 1:
		return true, 0
	case c.BootstrapExpect > 1:
		return false, c.BootstrapExpect
	}
	return len(c.Join) == 0, 0
}

// encryptKey decodes cluster.encrypt_key (nil when empty).
func (c *ClusterConfig) encryptKey() ([]byte, error) {
	if c.EncryptKey == "" {
		return nil, nil
	}
	k, err := base64.StdEncoding.DecodeString(c.EncryptKey)
	if err != nil {
		return nil, fmt.Errorf("cluster.encrypt_key: not base64: %w", err)
	}
	if n := len(k); n != 16 && n != 24 && n != 32 {
		return nil, fmt.Errorf("cluster.encrypt_key: must decode to 16, 24 or 32 bytes, got %d", n)
	}
	return k, nil
}

// LoadConfig reads the embedded default, then overlays FILE if given.
func LoadConfig(path string) (*Config, error) {
	var cfg Config
	if err := decodeStrict(defaultConfigYAML, &cfg); err != nil {
		return nil, fmt.Errorf("embedded default config: %w", err)
	}
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("config: %w", err)
		}
		if err := decodeStrict(data, &cfg); err != nil {
			return nil, fmt.Errorf("config %s: %w", path, err)
		}
	}
	if cfg.Node == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			h = "ikelb-1"
		}
		cfg.Node = h
	}
	if err := cfg.Validate(); err != nil {
		if path == "" {
			path = "embedded default"
		}
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return &cfg, nil
}

func decodeStrict(data []byte, v any) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// Validate checks every field and names the first bad one.
func (c *Config) Validate() error {
	if strings.TrimSpace(c.Node) == "" || strings.ContainsAny(c.Node, " \t\n/") {
		return fmt.Errorf("node: %q is not a valid node name", c.Node)
	}
	if c.DataDir == "" {
		return errors.New("data_dir: must be set")
	}
	if err := checkHostPort("admin_address", c.AdminAddress, false); err != nil {
		return err
	}
	if err := checkHostPort("metrics_address", c.MetricsAddress, true); err != nil {
		return err
	}
	switch c.Dataplane.NATFastPath {
	case "", "ingress", "conntrack":
	default:
		return fmt.Errorf("dataplane.nat_fast_path: %q is not one of ingress, conntrack", c.Dataplane.NATFastPath)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("log_level: %q is not one of debug, info, warn, error", c.LogLevel)
	}
	if err := checkHostPort("raft.bind_address", c.Raft.BindAddress, false); err != nil {
		return err
	}
	if err := checkHostPort("raft.advertise_address", c.Raft.AdvertiseAddress, true); err != nil {
		return err
	}
	if c.Raft.AdvertiseAddress == "" {
		if ap, err := netip.ParseAddrPort(c.Raft.BindAddress); err == nil && ap.Addr().IsUnspecified() {
			return fmt.Errorf("raft.advertise_address: must be set when raft.bind_address %q is a wildcard", c.Raft.BindAddress)
		}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"raft.heartbeat_timeout", c.Raft.HeartbeatTimeout},
		{"raft.election_timeout", c.Raft.ElectionTimeout},
		{"raft.leader_lease_timeout", c.Raft.LeaderLease},
		{"raft.commit_timeout", c.Raft.CommitTimeout},
		{"raft.snapshot_interval", c.Raft.SnapshotInterval},
		{"raft.batch_linger", c.Raft.BatchLinger},
	} {
		if d.v <= 0 {
			return fmt.Errorf("%s: must be a positive duration, got %v", d.name, d.v)
		}
	}
	if c.Raft.LeaderLease > c.Raft.HeartbeatTimeout {
		return fmt.Errorf("raft.leader_lease_timeout: %v must not exceed raft.heartbeat_timeout %v", c.Raft.LeaderLease, c.Raft.HeartbeatTimeout)
	}
	if c.Raft.BatchMax < 1 || c.Raft.BatchMax > 65536 {
		return fmt.Errorf("raft.batch_max: must be 1..65536, got %d", c.Raft.BatchMax)
	}
	if c.Raft.QueueSize < c.Raft.BatchMax {
		return fmt.Errorf("raft.queue_size: must be at least raft.batch_max (%d), got %d", c.Raft.BatchMax, c.Raft.QueueSize)
	}
	switch c.Cluster.Role {
	case "voter", "witness":
	default:
		return fmt.Errorf("cluster.role: %q is not one of voter, witness", c.Cluster.Role)
	}
	if err := checkHostPort("cluster.gossip_address", c.Cluster.GossipAddress, true); err != nil {
		return err
	}
	for i, j := range c.Cluster.Join {
		if _, _, err := net.SplitHostPort(j); err != nil {
			return fmt.Errorf("cluster.join[%d]: %q is not host:port", i, j)
		}
	}
	if err := c.Cluster.validateBootstrap(); err != nil {
		return err
	}
	if err := checkHostPort("cluster.gossip_advertise_address", c.Cluster.GossipAdvertiseAddress, true); err != nil {
		return err
	}
	if err := checkHostPort("cluster.admin_advertise_address", c.Cluster.AdminAdvertiseAddress, true); err != nil {
		return err
	}
	if _, err := c.Cluster.encryptKey(); err != nil {
		return err
	}
	g := c.Cluster.GossipTimers
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"cluster.dead_server_timeout", c.Cluster.DeadServerTimeout},
		{"cluster.reconcile_interval", c.Cluster.ReconcileInterval},
		{"cluster.gossip_timers.probe_interval", g.ProbeInterval},
		{"cluster.gossip_timers.probe_timeout", g.ProbeTimeout},
		{"cluster.gossip_timers.gossip_interval", g.GossipInterval},
		{"cluster.gossip_timers.push_pull_interval", g.PushPullInterval},
		{"cluster.gossip_timers.tcp_timeout", g.TCPTimeout},
		{"cluster.gossip_timers.dead_node_reclaim_time", g.DeadNodeReclaimTime},
	} {
		if d.v <= 0 {
			return fmt.Errorf("%s: must be a positive duration, got %v", d.name, d.v)
		}
	}
	if g.ProbeTimeout >= g.ProbeInterval {
		return fmt.Errorf("cluster.gossip_timers.probe_timeout: %v must be less than probe_interval %v", g.ProbeTimeout, g.ProbeInterval)
	}
	if g.SuspicionMult < 1 || g.SuspicionMaxTimeoutMult < 1 {
		return fmt.Errorf("cluster.gossip_timers.suspicion_mult, suspicion_max_timeout_mult: must be at least 1")
	}
	// spec's messages already carry the services[i]… path and line.
	return spec.Validate(c.Services)
}

func checkHostPort(field, v string, optional bool) error {
	if v == "" {
		if optional {
			return nil
		}
		return fmt.Errorf("%s: must be set (host:port)", field)
	}
	host, port, err := net.SplitHostPort(v)
	if err != nil {
		return fmt.Errorf("%s: %q is not host:port", field, v)
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil {
			return fmt.Errorf("%s: %q: host must be an IP address", field, v)
		}
	}
	if _, err := net.LookupPort("tcp", port); err != nil {
		return fmt.Errorf("%s: %q: bad port", field, v)
	}
	return nil
}
