// Package topo builds the network shapes the cluster end-to-end tests run
// ikelbd nodes in, out of the namespaces of a netns.Lab: an HA pair behind
// VRRP (NewVRRP) and several nodes behind an ECMP router (NewAnycast), each
// with clients (own public addresses, or behind a masquerading NAT), a
// balancer tier and backends on a LAN of their own; and partitions of a
// node from its peers (Isolate, IsolateLinks, Heal).
//
// Both shapes use one address plan (the package's variables): clients on
// 203.0.113.0/24 behind the router rt (203.0.113.1), NAT clients on
// 192.168.0.0/24 behind 203.0.113.2; the edge LAN 10.0.0.0/24 with the
// router at .1 and node i at .11+i; the backend LAN 10.1.0.0/24 with node i
// at .11+i and backend i at .21+i. Every node's edge interface is eth0
// (EdgeIf), its backend interface back0 (BackIf); the cluster's own traffic
// (Raft, memberlist, VRRP) uses the edge addresses.
//
// Guarantees:
//   - Nothing runs or changes outside the Lab's namespaces: keepalived runs
//     per node with its own configuration, pid files in a private /run and
//     no syslog; every process is the Lab's, killed at cleanup.
//   - The configuration the shapes run is also available as text
//     (Keepalived.Conf, VRRP.KeepalivedConf, RouterSetup), so
//     documentation can be checked against what the tests prove.
//   - The shapes do not turn on IP forwarding or install rules in balancer
//     nodes: that belongs to the balancer under test. They turn off
//     reverse-path filtering there, since replies take other paths than
//     requests by design.
//
// Helpers that change the topology call t.Fatal on error and must be
// called from the test goroutine; Master and Holders return errors.
//
// The tests prove each shape without ikelbd, with small UDP responders
// started in the namespaces: which node holds the VIP, how long a failover
// takes (keepalived killed, track script failing), how the router's hash
// spreads the 500 and 4500 halves of clients, and that a partition cuts a
// node off from its peers only.
package topo
