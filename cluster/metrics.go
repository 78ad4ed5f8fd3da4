package cluster

import (
	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/dataplane"
	"github.com/prometheus/client_golang/prometheus"
)

// Collector exposes a Node's counters, affinity table size, raft state and
// proposal batcher counters to Prometheus. Each scrape reads the dataplane's
// counters and scans the affinity table once (for per-backend active
// clients). Register it with prometheus.Registry.MustRegister.
type Collector struct {
	node *Node
}

// NewCollector returns the Prometheus collector of n.
func NewCollector(n *Node) *Collector { return &Collector{node: n} }

var _ prometheus.Collector = (*Collector)(nil)

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("ikelb_"+name, help, labels, nil)
}

var (
	svcLabels = []string{"service"}
	beLabels  = []string{"service", "backend"}

	descSvcPackets      = desc("service_packets_total", "Datagrams forwarded client to backend.", svcLabels...)
	descSvcBytes        = desc("service_bytes_total", "Bytes forwarded client to backend.", svcLabels...)
	descSvcReplyPackets = desc("service_reply_packets_total", "Datagrams forwarded backend to client.", svcLabels...)
	descSvcReplyBytes   = desc("service_reply_bytes_total", "Bytes forwarded backend to client.", svcLabels...)
	descSvcDrops        = desc("service_drops_total", "Datagrams dropped, by reason.", "service", "reason")
	descSvcActive       = desc("service_active_clients", "Committed affinities of the service.", svcLabels...)
	descBePackets       = desc("backend_packets_total", "Datagrams forwarded client to backend.", beLabels...)
	descBeBytes         = desc("backend_bytes_total", "Bytes forwarded client to backend.", beLabels...)
	descBeReplyPackets  = desc("backend_reply_packets_total", "Datagrams forwarded backend to client.", beLabels...)
	descBeReplyBytes    = desc("backend_reply_bytes_total", "Bytes forwarded backend to client.", beLabels...)
	descBeDrops         = desc("backend_drops_total", "Datagrams for the backend not sent.", beLabels...)
	descBeActive        = desc("backend_active_clients", "Committed affinities pointing at the backend.", beLabels...)
	descBeHealthy       = desc("backend_up", "Committed health: 1 up or unknown, 0 down.", beLabels...)

	descAffinities  = desc("affinity_entries", "Committed affinities in the table.")
	descRaftState   = desc("raft_state", "1 for the node's current raft state.", "state")
	descRaftTerm    = desc("raft_term", "Current raft term.")
	descRaftLast    = desc("raft_last_index", "Last raft log index.")
	descRaftCommit  = desc("raft_commit_index", "Raft commit index.")
	descRaftApplied = desc("raft_applied_index", "Raft index applied to the FSM.")
	descDegraded    = desc("degraded", "1 when the node knows no leader with quorum.")
	descServices    = desc("services", "Committed services.")
	descFlows       = desc("flows", "Client flows open in this node's userspace path (nat: one upstream socket each).")
	descKernFlows   = desc("kernel_nat_flows", "nat flows the kernel fast path rewrites statelessly at ingress, with their own socket's address and port.", "service")
	descKernDNAT    = desc("kernel_nat_dnat_clients", "nat clients the kernel fast path carries through conntrack's DNAT map (with the ingress stage: those beyond the flow limit).", "service")
	descDropped     = desc("proposals_dropped_total", "Proposals dropped, by reason.", "reason")
	descProposed    = desc("proposals_total", "Proposals handed to raft on this node, as the leader.")
	descHeld        = desc("proposals_held", "Proposals held while no leader is reachable (degraded), sent once one is.")
	descRequeued    = desc("proposals_requeued_total", "Proposals of batches that failed to commit, sent again.")
	descForwarded   = desc("proposals_forwarded_total", "Proposals sent to the leader, as a follower.")
	descReceived    = desc("proposals_received_total", "Proposals other nodes forwarded to this one.")
	descBatches     = desc("proposal_batches_total", "Affinity batches handed to raft or forwarded to the leader.")
	descFailed      = desc("proposal_batches_failed_total", "Affinity batches not committed (raft error or forwarding failed).")
)

// Describe sends every metric's description.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		descSvcPackets, descSvcBytes, descSvcReplyPackets, descSvcReplyBytes, descSvcDrops, descSvcActive,
		descBePackets, descBeBytes, descBeReplyPackets, descBeReplyBytes, descBeDrops, descBeActive, descBeHealthy,
		descAffinities, descRaftState, descRaftTerm, descRaftLast, descRaftCommit, descRaftApplied, descDegraded,
		descServices, descFlows, descKernFlows, descKernDNAT, descDropped, descHeld, descRequeued, descProposed, descForwarded, descReceived, descBatches, descFailed,
	} {
		ch <- d
	}
}

// Collect sends the current values.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	n := c.node
	healthy := map[backendKey]bool{}
	for _, s := range n.fsm.Services() {
		for _, b := range s.Backends {
			healthy[backendKey{s.ID, b.ID}] = b.Health != dataplane.HealthDown
		}
	}
	for _, s := range n.Counters() {
		counter(descSvcPackets, s.Packets, s.Name)
		counter(descSvcBytes, s.Bytes, s.Name)
		counter(descSvcReplyPackets, s.ReplyPackets, s.Name)
		counter(descSvcReplyBytes, s.ReplyBytes, s.Name)
		for reason, v := range s.DropsByReason {
			counter(descSvcDrops, v, s.Name, reason)
		}
		gauge(descSvcActive, float64(s.ActiveClients), s.Name)
		for _, b := range s.Backends {
			addr := b.Addr.String()
			counter(descBePackets, b.Packets, s.Name, addr)
			counter(descBeBytes, b.Bytes, s.Name, addr)
			counter(descBeReplyPackets, b.ReplyPackets, s.Name, addr)
			counter(descBeReplyBytes, b.ReplyBytes, s.Name, addr)
			counter(descBeDrops, b.Drops, s.Name, addr)
			gauge(descBeActive, float64(b.ActiveClients), s.Name, addr)
			up := 0.0
			if healthy[backendKey{s.ID, b.ID}] {
				up = 1
			}
			gauge(descBeHealthy, up, s.Name, addr)
		}
	}
	st := n.Status()
	gauge(descAffinities, float64(st.Affinities))
	gauge(descServices, float64(st.Services))
	if f, ok := dataplaneAs[flowCounter](n); ok {
		gauge(descFlows, float64(f.Flows()))
	}
	if k, ok := dataplaneAs[kernelCounter](n); ok {
		if kc := k.KernelClients(); kc != nil {
			for _, s := range n.fsm.Services() {
				if c, ok := kc[s.ID]; ok {
					gauge(descKernFlows, float64(c.Flows), s.Name)
					gauge(descKernDNAT, float64(c.DNAT), s.Name)
				}
			}
		}
	}
	for _, s := range []raft.RaftState{raft.Follower, raft.Candidate, raft.Leader, raft.Shutdown} {
		v := 0.0
		if s.String() == st.RaftState {
			v = 1
		}
		gauge(descRaftState, v, s.String())
	}
	gauge(descRaftTerm, float64(st.Term))
	gauge(descRaftLast, float64(st.LastIndex))
	gauge(descRaftCommit, float64(st.CommitIndex))
	gauge(descRaftApplied, float64(st.AppliedIndex))
	deg := 0.0
	if st.Degraded {
		deg = 1
	}
	gauge(descDegraded, deg)
	counter(descDropped, n.batcher.dropped.Load(), "queue_full")
	gauge(descHeld, float64(n.batcher.held.Load()))
	counter(descRequeued, n.batcher.requeued.Load())
	counter(descProposed, n.batcher.proposed.Load())
	counter(descForwarded, n.batcher.forwarded.Load())
	counter(descReceived, n.batcher.received.Load())
	counter(descBatches, n.batcher.batches.Load())
	counter(descFailed, n.batcher.failed.Load())
}
