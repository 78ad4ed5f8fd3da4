package topo

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Keepalived is the configuration of one keepalived (VRRP only) on one
// balancer node of an HA pair. Conf renders it; the VRRP shape runs exactly
// that text, so the README's example can be checked against Conf.
//
// The choices, and why:
//   - VRRP version 3, so advert_int can be below a second. With the
//     default 0.2 s a backup declares the master dead after 3 adverts plus
//     a skew of (256-priority)/256 adverts: about 0.7 s after the master
//     stops sending (keepalived killed, host dead, link cut).
//   - Unicast adverts to the peer's own address (unicast_src_ip,
//     unicast_peer): no multicast needed on the LAN, and a partition made
//     with address-based drop rules cuts VRRP like any other traffic.
//   - Both nodes start in BACKUP with nopreempt: whichever node holds the
//     VIP keeps it until it fails. A node that comes back (restarted
//     ikelbd, rebooted host) does not take the VIP back, which would cost
//     a second traffic gap for nothing: every ikelb node forwards every
//     client the same way, from the replicated table. Priorities still
//     break the tie when both start together (and after a split brain).
//   - The track script (ikelbctl --addr ADMIN check ready) has no weight:
//     when it fails `fall` times in a row the instance goes to FAULT,
//     drops the VIP at once and sends a priority-0 advert, so the peer
//     takes over within one advert interval; detection takes fall ×
//     interval (2 × 1 s by default). It must succeed `rise` times before
//     the node can become master again.
//   - The backend-side gateway address is a second virtual address of the
//     same instance, so it always moves with the VIP. Backends use it as
//     their default gateway (transparent mode: replies come back through
//     whichever node holds the VIP); in nat mode it is the floating source
//     address the backends see, the same from either node.
//   - The master repeats a gratuitous ARP for each address every second
//     (vrrp_garp_master_refresh 1), and at once when it hears a master of
//     lower priority (vrrp_garp_lower_prio_repeat). Measured here: after a
//     healed split brain (both nodes master while cut off) the node with
//     the lower priority steps down, but the router's ARP entry still
//     names it, as it announced itself last; without the refresh the
//     router kept sending to it until keepalived's second burst of
//     gratuitous ARP 5 s after the takeover (or, later, until the entry
//     expired).
//   - enable_script_security: keepalived runs the track script only if the
//     script and every directory on its path are writable by root alone
//     (it logs the script as unsafe and ignores it otherwise).
//   - Every address is /32: each node has its own primary address in both
//     subnets, so adding or removing the floating ones changes no route.
type Keepalived struct {
	// RouterID names the node in keepalived's logs (router_id).
	RouterID string
	// Interface carries the VIP and the adverts.
	Interface string
	// VirtualRouterID is the VRRP VRID (1..255), the same on both nodes.
	VirtualRouterID int
	// Priority (1..254) breaks the tie at election; higher wins.
	Priority int
	// AdvertInterval is advert_int (10 ms steps with VRRP v3).
	AdvertInterval time.Duration
	// Src is the node's own address on Interface (unicast_src_ip).
	Src netip.Addr
	// Peers are the other VRRP nodes' addresses (unicast_peer).
	Peers []netip.Addr
	// VIP is the virtual address clients send to.
	VIP netip.Addr
	// Gateway is the floating backend-side address; invalid for none.
	Gateway netip.Addr
	// GatewayInterface is the interface that carries Gateway.
	GatewayInterface string
	// TrackScript is the command whose exit status says whether this node
	// can serve; "" for none. keepalived splits it on spaces.
	TrackScript string
	// TrackFile is a file holding 0 while this node can serve and
	// anything else when it cannot (`ikelbctl check ready --track-file`
	// keeps it); "" for none. keepalived re-reads it on every change
	// (inotify), so a watcher that sees ikelbd die moves the VIP at once,
	// instead of after the track script's fall × interval. Both may be
	// set: the script then notices a dead watcher.
	TrackFile string
	// TrackInterval, TrackFall and TrackRise tune the track script.
	TrackInterval time.Duration
	TrackFall     int
	TrackRise     int
}

// Defaults of Keepalived and VRRPConfig.
const (
	DefaultAdvertInterval  = 200 * time.Millisecond
	DefaultTrackInterval   = time.Second
	DefaultTrackFall       = 2
	DefaultTrackRise       = 2
	DefaultVirtualRouterID = 51
)

// seconds formats d as keepalived wants it: decimal seconds.
func seconds(d time.Duration) string {
	return strconv.FormatFloat(d.Seconds(), 'f', -1, 64)
}

// Conf returns the keepalived.conf text. Zero fields take their defaults.
func (k Keepalived) Conf() string {
	if k.AdvertInterval == 0 {
		k.AdvertInterval = DefaultAdvertInterval
	}
	if k.TrackInterval == 0 {
		k.TrackInterval = DefaultTrackInterval
	}
	if k.TrackFall == 0 {
		k.TrackFall = DefaultTrackFall
	}
	if k.TrackRise == 0 {
		k.TrackRise = DefaultTrackRise
	}
	if k.VirtualRouterID == 0 {
		k.VirtualRouterID = DefaultVirtualRouterID
	}
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	w("# keepalived.conf for ikelb node %s: VRRP v3, unicast, nopreempt.", k.RouterID)
	w("global_defs {")
	w("\trouter_id %s", k.RouterID)
	w("\tscript_user root")
	w("\tenable_script_security")
	w("\t# The master repeats one gratuitous ARP per address every second, so")
	w("\t# no neighbour keeps a stale entry for long (e.g. after a healed split")
	w("\t# brain, when the node that steps down was the last to announce).")
	w("\tvrrp_garp_master_refresh 1")
	w("\tvrrp_garp_master_refresh_repeat 1")
	w("\tvrrp_garp_lower_prio_repeat 1")
	w("}")
	if k.TrackScript != "" {
		w("")
		w("# Exit status 0 while this node can serve; fails => FAULT => VIP released.")
		w("vrrp_script ikelb_ready {")
		w("\tscript %q", k.TrackScript)
		w("\tinterval %s", seconds(k.TrackInterval))
		w("\ttimeout %s", seconds(k.TrackInterval))
		w("\tfall %d", k.TrackFall)
		w("\trise %d", k.TrackRise)
		w("}")
	}
	if k.TrackFile != "" {
		w("")
		w("# 0 while this node can serve, kept by `ikelbctl check ready --track-file`;")
		w("# anything else (1) => FAULT at once. Not ready until the watcher says so.")
		w("track_file ikelb_ready_file {")
		w("\tfile %q", k.TrackFile)
		w("\tweight 0")
		w("\tinit_file 1")
		w("}")
	}
	w("")
	w("vrrp_instance ikelb {")
	w("\tstate BACKUP")
	w("\tnopreempt")
	w("\tinterface %s", k.Interface)
	w("\tvirtual_router_id %d", k.VirtualRouterID)
	w("\tversion 3")
	w("\tpriority %d", k.Priority)
	w("\tadvert_int %s", seconds(k.AdvertInterval))
	w("\tunicast_src_ip %s", k.Src)
	w("\tunicast_peer {")
	for _, p := range k.Peers {
		w("\t\t%s", p)
	}
	w("\t}")
	w("\tvirtual_ipaddress {")
	w("\t\t%s/32 dev %s", k.VIP, k.Interface)
	if k.Gateway.IsValid() {
		w("\t\t%s/32 dev %s", k.Gateway, k.GatewayInterface)
	}
	w("\t}")
	if k.TrackScript != "" {
		w("\ttrack_script {")
		w("\t\tikelb_ready")
		w("\t}")
	}
	if k.TrackFile != "" {
		w("\ttrack_file {")
		w("\t\tikelb_ready_file")
		w("\t}")
	}
	w("}")
	return b.String()
}
