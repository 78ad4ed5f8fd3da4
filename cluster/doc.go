// Package cluster owns ikelb's replicated state and its admin API.
//
// The state — services with their backends and committed health, and the
// client → backend affinity table — is a hashicorp/raft FSM. Every log
// entry is one type byte followed by a protobuf message from
// proto/raftlog/v1 (see DESIGN.md). Guarantees:
//
//   - Apply is deterministic: it uses only the entry and the state (times
//     are chosen by the proposer and carried in the entry), so every replica
//     applying the same log holds the same state. It panics on an entry it
//     cannot decode rather than diverge.
//   - Affinity binds are first-committed-writer-wins: once a client is bound
//     to a usable backend, later binds (from any node) do not move it.
//   - The FSM is the only writer of the dataplane's affinity table; the
//     packet path reads it lock-free and never waits for Raft. Service
//     changes reach the dataplane through a 1-slot "latest" channel drained
//     by a Node goroutine, so Apply never blocks on the dataplane.
//   - The dataplane's proposals (binds, touches) go through a bounded,
//     non-blocking batcher that packs many into one entry and counts what it
//     drops.
//   - Expiry and health transitions are decided by the leader alone and
//     committed as entries; an expiry deletes an entry only if it was not
//     refreshed after the leader judged it idle.
//   - A node restarted on the same data directory comes back with every
//     committed service and affinity (snapshot plus log replay).
//   - A node with Raft state never bootstraps. Nodes sharing one
//     configuration (one join list, BootstrapExpect N) bootstrap one
//     cluster once N voting members without state see each other, and a
//     node that finds a member with state waits to be added instead.
//     Every node keeps re-joining listed gossip addresses that are not
//     alive members, so a restarted or healed node is not left alone.
//   - Membership is reconciled into the Raft configuration by the leader
//     alone, idempotently, on gossip events and on a timer; it never removes
//     itself nor more than (voters-1)/2 voters at once (DESIGN.md).
//   - A follower forwards its proposals and admin writes to the leader; a
//     node without a leader keeps serving from its committed table and
//     reports itself degraded.
//
// Node runs one member (Raft, gossip via package membership, the batcher
// and the leader loop); AdminServer implements ikelb.v1.AdminService on it,
// ClusterServer the node-to-node ikelb.v1.ClusterService; Collector exports
// its metrics to Prometheus. See DESIGN.md.
package cluster
