package cluster

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/cluster/membership"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

const (
	// bootstrapPollInterval is how often a node without Raft state looks
	// at gossip to decide whether to bootstrap.
	bootstrapPollInterval = 250 * time.Millisecond
	// bootstrapQueryTimeout bounds asking the members whether they have
	// Raft state (ClusterService.GetStats, in parallel).
	bootstrapQueryTimeout = time.Second
	// joinOnlyWarnAfter is how long a node that only joins (no
	// BootstrapExpect) waits to be added before it says how to start a new
	// cluster.
	joinOnlyWarnAfter = 30 * time.Second
)

// planBootstrap decides, from gossip's view, the configuration a node with
// no Raft state bootstraps under BootstrapExpect: the voting members (alive,
// valid meta with a Raft address; voters and witnesses alike), sorted by
// name. It returns them all as candidates (to be asked whether they have
// Raft state) and, once there are at least expect of them and self is among
// the first expect by name, the servers of the configuration: those first
// expect, all voters. Otherwise servers is nil and wait says why. It is
// pure: every member that sees the same members plans the same
// configuration.
//
// More candidates than expect means more nodes started together than the
// operator said; the first expect by name bootstrap and their leader adds
// the rest, so every node still plans the same configuration.
func planBootstrap(self string, expect int, members []membership.Member) (servers []raft.Server, candidates []membership.Member, wait string) {
	for _, m := range members {
		if m.Status == membership.StatusAlive && m.MetaErr == nil && m.Meta.RaftAddr != "" {
			candidates = append(candidates, m)
		}
	}
	slices.SortFunc(candidates, func(a, b membership.Member) int { return cmp.Compare(a.Name, b.Name) })
	if len(candidates) < expect {
		return nil, candidates, fmt.Sprintf("sees %d of the %d voting members expected", len(candidates), expect)
	}
	chosen := candidates[:expect]
	if !slices.ContainsFunc(chosen, func(m membership.Member) bool { return m.Name == self }) {
		return nil, candidates, fmt.Sprintf("sees %d voting members for %d expected and is not among the first %d by name: waiting to be added by their leader",
			len(candidates), expect, expect)
	}
	for _, m := range chosen {
		servers = append(servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(m.Name), Address: raft.ServerAddress(m.Meta.RaftAddr)})
	}
	return servers, candidates, ""
}

// runBootstrap runs on a node that started without Raft state and with
// gossip, until the node has a log (it bootstrapped, or a leader added it)
// or ctx ends. With expect ≥ 2 it bootstraps once planBootstrap has planned
// the same configuration on two polls in a row (gossip settles) and none of
// the candidates has Raft state. Once one has, it never bootstraps: it
// waits for that cluster's leader to add this node. With expect 0 it only
// waits, and says how to start a new cluster if nothing happens.
func (n *Node) runBootstrap(ctx context.Context, expect int) {
	t := time.NewTicker(bootstrapPollInterval)
	defer t.Stop()
	start := time.Now()
	var (
		prev     []raft.Server // the plan of the previous poll
		lastWait string
		joinOnly = expect == 0 // never bootstrap (any more)
		warned   bool
	)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if n.raft.LastIndex() > 0 {
			if !n.bootstrapped.Load() {
				_, leader := n.raft.LeaderWithID()
				n.log.Info("added to the cluster by its leader", "leader", string(leader), "waited", time.Since(start).Round(time.Millisecond).String())
			}
			return
		}
		if joinOnly {
			if !warned && time.Since(start) > joinOnlyWarnAfter {
				warned = true
				msg := "no leader has added this node yet although a member has raft state; is that member's cluster up?"
				if expect == 0 {
					msg = "this node has no raft state and no leader has added it yet: it only joins an existing cluster. " +
						"To start a new cluster, set bootstrap_expect to the number of voters (witnesses included) on every node"
				}
				n.log.Warn(msg, "waited", time.Since(start).Round(time.Second).String(), "reason", lastWait)
			}
			continue
		}
		servers, candidates, wait := planBootstrap(n.cfg.Name, expect, n.members.Members())
		if wait == "" && !slices.Equal(servers, prev) {
			prev = servers // let gossip settle: act on a plan seen twice in a row
			continue
		}
		prev = servers
		if wait == "" {
			holder, err := n.memberWithState(ctx, candidates)
			switch {
			case err != nil:
				wait = "cannot tell whether the other members have raft state: " + err.Error()
			case holder != "":
				joinOnly = true
				wait = "member " + holder + " already has raft state: waiting for its cluster's leader to add this node"
			}
		}
		if wait != "" {
			n.bootstrapWait.Store(&wait)
			if wait != lastWait {
				n.log.Info("not bootstrapping", "reason", wait, "bootstrap_expect", expect)
				lastWait = wait
			}
			continue
		}
		err := n.raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error()
		switch {
		case errors.Is(err, raft.ErrCantBootstrap):
			// A leader reached this node first (a term or a log arrived).
			joinOnly = true
			lastWait = "raft state arrived before this node bootstrapped"
			n.log.Info("not bootstrapping", "reason", lastWait)
		case err != nil:
			n.log.Warn("bootstrap failed; retrying", "error", err)
		default:
			n.bootstrapped.Store(true)
			names := make([]string, len(servers))
			for i, s := range servers {
				names[i] = string(s.ID)
			}
			n.log.Info("bootstrapped cluster", "voters", names, "bootstrap_expect", expect,
				"waited", time.Since(start).Round(time.Millisecond).String())
			return
		}
	}
}

// memberWithState asks every member but this one, in parallel, whether it
// has Raft state (a term or a log), and returns the name of one that has.
// It fails when a member could not be asked, or could not tell (not
// started yet): that member may have state.
func (n *Node) memberWithState(ctx context.Context, members []membership.Member) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, bootstrapQueryTimeout)
	defer cancel()
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		holder string
		errs   []error
	)
	for _, m := range members {
		if m.Name == n.cfg.Name {
			continue
		}
		wg.Go(func() {
			has, err := n.hasRaftState(ctx, m)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				errs = append(errs, fmt.Errorf("%s: %w", m.Name, err))
			case has && holder == "":
				holder = m.Name
			}
		})
	}
	wg.Wait()
	if holder != "" {
		return holder, nil
	}
	return "", errors.Join(errs...)
}

// hasRaftState asks one member's ClusterService.GetStats.
func (n *Node) hasRaftState(ctx context.Context, m membership.Member) (bool, error) {
	if m.Meta.AdminAddr == "" {
		return false, errors.New("no admin address in its gossip meta")
	}
	c, err := n.peers.client(m.Meta.AdminAddr)
	if err != nil {
		return false, err
	}
	st, err := c.GetStats(ctx, &ikelbv1.GetStatsRequest{})
	if err != nil {
		return false, err
	}
	if st.GetRaftState() == raft.Shutdown.String() {
		return false, errors.New("not running yet")
	}
	return st.GetTerm() > 0 || st.GetLastIndex() > 0, nil
}
