package membership

import (
	"net/netip"
	"time"

	"github.com/hashicorp/raft"
	autopilot "github.com/hashicorp/raft-autopilot"
)

// Status is a member's state as this member sees it.
//
// There is no "suspect": memberlist emits no event when it starts suspecting
// a member, and the Node.State it hands out is never set (its internal
// nodeState.State shadows it), so no public API reveals a suspicion. A
// suspected member is StatusAlive until the suspicion times out
// (StatusFailed) or is refuted.
type Status uint8

const (
	// StatusAlive: the member answers probes (or is only suspected).
	StatusAlive Status = iota + 1
	// StatusFailed: the member stopped answering and its suspicion timed
	// out; it may come back (then it is alive again, with a Join event).
	StatusFailed
	// StatusLeft: the member announced it was leaving (Leave).
	StatusLeft
)

func (s Status) String() string {
	switch s {
	case StatusAlive:
		return "alive"
	case StatusFailed:
		return "failed"
	case StatusLeft:
		return "left"
	}
	return "unknown"
}

// Member is one member of the gossip cluster, this one included.
type Member struct {
	// Name is the member's unique name (its Raft server ID).
	Name string
	// Addr is its gossip address.
	Addr netip.AddrPort
	// Meta is what it advertises. It is the zero Meta, and MetaErr is set,
	// when its metadata could not be decoded; the cluster must not make
	// such a member a Raft server.
	Meta    Meta
	MetaErr error
	// Status is alive, failed or left.
	Status Status
	// Since is when this member last saw Status change (local clock).
	Since time.Time
}

// NodeStatus maps Status to autopilot's NodeStatus.
func (m Member) NodeStatus() autopilot.NodeStatus {
	switch m.Status {
	case StatusAlive:
		return autopilot.NodeAlive
	case StatusFailed:
		return autopilot.NodeFailed
	case StatusLeft:
		return autopilot.NodeLeft
	}
	return autopilot.NodeUnknown
}

// AutopilotServers returns the members autopilot's
// ApplicationIntegration.KnownServers should report: every member with
// valid meta, keyed by name (the Raft server ID), with the Raft address,
// status, version, and role and admin_addr in Meta. Members whose meta could
// not be decoded are left out (autopilot then treats a Raft server of that
// name as stale). IsLeader and NodeType are left for raft and autopilot's
// promoter to fill.
func AutopilotServers(members []Member) map[raft.ServerID]*autopilot.Server {
	out := make(map[raft.ServerID]*autopilot.Server, len(members))
	for _, m := range members {
		if m.MetaErr != nil || m.Meta.RaftAddr == "" {
			continue
		}
		meta := map[string]string{"role": m.Meta.Role}
		if m.Meta.AdminAddr != "" {
			meta["admin_addr"] = m.Meta.AdminAddr
		}
		out[raft.ServerID(m.Name)] = &autopilot.Server{
			ID:         raft.ServerID(m.Name),
			Name:       m.Name,
			Address:    raft.ServerAddress(m.Meta.RaftAddr),
			NodeStatus: m.NodeStatus(),
			Version:    m.Meta.Version,
			Meta:       meta,
		}
	}
	return out
}

// EventKind says what happened to a member.
type EventKind uint8

const (
	// EventJoin: a member became alive (new, or back after failing or
	// leaving). This member's own Join comes first, from New.
	EventJoin EventKind = iota + 1
	// EventUpdate: an alive member changed its Meta.
	EventUpdate
	// EventLeave: a member left gracefully.
	EventLeave
	// EventFailed: a member was declared failed.
	EventFailed
)

func (k EventKind) String() string {
	switch k {
	case EventJoin:
		return "join"
	case EventUpdate:
		return "update"
	case EventLeave:
		return "leave"
	case EventFailed:
		return "failed"
	}
	return "unknown"
}

// Event is a change of one member, with the member as it is after it.
type Event struct {
	Kind   EventKind
	Member Member
}
