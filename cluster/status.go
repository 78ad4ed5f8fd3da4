package cluster

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/cluster/membership"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

// Status is this node's view of itself and the cluster.
type Status struct {
	Name             string
	Role             string // "voter", or "witness" when the node has no dataplane
	RaftState        string // Leader, Follower, Candidate, Shutdown
	Leader           string // leader's raft address, empty if none is known
	LeaderID         string
	Term             uint64
	LastIndex        uint64
	CommitIndex      uint64
	AppliedIndex     uint64
	LastContact      time.Time // last contact with the leader (zero on the leader)
	Degraded         bool      // no leader known, or no contact with it for too long
	Services         int
	Affinities       int
	ProposalsDropped uint64 // queue full plus not leader
	ProposalsFailed  uint64 // batches not committed (raft error, or forwarding to the leader failed)
	Proposed         uint64 // proposals handed to raft on this node, as the leader
	Forwarded        uint64 // proposals sent to the leader, as a follower
	Received         uint64 // proposals other nodes forwarded to this one
	Batches          uint64 // affinity batches handed to raft or forwarded
	Started          time.Time
}

// Status returns the node's status. Degraded means this node cannot reach a
// quorum as far as it knows: it goes on forwarding by its last committed
// table and the deterministic backend choice.
func (n *Node) Status() Status {
	s := Status{
		Name:             n.cfg.Name,
		Role:             "voter",
		RaftState:        raft.Shutdown.String(),
		Services:         len(n.fsm.Services()),
		Affinities:       n.fsm.Len(),
		ProposalsDropped: n.batcher.dropped.Load(),
		ProposalsFailed:  n.batcher.failed.Load(),
		Proposed:         n.batcher.proposed.Load(),
		Forwarded:        n.batcher.forwarded.Load(),
		Received:         n.batcher.received.Load(),
		Batches:          n.batcher.batches.Load(),
		Degraded:         true,
	}
	if !n.running() {
		return s
	}
	if n.dp == nil { // set before running, read after: no race
		s.Role = "witness"
	}
	st := n.raft.State()
	addr, id := n.raft.LeaderWithID()
	s.RaftState = st.String()
	s.Leader, s.LeaderID = string(addr), string(id)
	s.Term = n.raft.CurrentTerm()
	s.LastIndex = n.raft.LastIndex()
	s.CommitIndex = n.raft.CommitIndex()
	s.AppliedIndex = n.raft.AppliedIndex()
	s.Started = n.started
	switch st {
	case raft.Leader:
		s.Degraded = false
	case raft.Follower:
		s.LastContact = n.raft.LastContact()
		stale := 2 * (n.cfg.Raft.HeartbeatTimeout + n.cfg.Raft.ElectionTimeout)
		s.Degraded = addr == "" || time.Since(s.LastContact) > stale
	}
	return s
}

// Member is one server of the Raft configuration.
type Member struct {
	Name     string
	RaftAddr string
	Suffrage string // Voter, Nonvoter, Staging
	Leader   bool
	Self     bool
}

// Members returns the servers of the latest Raft configuration.
func (n *Node) Members() ([]Member, error) {
	if !n.running() {
		return nil, ErrShutdown
	}
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, n.raftError(err)
	}
	_, leader := n.raft.LeaderWithID()
	var out []Member
	for _, s := range f.Configuration().Servers {
		out = append(out, Member{
			Name:     string(s.ID),
			RaftAddr: string(s.Address),
			Suffrage: s.Suffrage.String(),
			Leader:   s.ID == leader,
			Self:     string(s.ID) == n.cfg.Name,
		})
	}
	return out, nil
}

// RaftStats returns raft's own statistics (raft.Raft.Stats).
func (n *Node) RaftStats() map[string]string {
	if !n.running() {
		return nil
	}
	return n.raft.Stats()
}

// MemberStatus is one cluster member as this node sees it: the union of
// gossip and the Raft configuration, with the member's own Raft progress
// where it answered GetStats.
type MemberStatus struct {
	Name       string
	GossipAddr string // empty if gossip does not know it
	RaftAddr   string
	AdminAddr  string
	Role       string // voter | witness (from gossip meta)
	Suffrage   string // Voter, Nonvoter, Staging; empty if not in the Raft configuration
	Status     string // alive | dead | left (gossip), unknown if gossip does not know it
	Leader     bool
	Self       bool
	LastIndex  uint64 // the member's last log index, 0 if it did not answer
	Lag        uint64 // the leader's last index minus LastIndex
	StatsError string // why GetStats failed
}

// statsTimeout bounds the GetStats calls of one ClusterStatus.
const statsTimeout = time.Second

// ClusterStatus returns every member known to gossip or to the Raft
// configuration, sorted by name. It asks every alive member for its Raft
// progress (in parallel, for at most statsTimeout) to report replication
// lag against the leader's last index.
func (n *Node) ClusterStatus(ctx context.Context) ([]MemberStatus, error) {
	if !n.running() {
		return nil, ErrShutdown
	}
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, n.raftError(err)
	}
	_, leader := n.raft.LeaderWithID()
	byName := map[string]*MemberStatus{}
	get := func(name string) *MemberStatus {
		m, ok := byName[name]
		if !ok {
			m = &MemberStatus{Name: name, Status: "unknown", Leader: name == string(leader), Self: name == n.cfg.Name}
			byName[name] = m
		}
		return m
	}
	for _, s := range f.Configuration().Servers {
		m := get(string(s.ID))
		m.RaftAddr, m.Suffrage = string(s.Address), s.Suffrage.String()
	}
	if n.members != nil {
		for _, g := range n.members.Members() {
			m := get(g.Name)
			m.GossipAddr = g.Addr.String()
			switch g.Status {
			case membership.StatusAlive:
				m.Status = "alive"
			case membership.StatusFailed:
				m.Status = "dead"
			case membership.StatusLeft:
				m.Status = "left"
			}
			if g.MetaErr == nil {
				m.Role, m.AdminAddr = g.Meta.Role, g.Meta.AdminAddr
				if m.RaftAddr == "" {
					m.RaftAddr = g.Meta.RaftAddr
				}
			}
		}
	}
	self := get(n.cfg.Name)
	st := n.Status()
	self.Role, self.Status, self.LastIndex = st.Role, "alive", st.LastIndex

	ctx, cancel := context.WithTimeout(ctx, statsTimeout)
	defer cancel()
	var wg sync.WaitGroup
	for _, m := range byName {
		if m.Self || m.Status != "alive" || m.AdminAddr == "" {
			continue
		}
		c, err := n.peers.client(m.AdminAddr)
		if err != nil {
			m.StatsError = err.Error()
			continue
		}
		wg.Go(func() {
			r, err := c.GetStats(ctx, &ikelbv1.GetStatsRequest{})
			if err != nil {
				m.StatsError = err.Error()
				return
			}
			m.LastIndex = r.GetLastIndex()
		})
	}
	wg.Wait()

	out := make([]MemberStatus, 0, len(byName))
	var leaderLast uint64
	if l, ok := byName[string(leader)]; ok {
		leaderLast = l.LastIndex
	}
	for _, m := range byName {
		if leaderLast > 0 && m.StatsError == "" && m.LastIndex > 0 && leaderLast > m.LastIndex {
			m.Lag = leaderLast - m.LastIndex
		}
		out = append(out, *m)
	}
	slices.SortFunc(out, func(a, b MemberStatus) int { return cmp.Compare(a.Name, b.Name) })
	return out, nil
}
