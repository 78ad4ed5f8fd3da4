package cluster

import "github.com/ikelb/ikelb/dataplane"

// Dataplane is what a Node needs from the forwarding engine
// (*dataplane.Engine). A witness node has none.
type Dataplane interface {
	// SetServices swaps the committed service set. The Node calls it from
	// one goroutine with the latest set, never from raft's FSM goroutine.
	SetServices([]dataplane.Service) error
	// Counters returns this node's traffic counters per service.
	Counters() []dataplane.ServiceCounters
}
