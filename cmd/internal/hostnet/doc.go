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
// Dataplane wraps a *dataplane.Engine so that every committed service set
// the cluster hands to the engine also reconciles the host.
package hostnet
