// Package health checks backend VPN servers and reports when their health
// changes.
//
// Two probes exist: an ICMP echo (what the appliances use by default) and an
// IKEv2 IKE_SA_INIT request to the backend's IKE port, which proves the IKE
// daemon itself answers; any well-formed IKEv2 response to our SPI counts,
// including an error notify such as NO_PROPOSAL_CHOSEN.
//
// A Checker runs one goroutine per target; that goroutine alone owns the
// target's state. Results pass through rise/fall hysteresis (Rise
// consecutive successes to go up, Fall consecutive failures to go down) and
// only transitions are reported: unknown→up, unknown→down, up→down, down→up.
// The transition callback is never called with a lock held, never after
// Close returns, and must not block.
//
// The package imports only the standard library, golang.org/x/net and
// dataplane (for its Health type); it knows nothing of raft or gRPC.
package health
