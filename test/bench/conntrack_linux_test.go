//go:build linux

package bench

import (
	"net"
	"testing"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TestFlushConntrack: the entries a target leaves in the balancer's
// namespace are gone before the next one starts (withTarget), and only
// there.
func TestFlushConntrack(t *testing.T) {
	env := NewEnv(t, helper(t), 1, CountSocket)
	ns, err := vnetns.GetFromName(env.Balancer.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	// conntrack starts tracking in a namespace once a rule needs it.
	if out, err := env.Balancer.Run("nft", "add table ip ct_test; add chain ip ct_test c { type filter hook prerouting priority 0; ct state new accept; }"); err != nil {
		t.Fatalf("nft: %v %s", err, out)
	}
	for i := range 3 {
		f := &netlink.ConntrackFlow{FamilyType: unix.AF_INET, TimeOut: 120,
			Forward: netlink.IPTuple{SrcIP: net.IPv4(10, 9, 0, byte(1+i)).To4(), DstIP: net.IPv4(10, 9, 1, 1).To4(), Protocol: unix.IPPROTO_UDP, SrcPort: 4500, DstPort: 4500},
			Reverse: netlink.IPTuple{SrcIP: net.IPv4(10, 9, 1, 1).To4(), DstIP: net.IPv4(10, 9, 0, byte(1+i)).To4(), Protocol: unix.IPPROTO_UDP, SrcPort: 4500, DstPort: 4500}}
		if err := h.ConntrackCreate(netlink.ConntrackTable, unix.AF_INET, f); err != nil {
			t.Fatalf("create conntrack entry: %v", err)
		}
	}
	if n, err := flushConntrack(env); err != nil || n != 3 {
		t.Fatalf("flushConntrack = %d, %v; want 3 entries", n, err)
	}
	if n, err := flushConntrack(env); err != nil || n != 0 {
		t.Fatalf("flushConntrack again = %d, %v; want 0", n, err)
	}
}
