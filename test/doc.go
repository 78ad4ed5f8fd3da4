// Package test holds ikelb's test tooling and the tests that run whole
// programs: ikesim (simulated IKEv2 clients and responders), netns (network
// namespace labs), swan (real strongSwan peers), e2e (ikelbd processes driven
// over gRPC, in namespaces with real peers) and bench (the benchmark harness).
//
// Nothing here is imported by the daemon.
package test
