// Package loadgen generates and receives the benchmark's traffic: ESP-in-UDP
// datagrams (RFC 3948: a non-zero 4-byte SPI first, then payload) from many
// simulated clients to one destination, and a sink that counts what reaches
// the backends.
//
// Send opens one UDP socket per client, each bound to its own source address
// (the client namespace makes a whole /16 local with an AnyIP route, so no
// per-address setup is needed), and writes batches with sendmmsg
// (x/net/ipv4 WriteBatch). It runs open-loop at the maximum rate or paced to
// a packet rate, and always stops after Duration or MaxPackets, whichever
// comes first. Optionally a few probe clients send timestamped probes that
// the Sink echoes; Send reports their round-trip times. When the Sink's
// timestamps are on (CmdTimestamps) it also reports each way on its own,
// from a send call to the kernel's receive timestamp (SO_TIMESTAMPNS) at
// the other end, and their sum, the network round trip: the round trip
// without the time the probe waited in the sink's socket and process, and
// for the prober's reader to wake up. All ends read one clock: they run on
// one machine.
//
// Sink reads with recvmmsg (x/net/ipv4 ReadBatch), counts datagrams and bytes
// once per batch, and echoes probes (and only probes) to their source. Its
// counters can be read and reset over a Unix socket (ServeControl, Query), so
// a harness in another network namespace can drive it: Unix sockets named by
// path are not bound to a network namespace.
//
// Guarantees: a datagram counts as received only if it is at least
// HeaderLen bytes and carries the payload layout below; anything else is
// counted as Bad. Nothing is logged per packet.
//
// Payload layout (all big-endian):
//
//	[0:4]   ESP SPI, non-zero, unique per client
//	[4]     kind: KindLoad or KindProbe
//	[5:8]   zero
//	[8:16]  sequence number (per sender)
//	[16:24] probe send time, Unix ns (probes only)
//	[24:32] probe's kernel receive time at the sink, Unix ns \ written by the Sink
//	[32:40] the echo's send time at the sink, Unix ns        / when its timestamps are on
package loadgen
