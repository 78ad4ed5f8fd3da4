// Package dataplane is the packet path of ikelb: it receives clients' UDP
// datagrams on each service's VIP:ports (IKE on 500, NAT-T on 4500, or any
// port), sends each client to the backend its affinity names, and relays the
// backends' replies back to the client from the same VIP:port.
//
// Guarantees:
//
//   - Affinity is per client IP across all ports of a service: the 500 and
//     4500 halves of an IKEv2 client, arriving from different source ports,
//     reach the same backend. A committed binding in the Table is followed
//     while its backend is in the service and Usable; otherwise Pick, a
//     deterministic weighted rendezvous hash of the backends' addresses and
//     the client key, chooses, so every node chooses the same backend before
//     the binding has replicated.
//   - The dataplane never waits for the replicated state. It reads committed
//     affinity with Table.Lookup (lock-free, allocation-free) and asks for
//     changes with Proposer.Propose (non-blocking): a bind when it chooses, a
//     touch at most once per min(Timeout/4, 30 s) per client flow.
//   - Every datagram is forwarded whatever it holds (IKE, IKE fragments, ESP
//     in UDP, keepalives, garbage, empty); classification (Classify) only
//     feeds counters and never panics. Datagrams are dropped only when no
//     backend can take the client, an upstream socket cannot be opened or the
//     flow limit is reached, the kernel refuses a send, or a datagram exceeds
//     Config.MaxDatagram; each drop is counted by reason.
//   - Handling a datagram is a pure function (decide) and, once a client's
//     flow exists, the read-decide-forward-reply path does not allocate. On
//     Linux reads and writes are batched with recvmmsg/sendmmsg; counters
//     are atomics bumped once per batch.
//   - Forwarding mode nat: each client flow (client addr:port, VIP:port) has
//     its own upstream socket connected to backend:same-port, sourced from
//     the service's SNAT address when set; idle flows are closed after the
//     flow timeout. IPv4 and IPv6 VIPs and backends work, mixed too.
//   - Forwarding mode transparent (Linux): the backend receives each
//     datagram from the client's own address and port (raw IP socket,
//     headers built here, fragmented above the route MTU); the backends'
//     replies, diverted to the engine's IP_TRANSPARENT reply socket by the
//     host's TPROXY rule, leave toward the client from the service's
//     VIP:port. The reply path depends only on the committed services (no
//     per-flow state), so any node with the same services carries any
//     reply. On other platforms SetServices refuses such a service
//     (ErrTransparent).
//   - Listeners bind with IP_FREEBIND, so a node may listen on a VIP it does
//     not hold yet (VRRP backup).
//   - Engine.Close stops and waits for every goroutine it started.
//
// The package depends only on the standard library and golang.org/x/sys and
// golang.org/x/net (deps_test.go enforces it); the cluster package drives it
// through Table, Proposer and Engine.SetServices. DESIGN.md gives the reasons
// for the table layout, the key layout, the hash and the flow design.
package dataplane
