package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/cluster/membership"
	"github.com/ikelb/ikelb/dataplane"
	"github.com/ikelb/ikelb/persist"
	"google.golang.org/protobuf/proto"
)

// Node is one ikelb cluster member: the Raft instance with its FSM, the
// proposal batcher, the goroutine that hands committed services to the
// dataplane, membership (gossip) and the leader loop. Create it with New,
// then Start; Shutdown stops it and waits for every goroutine it started.
type Node struct {
	// Set once by New.
	cfg            Config
	log            *slog.Logger
	fsm            *FSM
	table          *dataplane.Table
	batcher        *batcher
	membersChanged chan struct{} // 1 slot: gossip saw a change (wakes the leader loop)

	// Set once by Start.
	dp        Dataplane
	raft      *raft.Raft
	transport *raft.NetworkTransport
	stores    Stores
	members   *membership.Members // nil without gossip
	peers     *peers
	started   time.Time
	ctx       context.Context // cancelled by Shutdown
	cancel    context.CancelFunc
	wg        sync.WaitGroup

	bootstrapped  atomic.Bool            // this node bootstrapped the cluster in this run
	bootstrapWait atomic.Pointer[string] // why runBootstrap has not bootstrapped (yet)
	dpErr         atomic.Pointer[string] // why the dataplane rejected the committed services; nil: it runs them

	mu sync.Mutex
	// mu guards the following.
	state      nodeState
	probeError map[backendKey]string // last probe error per backend, from the leader's checker
}

type nodeState uint8

const (
	stateNew nodeState = iota
	stateRunning
	stateShutdown
)

// New checks cfg and returns a Node that is not started yet. Its Proposer
// can be handed to the dataplane before Start; proposals wait in its queue.
func New(cfg Config) (*Node, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	table := cfg.Table
	if table == nil {
		table = dataplane.NewTable()
	}
	log := cfg.Logger.With("node", cfg.Name)
	n := &Node{
		cfg:            cfg,
		log:            log,
		table:          table,
		fsm:            newFSM(table, log),
		membersChanged: make(chan struct{}, 1),
		probeError:     map[backendKey]string{},
	}
	n.batcher = newBatcher(cfg.Batch)
	return n, nil
}

// Start opens the stores and the Raft transport, starts Raft (bootstrapping
// a single-voter cluster if so configured and there is no state), starts
// gossip if configured (joining in the background, and bootstrapping with
// the other members once BootstrapExpect of them are seen), and starts the
// node's goroutines. dp receives every committed service set; nil on a witness,
// which gossips the role "witness" and is a voter all the same.
func (n *Node) Start(dp Dataplane) (err error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.state != stateNew {
		return fmt.Errorf("start: %w", ErrShutdown)
	}
	n.dp = dp
	closers := []func() error{}
	defer func() {
		if err != nil {
			for i := len(closers) - 1; i >= 0; i-- {
				_ = closers[i]()
			}
		}
	}()

	if n.cfg.Stores != nil {
		n.stores = *n.cfg.Stores
	} else {
		s, err := openStores(n.cfg)
		if err != nil {
			return fmt.Errorf("open raft stores in %s: %w", n.cfg.DataDir, err)
		}
		n.stores = s
	}
	if n.stores.Close != nil {
		closers = append(closers, n.stores.Close)
	}

	var advertise net.Addr
	if n.cfg.RaftAdvertise != "" {
		a, err := net.ResolveTCPAddr("tcp", n.cfg.RaftAdvertise)
		if err != nil {
			return fmt.Errorf("raft advertise address: %w", err)
		}
		advertise = a
	}
	layer, err := newTCPStreamLayer(n.cfg.RaftBindAddr, advertise)
	if err != nil {
		return fmt.Errorf("raft transport on %s: %w", n.cfg.RaftBindAddr, err)
	}
	var stream raft.StreamLayer = layer
	if n.cfg.wrapStream != nil {
		stream = n.cfg.wrapStream(stream)
	}
	tr := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  stream,
		Logger:  persist.NewHCLog(n.log, "raft-net"),
		MaxPool: 3,
		Timeout: 10 * time.Second,
	})
	n.transport = tr
	closers = append(closers, tr.Close)

	rc := n.cfg.raftConfig()
	rc.Logger = persist.NewHCLog(n.log, "raft")
	hasState, err := raft.HasExistingState(n.stores.Log, n.stores.Stable, n.stores.Snapshots)
	if err != nil {
		return fmt.Errorf("check raft state: %w", err)
	}
	alone := n.cfg.Bootstrap || n.cfg.BootstrapExpect == 1
	if alone && !hasState {
		cfg := raft.Configuration{Servers: []raft.Server{{
			Suffrage: raft.Voter, ID: rc.LocalID, Address: tr.LocalAddr(),
		}}}
		if err := raft.BootstrapCluster(rc, n.stores.Log, n.stores.Stable, n.stores.Snapshots, tr, cfg); err != nil {
			return fmt.Errorf("bootstrap: %w", err)
		}
		n.bootstrapped.Store(true)
		n.log.Info("bootstrapped single-voter cluster", "raft_addr", string(tr.LocalAddr()))
	}
	r, err := raft.NewRaft(rc, n.fsm, n.stores.Log, n.stores.Stable, n.stores.Snapshots, tr)
	if err != nil {
		return fmt.Errorf("start raft: %w", err)
	}
	n.raft = r
	closers = append(closers, func() error { return r.Shutdown().Error() })
	if n.cfg.Gossip.BindAddr != "" {
		m, err := n.startGossip(string(tr.LocalAddr()), dp == nil)
		if err != nil {
			return err
		}
		n.members = m
	}
	n.peers = newPeers(n.cfg.DialOptions)
	n.started = time.Now()

	ctx, cancel := context.WithCancel(context.Background())
	n.ctx, n.cancel = ctx, cancel
	n.goroutine(func() { n.runDataplaneUpdates(ctx) })
	n.goroutine(func() { n.batcher.run(ctx, n) })
	n.goroutine(func() { n.runLeadership(ctx) })
	if n.members != nil {
		n.goroutine(func() { n.watchMembers(ctx) })
		n.goroutine(func() { n.joinGossip(ctx) })
		if !hasState && !alone {
			n.goroutine(func() { n.runBootstrap(ctx, n.cfg.BootstrapExpect) })
		}
	}
	n.state = stateRunning
	n.log.Info("node started", "raft_addr", string(tr.LocalAddr()), "gossip_addr", n.GossipAddr(), "data_dir", n.cfg.DataDir)
	return nil
}

// goroutine runs fn on a goroutine that Shutdown waits for.
func (n *Node) goroutine(fn func()) {
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		fn()
	}()
}

// tryGoroutine is goroutine for callers that may race Shutdown: it starts
// nothing and returns false once Shutdown has begun.
func (n *Node) tryGoroutine(fn func()) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.state != stateRunning {
		return false
	}
	n.goroutine(fn)
	return true
}

// Shutdown stops the node: the leader loop and batcher, then Raft, then
// gossip (without leaving: the others see this node fail; call Leave first
// to leave for good), the transport and stores. It waits for every
// goroutine the node started and is safe to call more than once.
func (n *Node) Shutdown() error {
	n.mu.Lock()
	if n.state != stateRunning {
		n.state = stateShutdown
		n.mu.Unlock()
		return nil
	}
	n.state = stateShutdown
	n.mu.Unlock()

	n.cancel()
	var errs []error
	if err := n.raft.Shutdown().Error(); err != nil {
		errs = append(errs, fmt.Errorf("raft shutdown: %w", err))
	}
	n.wg.Wait()
	if n.members != nil {
		if err := n.members.Shutdown(); err != nil {
			errs = append(errs, fmt.Errorf("gossip shutdown: %w", err))
		}
	}
	n.peers.close()
	if err := n.transport.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close raft transport: %w", err))
	}
	if n.stores.Close != nil {
		if err := n.stores.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close raft stores: %w", err))
		}
	}
	n.log.Info("node stopped")
	return errors.Join(errs...)
}

// running reports whether Start succeeded and Shutdown was not called.
func (n *Node) running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.state == stateRunning
}

// dataplaneRetry is how often a service set the dataplane rejected (a
// listener that could not open: a port held by another process, or below
// 1024 without the capability) is handed to it again. A variable for tests.
var dataplaneRetry = 5 * time.Second

// runDataplaneUpdates hands every committed service set to the dataplane,
// off raft's FSM goroutine. A set it rejects is retried every
// dataplaneRetry until it takes it or a newer set comes; meanwhile
// DataplaneError says why (the node is not ready).
func (n *Node) runDataplaneUpdates(ctx context.Context) {
	var retry <-chan time.Time
	var last []dataplane.Service
	apply := func() {
		retry = nil
		err := n.dp.SetServices(last)
		prev := n.dpErr.Load()
		if err == nil {
			if prev != nil {
				n.log.Info("dataplane runs the committed services again", "services", len(last))
			}
			n.dpErr.Store(nil)
			return
		}
		msg := err.Error()
		if prev == nil || *prev != msg {
			n.log.Error("dataplane rejected the committed services; retrying", "services", len(last), "error", err,
				"retry_every", dataplaneRetry)
		}
		n.dpErr.Store(&msg)
		retry = time.After(dataplaneRetry)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case last = <-n.fsm.Updates():
			if n.dp != nil {
				apply()
			}
		case <-retry:
			apply()
		}
	}
}

// DataplaneError is why the dataplane could not apply the committed
// services, or "" when it runs them all.
func (n *Node) DataplaneError() string {
	if p := n.dpErr.Load(); p != nil {
		return *p
	}
	return ""
}

// Proposer returns the batcher the dataplane proposes binds and touches to.
// Propose never blocks.
func (n *Node) Proposer() dataplane.Proposer { return n.batcher }

// Table returns the committed affinity table.
func (n *Node) Table() *dataplane.Table { return n.table }

// FSM returns the replicated state, for read access.
func (n *Node) FSM() *FSM { return n.fsm }

// Name returns the node's name (its Raft server ID).
func (n *Node) Name() string { return n.cfg.Name }

// RaftAddr returns the address the Raft transport is reachable at.
func (n *Node) RaftAddr() string { return string(n.transport.LocalAddr()) }

// IsLeader reports whether this node is the Raft leader.
func (n *Node) IsLeader() bool { return n.running() && n.raft.State() == raft.Leader }

// notLeaderError names the leader, if one is known.
func (n *Node) notLeaderError() error {
	addr, id := n.raft.LeaderWithID()
	if addr == "" {
		return fmt.Errorf("%w: no leader is known", ErrNotLeader)
	}
	return fmt.Errorf("%w: the leader is %s at %s", ErrNotLeader, id, addr)
}

// raftError maps raft's errors to this package's. raft answers ErrNotLeader
// and ErrLeadershipTransferInProgress before the entry is appended: those
// are unapplied (unappliedError); after ErrLeadershipLost or
// ErrAbortedByRestore the entry may still commit.
func (n *Node) raftError(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return unappliedError{fmt.Errorf("%w (%v)", n.notLeaderError(), err)}
	case errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, raft.ErrAbortedByRestore):
		return fmt.Errorf("%w (%v)", n.notLeaderError(), err)
	case errors.Is(err, raft.ErrEnqueueTimeout):
		return fmt.Errorf("%w: %v", ErrTimeout, err)
	case errors.Is(err, raft.ErrRaftShutdown):
		return fmt.Errorf("%w: %v", ErrShutdown, err)
	}
	return err
}

// applier commits log entries. The Node implements it for the leader (its
// own leader loop uses it); forwarder implements it for the admin API, and
// forwards to the leader from a follower.
type applier interface {
	applyEntry(ctx context.Context, t entryType, m proto.Message) (applyResult, error)
}

var _ applier = (*Node)(nil)

// applyEntry commits one entry and returns what Apply returned. It fails
// with ErrNotLeader on a follower, and with ErrTimeout when ctx (or, without
// a deadline, ApplyTimeout) runs out first: the entry may still commit.
func (n *Node) applyEntry(ctx context.Context, t entryType, m proto.Message) (applyResult, error) {
	if !n.running() {
		return applyResult{}, ErrShutdown
	}
	if n.raft.State() != raft.Leader {
		return applyResult{}, unappliedError{n.notLeaderError()}
	}
	data, err := encodeEntry(t, m)
	if err != nil {
		return applyResult{}, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, n.cfg.ApplyTimeout)
		defer cancel()
	}
	deadline, _ := ctx.Deadline()
	f := n.raft.Apply(data, time.Until(deadline))
	done := make(chan error, 1)
	// The future resolves when the entry is applied, fails, or raft shuts
	// down; Shutdown waits for this goroutine.
	if !n.tryGoroutine(func() { done <- f.Error() }) {
		return applyResult{}, ErrShutdown
	}
	select {
	case err := <-done:
		if err != nil {
			return applyResult{}, n.raftError(err)
		}
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return applyResult{}, fmt.Errorf("%v entry not applied in time, it may still be: %w", t, ErrTimeout)
		}
		return applyResult{}, ctx.Err()
	}
	switch r := f.Response().(type) {
	case error:
		return applyResult{}, r
	case applyResult:
		r.index = f.Index()
		return r, nil
	}
	return applyResult{index: f.Index()}, nil
}

// probeErrorOf returns the last probe error the leader's checker reported
// for a backend ("" if none, or on a follower).
func (n *Node) probeErrorOf(service, backend uint32) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.probeError[backendKey{service, backend}]
}
