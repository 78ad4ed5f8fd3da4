// Package swan runs real strongSwan IKEv2 peers (charon) inside the network
// namespaces of a netns.Lab, for end-to-end tests of the balancer.
//
// A CA (NewCA) issues throw-away RSA certificates with strongSwan's `pki`.
// Key generation is the slow part (about 2.5 s per 4096-bit key here), so the
// CA and the keys are cached in memory for the life of the test binary and
// reused by later tests; only certificates are issued anew. Nothing is cached
// on disk outside the tests' temporary directories.
//
// StartResponder and StartInitiator start one charon each, in a namespace of
// their own, isolated from every other charon: a private /run (for its fixed
// pid file), its own strongswan.conf (STRONGSWAN_CONF), swanctl directory
// (SWANCTL_DIR) and vici socket. With no kernel ESP here, charon carries ESP in
// userspace (kernel-libipsec: a TUN device, ESP always in UDP), so a ping
// through the tunnel (Ping) proves the data path end to end. charon logs to
// stderr, which the Lab keeps in a file and prints when the test fails.
//
// A responder authenticates with its certificate, hands out virtual IPs from a
// pool and serves an inner address on a dummy interface; an initiator
// connects to any address (a responder, or a balancer's VIP in front of
// several responders), requests a virtual IP, and reaches the responders'
// inner network through the tunnel. Both sides allow IKE fragmentation.
//
// kernel-libipsec fakes NAT detection (ESP must be in UDP), so IKE always
// moves to UDP 4500 for IKE_AUTH, with or without a NAT on the path; the
// responder's SA shows nat-remote either way, so tests prove a NAT by the
// address the responder sees (IKESA.Remote), not by that flag.
//
// Charon methods that talk to the daemon run `swanctl --uri unix://…` from
// the test process; the vici socket is a file and needs no namespace.
package swan
