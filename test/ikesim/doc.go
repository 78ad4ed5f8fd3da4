// Package ikesim simulates IKEv2 traffic for the demo, integration tests and
// benchmarks, without any cryptography.
//
// A Responder stands in for a VPN server: it answers IKE_SA_INIT on its IKE
// (UDP 500-role) sockets with a well-formed response carrying a fresh
// responder SPI and its name in a Vendor ID payload; on its NAT-T (UDP
// 4500-role) sockets it answers IKE_AUTH behind the non-ESP marker (whole or
// as RFC 7383 fragments) for SAs it created, echoes ESP-in-UDP datagrams and
// optionally NAT-T keepalives, and records which client address and port
// reached which of its sockets, per initiator SPI and per client IP.
// IKE_AUTH for an SA it did not create (the client was split across
// servers) is answered with an INVALID_IKE_SPI notify, as a real responder
// would reject it, with its name so the client can tell where it landed.
//
// A Client plays an initiator behind a NAT: IKE_SA_INIT to VIP:IKEPort, then
// IKE_AUTH from a new source port to VIP:NATTPort, then ESP round trips and
// keepalives, with bounded timeouts and retries. Run drives many clients
// concurrently and reports where each landed on each port.
//
// Everything parses strictly (Parse): header length equal to the datagram,
// a payload chain that ends exactly at the end, SK/SKF last.
package ikesim
