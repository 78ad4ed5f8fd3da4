package topo_test

import (
	"fmt"
	"net/netip"

	"github.com/ikelb/ikelb/test/topo"
)

// The keepalived.conf of lb1 in the VRRP shape (lb2's differs in
// router_id, priority 90 and the two unicast addresses swapped).
func ExampleKeepalived_Conf() {
	k := topo.Keepalived{
		RouterID:         "lb1",
		Interface:        "eth0",
		Priority:         100,
		Src:              netip.MustParseAddr("10.0.0.11"),
		Peers:            []netip.Addr{netip.MustParseAddr("10.0.0.12")},
		VIP:              topo.VRRPVIP,
		Gateway:          topo.VRRPGateway,
		GatewayInterface: "back0",
		TrackScript:      "/usr/bin/ikelbctl --addr 127.0.0.1:7450 check ready",
		TrackFile:        "/run/ikelb/ready",
	}
	fmt.Print(k.Conf())
	// Output:
	// # keepalived.conf for ikelb node lb1: VRRP v3, unicast, nopreempt.
	// global_defs {
	// 	router_id lb1
	// 	script_user root
	// 	enable_script_security
	// 	# The master repeats one gratuitous ARP per address every second, so
	// 	# no neighbour keeps a stale entry for long (e.g. after a healed split
	// 	# brain, when the node that steps down was the last to announce).
	// 	vrrp_garp_master_refresh 1
	// 	vrrp_garp_master_refresh_repeat 1
	// 	vrrp_garp_lower_prio_repeat 1
	// }
	//
	// # Exit status 0 while this node can serve; fails => FAULT => VIP released.
	// vrrp_script ikelb_ready {
	// 	script "/usr/bin/ikelbctl --addr 127.0.0.1:7450 check ready"
	// 	interval 1
	// 	timeout 1
	// 	fall 2
	// 	rise 2
	// }
	//
	// # 0 while this node can serve, kept by `ikelbctl check ready --track-file`;
	// # anything else (1) => FAULT at once. Not ready until the watcher says so.
	// track_file ikelb_ready_file {
	// 	file "/run/ikelb/ready"
	// 	weight 0
	// 	init_file 1
	// }
	//
	// vrrp_instance ikelb {
	// 	state BACKUP
	// 	nopreempt
	// 	interface eth0
	// 	virtual_router_id 51
	// 	version 3
	// 	priority 100
	// 	advert_int 0.2
	// 	unicast_src_ip 10.0.0.11
	// 	unicast_peer {
	// 		10.0.0.12
	// 	}
	// 	virtual_ipaddress {
	// 		10.0.0.100/32 dev eth0
	// 		10.1.0.1/32 dev back0
	// 	}
	// 	track_script {
	// 		ikelb_ready
	// 	}
	// 	track_file {
	// 		ikelb_ready_file
	// 	}
	// }
}

// What the anycast shape runs in its router, nodes and backends.
func ExampleRouterSetup() {
	a := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	fmt.Print(topo.RouterSetup(topo.AnycastVIP,
		[]netip.Addr{a("10.0.0.11"), a("10.0.0.12"), a("10.0.0.13")},
		[]netip.Addr{a("10.1.0.11"), a("10.1.0.12"), a("10.1.0.13")}))
	// Output:
	// # router: forward, hash on the 5-tuple, one multipath route to the VIP
	// sysctl -w net.ipv4.ip_forward=1
	// sysctl -w net.ipv4.fib_multipath_hash_policy=1
	// ip route replace 192.0.2.10/32 nexthop via 10.0.0.11 nexthop via 10.0.0.12 nexthop via 10.0.0.13
	// # each node: the VIP on loopback
	// ip addr add 192.0.2.10/32 dev lo
	// # each backend (transparent mode): replies to any node
	// sysctl -w net.ipv4.fib_multipath_hash_policy=1
	// ip route replace default nexthop via 10.1.0.11 nexthop via 10.1.0.12 nexthop via 10.1.0.13
}
