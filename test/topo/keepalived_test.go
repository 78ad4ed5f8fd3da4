package topo

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestKeepalivedConf(t *testing.T) {
	k := Keepalived{
		RouterID: "lb1", Interface: "eth0", Priority: 100,
		Src:   netip.MustParseAddr("10.0.0.11"),
		Peers: []netip.Addr{netip.MustParseAddr("10.0.0.12")},
		VIP:   netip.MustParseAddr("10.0.0.100"), Gateway: netip.MustParseAddr("10.1.0.1"), GatewayInterface: "back0",
		TrackScript: "/usr/local/bin/ikelbctl --addr 10.0.0.11:7450 check ready",
		TrackFile:   "/run/ikelb/ready",
	}
	conf := k.Conf()
	for _, want := range []string{
		"router_id lb1",
		"script \"/usr/local/bin/ikelbctl --addr 10.0.0.11:7450 check ready\"",
		"interval 1\n", "fall 2\n", "rise 2\n",
		"state BACKUP\n\tnopreempt",
		"version 3", "advert_int 0.2\n", "priority 100\n", "virtual_router_id 51\n",
		"unicast_src_ip 10.0.0.11", "unicast_peer {\n\t\t10.0.0.12\n\t}",
		"10.0.0.100/32 dev eth0", "10.1.0.1/32 dev back0",
		"track_script {\n\t\tikelb_ready\n\t}",
		"track_file ikelb_ready_file {\n\tfile \"/run/ikelb/ready\"\n\tweight 0\n\tinit_file 1\n}",
		"track_file {\n\t\tikelb_ready_file\n\t}",
	} {
		if !strings.Contains(conf, want) {
			t.Errorf("conf lacks %q:\n%s", want, conf)
		}
	}
	if strings.Count(conf, "{") != strings.Count(conf, "}") {
		t.Errorf("unbalanced braces:\n%s", conf)
	}

	k.TrackScript, k.TrackFile, k.Gateway = "", "", netip.Addr{}
	k.AdvertInterval = 500 * time.Millisecond
	conf = k.Conf()
	for _, absent := range []string{"vrrp_script", "track_script", "track_file", "back0"} {
		if strings.Contains(conf, absent) {
			t.Errorf("conf without track script and gateway has %q:\n%s", absent, conf)
		}
	}
	if !strings.Contains(conf, "advert_int 0.5\n") {
		t.Errorf("advert_int 0.5 missing:\n%s", conf)
	}
}

func TestRouterSetup(t *testing.T) {
	a := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	got := RouterSetup(a("192.0.2.10"),
		[]netip.Addr{a("10.0.0.11"), a("10.0.0.12"), a("10.0.0.13")},
		[]netip.Addr{a("10.1.0.11"), a("10.1.0.12"), a("10.1.0.13")})
	for _, want := range []string{
		"sysctl -w net.ipv4.fib_multipath_hash_policy=1\n",
		"ip route replace 192.0.2.10/32 nexthop via 10.0.0.11 nexthop via 10.0.0.12 nexthop via 10.0.0.13\n",
		"ip addr add 192.0.2.10/32 dev lo\n",
		"ip route replace default nexthop via 10.1.0.11 nexthop via 10.1.0.12 nexthop via 10.1.0.13\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("RouterSetup lacks %q:\n%s", want, got)
		}
	}
}
