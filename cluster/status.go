package cluster

import (
	"time"

	"github.com/hashicorp/raft"
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
	ProposalsFailed  uint64 // batches raft did not commit
	Proposed         uint64 // proposals handed to raft
	Batches          uint64 // affinity batches handed to raft
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
		ProposalsDropped: n.batcher.dropped.Load() + n.batcher.notLeader.Load(),
		ProposalsFailed:  n.batcher.failed.Load(),
		Proposed:         n.batcher.proposed.Load(),
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
