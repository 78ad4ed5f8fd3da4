//go:build linux

package bench

import (
	"fmt"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// flushConntrack deletes every IPv4 conntrack entry in the balancer's
// namespace, so that no target inherits the previous one's, and returns
// how many there were. A UDP entry outlives the target that made it by
// up to 120 s and keeps deciding its flow: an entry to ikelbd's listener,
// gone with ikelbd, sends a later target's datagrams to no socket instead
// of through its DNAT rule.
func flushConntrack(env *Env) (int, error) {
	ns, err := vnetns.GetFromName(env.Balancer.Name())
	if err != nil {
		return 0, fmt.Errorf("balancer namespace: %w", err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return 0, fmt.Errorf("netlink in the balancer namespace: %w", err)
	}
	defer h.Close()
	flows, err := h.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
	if err != nil {
		return 0, fmt.Errorf("list conntrack: %w", err)
	}
	if len(flows) == 0 {
		return 0, nil
	}
	if err := h.ConntrackTableFlush(netlink.ConntrackTable); err != nil {
		return 0, fmt.Errorf("flush conntrack: %w", err)
	}
	return len(flows), nil
}
