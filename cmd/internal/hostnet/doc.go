// Package hostnet sets up, reconciles and removes ikelbd's own part of the
// host for transparent-mode services: the nftables table that diverts the
// backends' replies to the dataplane's TPROXY reply sockets, and the
// policy routing that delivers those diverted packets locally.
//
// What it installs (defaults in Config):
//
//	table inet ikelb {
//	    set backends4 { type ipv4_addr . inet_service; elements = { BACKEND . PORT, … } }
//	    set backends6 { type ipv6_addr . inet_service; … }
//	    chain prerouting {
//	        type filter hook prerouting priority mangle; policy accept;
//	        meta nfproto ipv4 meta l4proto udp fib daddr type != local ip saddr . udp sport @backends4 meta mark set MARK tproxy ip to :PORT4 accept
//	        meta nfproto ipv6 meta l4proto udp fib daddr type != local ip6 saddr . udp sport @backends6 meta mark set MARK tproxy ip6 to :PORT6 accept
//	    }
//	}
//	ip rule add fwmark MARK lookup TABLE priority PRIO    (IPv4 and IPv6)
//	ip route add local 0.0.0.0/0 dev lo table TABLE        (and local ::/0)
//
// Guarantees:
//
//   - Apply is idempotent and atomic for nftables (the table is deleted and
//     recreated in one netlink transaction), so a stale table left by a
//     SIGKILLed run is replaced, and reconciling after a service change
//     leaves exactly the rules of the new set. Rules and routes are compared
//     and only the missing or extra ones are changed.
//   - Nothing is touched (and no privilege is needed) while no transparent
//     service exists, except that the first Apply removes a stale setup.
//   - Remove deletes everything this package installs; Close calls it.
//   - Errors are wrapped; a missing privilege is reported as ErrPermission
//     ("transparent mode needs CAP_NET_ADMIN: …").
//
// FastPath is the kernel fast path for nat-mode and (IPv4) transparent-mode
// services (WrapFast wires it in): it owns the tables "ip ikelb_fast" and
// "ip6 ikelb_fast" (apart from Manager's, which Apply replaces wholesale),
// and keeps per nat service
//
//	map aff_ID { client → backend }   exactly the committed affinities whose backend is Usable; a counter per element
//	nat prerouting:  ip daddr VIP udp dport @ports_ID dnat to ip saddr map @aff_ID
//	nat postrouting: ct status dnat ct original ip daddr VIP ct original proto-dst @ports_ID masquerade (or snat to SNAT)
//
// Both are consulted once per conntrack entry: no rule of ikelb's sees a
// nat client's later packets. A client not in the map gets a conntrack
// entry to the userspace listener; once its binding is in the map, the
// engine's listener hands the flow over (FastPath.Handover, conntrack_linux.go:
// that entry is deleted by its reply tuple) and the next datagram takes
// the DNAT rule. The nat clients' packet counts and activity (touches)
// come from conntrack dumps with per-entry accounting, which the fast
// path turns on (net.netfilter.nf_conntrack_acct=1): at most every 5 s
// for the counters, every second when touches are due.
//
// or, unless FastPathConfig.ConntrackNAT, for IPv4 nat services where the ingress stage below is
// active, a stateless NAT of each flow the engine hands over, at netdev
// ingress both ways with the flow socket's own address and port
// (natingress_linux.go); their aff_ID then holds only the clients the
// engine had no flow for (its flow limit), and the listener's datagrams
// are untracked, so such a client is DNATed at its next datagram once
// in aff_ID, with no conntrack entry to delete:
//
//	set bk_ID { every backend of the VIP's family, whatever its state }
//	raw prerouting: ip daddr VIP udp dport @ports_ID ip saddr != @aff_ID ip saddr != @bk_ID notrack
//	raw output:     ip saddr VIP udp sport @ports_ID notrack
//
// and per transparent service (stateless: no conntrack, so any node
// carries any packet; the same map maintenance):
//
//	set bk_ID { every backend of the VIP's family, whatever its state }
//	raw prerouting:  ip daddr VIP udp dport @ports_ID ip daddr set ip saddr map @aff_ID notrack counter fwd_ID accept
//	raw prerouting:  ip saddr @bk_ID udp sport @ports_ID fib daddr type != local notrack
//	forward:         ip saddr @bk_ID udp sport @ports_ID ct state untracked counter rep_ID ip saddr set VIP
//
// and, when the host has an Ethernet-like interface and a unicast route to
// a usable backend, an ingress stage in table "netdev ikelb_fast" that
// forwards those requests before the IP stack (ingress_linux.go; what it
// does not take, the raw rewrite above forwards):
//
//	chain in_DEV (per interface): ip daddr VIP udp dport @ports_ID meta pkttype host ip frag-off & 0x3fff == 0 ip ttl > 1 meta length <= MTU
//	                               ip daddr set ip saddr map @aff_ID counter in_ID fwd ip to ip daddr map @nhop device ip daddr map @odev
//
// Dataplane leaves a transparent service out of Manager's TPROXY rule once
// the fast path has installed these rules for it (TPROXY at mangle
// priority would divert the replies before forward), and puts it back if
// they go.
//
// Guarantees: it never blocks the table's writer (changes reach it through
// a bounded dataplane.ChangeQueue; an overflow or Reset resyncs from Range);
// changes are applied in one nft transaction per batch (BatchDelay or
// BatchMax); a client whose backend leaves the map (removed, re-bound, no
// longer Usable) also loses its conntrack entries to the VIP, so its next
// packet goes to userspace (or the new backend); an install forgets every
// conntrack entry to the nat VIPs (stale ones from a previous run or rule
// set would otherwise keep deciding their clients); clients the kernel
// forwards are touched (Proposer) every min(Timeout/4, 30 s), read from
// their elements' counters for transparent services (the lookup bumps
// them: no per-packet set update) and from conntrack for nat ones; Close
// removes the tables. Why the rules look like this: dataplane/DESIGN.md
// "Kernel fast path".
//
// Dataplane wraps a *dataplane.Engine so that every committed service set
// the cluster hands to the engine also reconciles the host.
package hostnet
