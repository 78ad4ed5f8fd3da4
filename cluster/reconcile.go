package cluster

import (
	"cmp"
	"context"
	"slices"
	"time"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/cluster/membership"
)

// raftChange is one change of the Raft configuration planned by the leader.
type raftChange struct {
	remove bool
	id     raft.ServerID
	addr   raft.ServerAddress // for an add
	why    string
}

// reconcileInput is what planReconcile decides from.
type reconcileInput struct {
	self      raft.ServerID
	servers   []raft.Server       // the latest Raft configuration
	members   []membership.Member // gossip's view, this node included
	now       time.Time
	deadAfter time.Duration
	// missingSince records, per Raft server that gossip does not know,
	// when this leader first noticed. planReconcile updates it; the leader
	// loop keeps it for as long as it leads.
	missingSince map[raft.ServerID]time.Time
}

// planReconcile compares gossip with the Raft configuration and returns the
// changes to make, removals first, and how soon a pending removal falls due
// (0: none pending). It is pure; the rules (DESIGN.md, "Membership"):
//
//   - an alive member with a Raft address that is not a voter at that
//     address is added as a voter (AddVoter is idempotent and also updates
//     an address);
//   - a member that left is removed at once;
//   - a member failed for DeadServerTimeout, or a server gossip has not
//     known for DeadServerTimeout, is removed;
//   - this node is never removed, and at most (voters-1)/2 voters are
//     removed in one round, so that a leader with a wrong view of gossip
//     cannot remove a majority (raft-autopilot's rule).
func planReconcile(in reconcileInput) ([]raftChange, time.Duration) {
	byName := make(map[raft.ServerID]membership.Member, len(in.members))
	for _, m := range in.members {
		byName[raft.ServerID(m.Name)] = m
	}
	inConfig := make(map[raft.ServerID]raft.Server, len(in.servers))
	voters := 0
	for _, s := range in.servers {
		inConfig[s.ID] = s
		if s.Suffrage == raft.Voter {
			voters++
		}
	}
	for id := range in.missingSince {
		if _, ok := inConfig[id]; !ok {
			delete(in.missingSince, id)
		}
	}

	var recheck time.Duration
	due := func(since time.Time) bool {
		left := since.Add(in.deadAfter).Sub(in.now)
		if left <= 0 {
			return true
		}
		if recheck == 0 || left < recheck {
			recheck = left
		}
		return false
	}
	type removal struct {
		raftChange
		rank  int // left, failed, unknown to gossip
		voter bool
	}
	var removals []removal
	servers := slices.Clone(in.servers)
	slices.SortFunc(servers, func(a, b raft.Server) int { return cmp.Compare(a.ID, b.ID) })
	for _, s := range servers {
		if s.ID == in.self {
			continue
		}
		m, known := byName[s.ID]
		if known {
			delete(in.missingSince, s.ID)
		}
		r := removal{raftChange: raftChange{remove: true, id: s.ID}, voter: s.Suffrage == raft.Voter}
		switch {
		case !known:
			since, ok := in.missingSince[s.ID]
			if !ok {
				since = in.now
				in.missingSince[s.ID] = since
			}
			if !due(since) {
				continue
			}
			r.rank, r.why = 2, "unknown to gossip for "+in.now.Sub(since).Round(time.Millisecond).String()
		case m.Status == membership.StatusLeft:
			r.rank, r.why = 0, "left"
		case m.Status == membership.StatusFailed:
			if !due(m.Since) {
				continue
			}
			r.rank, r.why = 1, "failed for "+in.now.Sub(m.Since).Round(time.Millisecond).String()
		default:
			continue
		}
		removals = append(removals, r)
	}
	slices.SortStableFunc(removals, func(a, b removal) int { return cmp.Compare(a.rank, b.rank) })

	var changes []raftChange
	maxVoterRemovals := (voters - 1) / 2
	for _, r := range removals {
		if r.voter {
			if maxVoterRemovals == 0 {
				continue
			}
			maxVoterRemovals--
		}
		changes = append(changes, r.raftChange)
	}

	members := slices.Clone(in.members)
	slices.SortFunc(members, func(a, b membership.Member) int { return cmp.Compare(a.Name, b.Name) })
	for _, m := range members {
		id := raft.ServerID(m.Name)
		if id == in.self || m.Status != membership.StatusAlive || m.MetaErr != nil || m.Meta.RaftAddr == "" {
			continue
		}
		addr := raft.ServerAddress(m.Meta.RaftAddr)
		s, ok := inConfig[id]
		switch {
		case !ok:
			changes = append(changes, raftChange{id: id, addr: addr, why: "alive member not in the configuration"})
		case s.Address != addr:
			changes = append(changes, raftChange{id: id, addr: addr, why: "raft address changed from " + string(s.Address)})
		case s.Suffrage != raft.Voter:
			changes = append(changes, raftChange{id: id, addr: addr, why: "not a voter"})
		}
	}
	return changes, recheck
}

// reconcileMembers applies planReconcile's changes, one at a time, each
// committed before the next, and returns how soon to look again (0: at the
// regular interval). Failures are logged; the next round retries.
func (n *Node) reconcileMembers(ctx context.Context, missingSince map[raft.ServerID]time.Time) time.Duration {
	if n.members == nil {
		return 0
	}
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		n.log.Warn("read raft configuration", "error", err)
		return 0
	}
	changes, recheck := planReconcile(reconcileInput{
		self:         raft.ServerID(n.cfg.Name),
		servers:      f.Configuration().Servers,
		members:      n.members.Members(),
		now:          time.Now(),
		deadAfter:    n.cfg.DeadServerTimeout,
		missingSince: missingSince,
	})
	for _, c := range changes {
		if ctx.Err() != nil {
			return 0
		}
		what, attrs := "added raft voter", []any{"server", string(c.id), "raft_addr", string(c.addr), "reason", c.why}
		var err error
		if c.remove {
			what, attrs = "removed raft server", []any{"server", string(c.id), "reason", c.why}
			err = n.raft.RemoveServer(c.id, 0, n.cfg.ApplyTimeout).Error()
		} else {
			err = n.raft.AddVoter(c.id, c.addr, 0, n.cfg.ApplyTimeout).Error()
		}
		if err != nil {
			// Leadership lost or the change timed out: the next round
			// starts from the configuration as it is then.
			n.log.Warn("raft configuration change failed", append(attrs, "remove", c.remove, "error", err)...)
			return 0
		}
		n.log.Info(what, attrs...)
	}
	return recheck
}
