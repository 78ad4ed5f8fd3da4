// Package lswan runs a real libreswan IKEv2 responder (pluto) inside a
// namespace of a netns.Lab, for end-to-end tests of the balancer against a
// second IKEv2 implementation besides strongSwan.
//
// libreswan is not installed: its Debian package conflicts with strongSwan,
// which the other end-to-end tests need. install.sh (beside this file) unpacks
// libreswan, the NSS tools and the libraries missing from the machine into a
// private tree (Root, default /var/cache/ikelb-libreswan); pluto runs from
// there with LD_LIBRARY_PATH pointing into the tree, and with the tree's
// usr/libexec bind-mounted over /usr/libexec in pluto's private mount
// namespace, because pluto starts its connection loader at the fixed path
// /usr/libexec/ipsec/addconn. Require finds the tree; under CI=true it runs
// install.sh when the tree is missing and fails the test if that does not
// help, otherwise it skips.
//
// Each pluto is isolated like the strongSwan peers of package swan: its own
// ipsec.conf, secrets file and NSS database in a directory of the Lab, and a
// private /run holding its pid file and its whack control socket, which the
// test process reaches through pluto's own mount namespace
// (/proc/PID/root/run/pluto.ctl: Whack), because a Lab directory can be too
// long for a socket address. pluto logs to stderr, which the Lab keeps and
// prints when the test fails.
//
// The responder authenticates with an RSA certificate issued by a swan.CA
// (imported into NSS through a PKCS#12 file made with openssl) and accepts
// any initiator with a certificate from the same CA, so a swan initiator
// connects to it unchanged; it answers the initiator's virtual IP request
// from an address pool.
//
// Limitation, inherent to this machine: libreswan has no userspace ESP and
// the kernel has no ESP (CONFIG_INET_ESP unset), so pluto cannot install a
// CHILD SA. It negotiates one, fails to install it (the kernel answers
// XFRM_MSG_NEWSA with an error) and answers IKE_AUTH with its AUTH payload and
// an error notify instead of the CHILD SA; the IKE SA is established on both
// sides, the CHILD SA on neither. Tests with this package prove IKE (both
// exchanges, NAT-T, fragmentation, the peer address pluto sees), not the
// data path. On a kernel with ESP the CHILD SA would come up.
package lswan
