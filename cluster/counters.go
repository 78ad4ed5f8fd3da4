package cluster

import (
	"net/netip"

	"github.com/ikelb/ikelb/dataplane"
)

// ServiceCounters are one committed service's counters on this node: the
// traffic counters are the dataplane's own (zero on a witness), the active
// clients come from the replicated affinity table.
type ServiceCounters struct {
	ID                       uint32
	Name                     string
	Packets, Bytes           uint64
	ReplyPackets, ReplyBytes uint64
	Drops                    uint64
	DropsByReason            map[string]uint64
	ActiveClients            uint64
	Backends                 []BackendCounters
}

// BackendCounters are one committed backend's counters on this node.
type BackendCounters struct {
	ID                       uint32
	Addr                     netip.Addr
	Packets, Bytes           uint64
	ReplyPackets, ReplyBytes uint64
	Drops                    uint64
	ActiveClients            uint64
}

// Counters returns the counters of every committed service, sorted by name.
// It scans the affinity table once.
func (n *Node) Counters() []ServiceCounters {
	services := n.fsm.services()
	active := n.fsm.affinityCounts()
	traffic := map[uint32]dataplane.ServiceCounters{}
	if n.running() && n.dp != nil {
		for _, c := range n.dp.Counters() {
			traffic[c.ID] = c
		}
	}
	out := make([]ServiceCounters, 0, len(services))
	for _, svc := range services {
		id := svc.rec.GetId()
		t := traffic[id]
		sc := ServiceCounters{
			ID: id, Name: svc.rec.GetName(),
			Packets: t.Packets, Bytes: t.Bytes, ReplyPackets: t.ReplyPackets, ReplyBytes: t.ReplyBytes,
			Drops: t.Drops, DropsByReason: t.DropsByReason,
		}
		tb := map[uint32]dataplane.BackendCounters{}
		for _, b := range t.Backends {
			tb[b.ID] = b
		}
		for _, b := range svc.dp.Backends {
			c := tb[b.ID]
			a := active[backendKey{id, b.ID}]
			sc.ActiveClients += a
			sc.Backends = append(sc.Backends, BackendCounters{
				ID: b.ID, Addr: b.Addr, Packets: c.Packets, Bytes: c.Bytes,
				ReplyPackets: c.ReplyPackets, ReplyBytes: c.ReplyBytes, Drops: c.Drops, ActiveClients: a,
			})
		}
		out = append(out, sc)
	}
	return out
}

// flowCounter is a Dataplane that counts its open client flows
// (*dataplane.Engine does).
type flowCounter interface{ Flows() int }

// kernelCounter is a Dataplane with a kernel fast path that reports what
// it carries per nat service (cmd/internal/hostnet's Dataplane).
type kernelCounter interface {
	KernelClients() map[uint32]dataplane.KernelClients
}

// dataplaneAs returns the running node's Dataplane as T, if it is one.
func dataplaneAs[T any](n *Node) (T, bool) {
	var zero T
	if !n.running() || n.dp == nil {
		return zero, false
	}
	t, ok := n.dp.(T)
	return t, ok
}
