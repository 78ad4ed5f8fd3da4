// Package membership finds the other ikelb nodes with gossip
// (hashicorp/memberlist, SWIM with Lifeguard) and tells the Raft leader who
// is alive, failed or gone, so that it can reconcile members into Raft
// voters (see DESIGN.md).
//
// Each member advertises a small Meta — its Raft and admin addresses, its
// role (voter or witness) and version — validated against memberlist's
// 512-byte limit. Gossip can be encrypted with a shared AES key; a member
// with another key cannot join.
//
// Guarantees:
//   - memberlist is never blocked by this package: its callbacks update a
//     map under a short lock and send events without blocking. An event that
//     does not fit in the Events channel is dropped and counted; Members()
//     is always current, so a consumer that also reconciles on a timer
//     repairs every drop.
//   - Members() includes this member and reports failed and left members
//     (for a day, or until they return), distinguishing a graceful Leave
//     from a failure, which is what autopilot's NodeStatus needs.
//   - Events arrive in the order memberlist observed them. Every
//     goroutine this package starts is waited for by Shutdown, which closes
//     the Events channel.
//   - memberlist's log lines are bridged into the injected slog.Logger at
//     their own level, with component=memberlist.
//
// The default Tunables declare a silent (SIGKILLed) member failed in about
// one second on a LAN (measured 0.8–1.0 s with three members, against 5.8 s
// with memberlist's LAN profile); Tunables documents the trade-off.
package membership
