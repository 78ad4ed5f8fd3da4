// Package test holds ikelb's test tooling and the tests that run whole
// programs: ikesim (simulated IKEv2 clients and responders), netns (network
// namespace labs), swan (real strongSwan peers), e2e (ikelbd processes driven
// over gRPC, in namespaces with real peers) and bench (the benchmark harness).
//
// Only ikesim is imported outside test/: `ikelbd demo` runs its simulated
// clients and stand-in servers.
package test
