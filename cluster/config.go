package cluster

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/cluster/membership"
	"github.com/ikelb/ikelb/dataplane"
	"github.com/ikelb/ikelb/persist"
	"google.golang.org/grpc"
)

// Defaults. The raft timers are tuned for about one second of failover on a
// LAN: a follower notices a dead leader after HeartbeatTimeout plus up to one
// more of random jitter, then an election takes one round trip.
const (
	DefaultRaftBindAddr       = "127.0.0.1:7452"
	DefaultHeartbeatTimeout   = 500 * time.Millisecond
	DefaultElectionTimeout    = 500 * time.Millisecond
	DefaultLeaderLeaseTimeout = 250 * time.Millisecond
	DefaultCommitTimeout      = 10 * time.Millisecond
	DefaultSnapshotInterval   = 30 * time.Second
	DefaultSnapshotThreshold  = 8192
	DefaultTrailingLogs       = 10240
	DefaultMaxBatch           = 4096
	DefaultLinger             = 2 * time.Millisecond
	DefaultQueueSize          = 65536
	DefaultMaxInflight        = 16
	DefaultApplyTimeout       = 5 * time.Second
	DefaultDeadServerTimeout  = 30 * time.Second
	DefaultReconcileInterval  = 5 * time.Second
	DefaultForwardTimeout     = 2 * time.Second
)

// Config configures a Node. The zero value of every field but Name and
// DataDir (or Stores) means its default.
type Config struct {
	// Name is the node's Raft server ID; unique in the cluster.
	Name string
	// DataDir holds the Raft log, stable store and snapshots when Stores is
	// nil.
	DataDir string
	// RaftBindAddr is the TCP address Raft listens on. Port 0 picks one.
	RaftBindAddr string
	// RaftAdvertise is the address other nodes reach this one at; default
	// the bound address (which must then not be unspecified).
	RaftAdvertise string
	// Bootstrap makes a single-voter cluster of this node if it has no Raft
	// state yet (the same as BootstrapExpect 1). It is a no-op on a node
	// with state. Validate rejects it with Gossip.Join: every node given the
	// same join list would start a cluster of its own.
	Bootstrap bool
	// BootstrapExpect, when 2 or more, makes a node with no Raft state wait
	// until gossip shows that many alive members that can vote (voters and
	// witnesses, this node included), none of which has Raft state; then
	// each of them bootstraps the same configuration: those members, sorted
	// by name. If any member already has Raft state the node never
	// bootstraps: it waits for that cluster's leader to add it. Requires
	// gossip. 1 is Bootstrap; 0 (with Bootstrap unset) never bootstraps.
	// See DESIGN.md, "Bootstrap".
	BootstrapExpect int
	// Logger receives the node's logs and raft's, bridged. Default: discard.
	Logger *slog.Logger
	// Table is the committed affinity table, shared with the dataplane. Nil:
	// the node keeps its own (a witness has no dataplane).
	Table *dataplane.Table
	// Stores are the Raft stores. Nil: opened under DataDir with package
	// persist, and closed on Shutdown.
	Stores *Stores
	// HealthChecker builds the leader's health checker; nil disables health
	// checks (backends keep their committed health).
	HealthChecker NewHealthChecker
	// Version is reported in the node status.
	Version string

	Raft   RaftConfig
	Batch  BatchConfig
	Gossip GossipConfig

	// AdminAddr is the host:port other nodes reach this node's gRPC server
	// (AdminService and ClusterService) at; it is gossiped so that followers
	// can forward writes to the leader. Required with gossip.
	AdminAddr string
	// DeadServerTimeout is how long a member must have been failed before
	// the leader removes it from the Raft configuration (a member that left
	// gracefully is removed at once). Default DefaultDeadServerTimeout.
	DeadServerTimeout time.Duration
	// ReconcileInterval is how often the leader reconciles membership with
	// the Raft configuration besides on membership events. Default
	// DefaultReconcileInterval.
	ReconcileInterval time.Duration
	// ForwardTimeout bounds one forwarded affinity batch (follower to
	// leader). Default DefaultForwardTimeout.
	ForwardTimeout time.Duration
	// DialOptions are used to reach other nodes' ClusterService. Default:
	// plaintext (the admin API has no transport security yet either).
	DialOptions []grpc.DialOption

	// ApplyTimeout bounds admin writes without a context deadline.
	ApplyTimeout time.Duration
	// ExpiryInterval is how often the leader scans for expired affinities.
	// Zero: min(shortest persistence timeout/10, 10s), at least 1s.
	ExpiryInterval time.Duration
	// Now is the clock for proposals and expiry; default time.Now.
	Now func() time.Time

	// wrapStream, if set, wraps the Raft stream layer (tests cut nodes
	// off with it).
	wrapStream func(raft.StreamLayer) raft.StreamLayer
}

// RaftConfig holds the raft timers; see hashicorp/raft's Config.
type RaftConfig struct {
	HeartbeatTimeout   time.Duration
	ElectionTimeout    time.Duration
	LeaderLeaseTimeout time.Duration
	CommitTimeout      time.Duration
	SnapshotInterval   time.Duration
	SnapshotThreshold  uint64
	TrailingLogs       uint64
}

// GossipConfig configures membership (hashicorp/memberlist through package
// membership). An empty BindAddr disables it: the node is a cluster of one.
type GossipConfig struct {
	// BindAddr is the ip:port gossip listens on (UDP and TCP); port 0 picks
	// one.
	BindAddr string
	// AdvertiseAddr is the address other members reach this one at;
	// default the bound one.
	AdvertiseAddr string
	// Join lists gossip addresses of members; any one answering is enough,
	// and it may include this node's own address (one list for every
	// node). Join is retried in the background until it succeeds, and then,
	// for as long as a listed address is not an alive member, again every
	// ReconcileInterval (backing off to DeadServerTimeout/3 while nothing
	// changes), so that a node restarted alone or cut off and healed finds
	// the others again.
	Join []string
	// EncryptKey is the optional AES key (16, 24 or 32 bytes) for gossip.
	EncryptKey []byte
	// Tunables are memberlist's timers; zero fields take
	// membership.DefaultTunables (a dead member is noticed in about 1 s).
	Tunables membership.Tunables
}

// BatchConfig tunes the proposal batcher.
type BatchConfig struct {
	// MaxBatch is the most proposals packed into one log entry.
	MaxBatch int
	// Linger is how long the batcher waits for more proposals after the
	// first one of a batch.
	Linger time.Duration
	// QueueSize bounds the proposals waiting; more are dropped and counted.
	QueueSize int
	// MaxInflight bounds the batches handed to raft and not yet committed.
	MaxInflight int
}

// Stores are the three stores raft needs. Close, if set, is called on
// Shutdown after raft has stopped.
type Stores struct {
	Log       raft.LogStore
	Stable    raft.StableStore
	Snapshots raft.SnapshotStore
	Close     func() error
}

func orDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// withDefaults returns c with every zero field set to its default.
func (c Config) withDefaults() Config {
	orDefault(&c.RaftBindAddr, DefaultRaftBindAddr)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	orDefault(&c.ApplyTimeout, DefaultApplyTimeout)
	orDefault(&c.DeadServerTimeout, DefaultDeadServerTimeout)
	orDefault(&c.ReconcileInterval, DefaultReconcileInterval)
	orDefault(&c.ForwardTimeout, DefaultForwardTimeout)
	r := &c.Raft
	orDefault(&r.HeartbeatTimeout, DefaultHeartbeatTimeout)
	orDefault(&r.ElectionTimeout, DefaultElectionTimeout)
	orDefault(&r.LeaderLeaseTimeout, DefaultLeaderLeaseTimeout)
	orDefault(&r.CommitTimeout, DefaultCommitTimeout)
	orDefault(&r.SnapshotInterval, DefaultSnapshotInterval)
	orDefault(&r.SnapshotThreshold, DefaultSnapshotThreshold)
	orDefault(&r.TrailingLogs, DefaultTrailingLogs)
	b := &c.Batch
	orDefault(&b.MaxBatch, DefaultMaxBatch)
	orDefault(&b.Linger, DefaultLinger)
	orDefault(&b.QueueSize, DefaultQueueSize)
	orDefault(&b.MaxInflight, DefaultMaxInflight)
	return c
}

// Validate reports the first problem with c (after defaults).
func (c Config) Validate() error {
	c = c.withDefaults()
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf(format, args...))
	}
	if c.Name == "" {
		bad("name: required")
	}
	if c.DataDir == "" && c.Stores == nil {
		bad("data_dir: required when no stores are given")
	}
	if c.Stores != nil && (c.Stores.Log == nil || c.Stores.Stable == nil || c.Stores.Snapshots == nil) {
		bad("stores: log, stable and snapshots are all required")
	}
	if _, _, err := net.SplitHostPort(c.RaftBindAddr); err != nil {
		bad("raft_bind_addr: %v", err)
	}
	if c.RaftAdvertise != "" {
		if _, err := net.ResolveTCPAddr("tcp", c.RaftAdvertise); err != nil {
			bad("raft_advertise: %v", err)
		}
	}
	switch {
	case c.BootstrapExpect < 0:
		bad("bootstrap_expect: must not be negative, got %d", c.BootstrapExpect)
	case c.BootstrapExpect > 1 && c.Bootstrap:
		bad("bootstrap_expect: %d contradicts bootstrap (a single-voter cluster); set one of them", c.BootstrapExpect)
	case c.BootstrapExpect > 1 && c.Gossip.BindAddr == "":
		bad("bootstrap_expect: %d needs gossip (gossip.bind_addr) to find the other members", c.BootstrapExpect)
	}
	if c.Gossip.BindAddr != "" {
		if (c.Bootstrap || c.BootstrapExpect == 1) && len(c.Gossip.Join) > 0 {
			bad("bootstrap: a node given join addresses must not bootstrap alone (every node given them would start a cluster of its own); use bootstrap_expect with the number of voters, or neither to join an existing cluster")
		}
		if c.AdminAddr == "" {
			bad("admin_addr: required with gossip (followers forward writes to the leader's)")
		} else if _, _, err := net.SplitHostPort(c.AdminAddr); err != nil {
			bad("admin_addr: %v", err)
		}
	}
	if c.DeadServerTimeout < 0 || c.ReconcileInterval < 0 || c.ForwardTimeout < 0 {
		bad("dead_server_timeout, reconcile_interval, forward_timeout: must not be negative")
	}
	r := c.Raft
	if r.LeaderLeaseTimeout > r.HeartbeatTimeout {
		bad("raft.leader_lease_timeout %v: must not exceed heartbeat_timeout %v", r.LeaderLeaseTimeout, r.HeartbeatTimeout)
	}
	if r.ElectionTimeout < r.HeartbeatTimeout {
		bad("raft.election_timeout %v: must be at least heartbeat_timeout %v", r.ElectionTimeout, r.HeartbeatTimeout)
	}
	if c.Batch.MaxBatch < 0 || c.Batch.QueueSize < 0 || c.Batch.MaxInflight < 0 || c.Batch.Linger < 0 {
		bad("batch: values must not be negative")
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cluster config: %w", err)
	}
	return nil
}

func (c Config) raftConfig() *raft.Config {
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(c.Name)
	rc.HeartbeatTimeout = c.Raft.HeartbeatTimeout
	rc.ElectionTimeout = c.Raft.ElectionTimeout
	rc.LeaderLeaseTimeout = c.Raft.LeaderLeaseTimeout
	rc.CommitTimeout = c.Raft.CommitTimeout
	rc.SnapshotInterval = c.Raft.SnapshotInterval
	rc.SnapshotThreshold = c.Raft.SnapshotThreshold
	rc.TrailingLogs = c.Raft.TrailingLogs
	rc.Logger = persist.NewHCLog(c.Logger, "raft")
	return rc
}
