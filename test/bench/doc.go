// Package bench is ikelb's benchmark harness: it builds a client → balancer →
// backends topology out of network namespaces (test/netns), puts a balancer
// "target" in the middle — plain routing, nftables DNAT, nginx's stream
// proxy, or ikelbd in nat or transparent mode — drives ESP-in-UDP load
// through it with the loadgen helper, counts at the backends, and reports
// packets per second, throughput and added round-trip latency side by side,
// as ratios to the kernel (nftables) and nginx measured in the same run.
//
// Guarantees:
//   - All traffic stays inside the namespaces the Lab made; no namespace is
//     linked to the root namespace. Every process runs under the Lab and is
//     killed, and every namespace deleted, when the test ends.
//   - Every run is bounded in time (and the helpers by a lifetime), so the
//     suite stops by itself.
//   - A target that cannot start (ikelbd does not build, exits, or never
//     forwards a probe) is reported as "not available: reason"; the others
//     are still measured.
//   - The load generator and sinks run on one CPU and the balancer (its
//     process, and the kernel's receive processing in its namespace, steered
//     there with RPS) on another, where the machine has two.
//
// Helper processes (load generator, sinks, readiness probe) are the test
// binary itself, started inside a namespace with HelperEnv set; TestMain
// calls HelperMain first. See README.md for the command and the table.
package bench
