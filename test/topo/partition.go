package topo

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/ikelb/ikelb/test/netns"
)

// partitionTable is the nft table Isolate and IsolateLinks own inside a
// namespace; Heal deletes it. Its hooks run at priority -400, before
// conntrack and before any table the balancer itself may install.
const partitionTable = "topo_partition"

// Isolate cuts ns off from peers: every IPv4 packet from one of the peer
// addresses is dropped on the way in (prerouting) and every packet to one
// on the way out (output), on every interface but loopback. Traffic with
// anyone else (clients, backends, the router) flows as before, so a
// partitioned balancer can still forward the clients that reach it — the
// partition of a cluster network, not a dead host. Calling it again
// replaces the peer set. It fails the test on error.
func Isolate(ns *netns.NS, peers ...netip.Addr) {
	ns.Lab().TB().Helper()
	if len(peers) == 0 {
		ns.Lab().TB().Fatalf("topo: isolate %s: no peers", ns.Name())
	}
	elems := make([]string, len(peers))
	for i, p := range peers {
		elems[i] = p.String()
	}
	ns.NFT(resetPartition() + fmt.Sprintf(`table inet %[1]s {
	set peers {
		type ipv4_addr
		elements = { %[2]s }
	}
	chain prerouting {
		type filter hook prerouting priority -400; policy accept;
		iifname "lo" accept
		ip saddr @peers counter drop
	}
	chain output {
		type filter hook output priority -400; policy accept;
		oifname "lo" accept
		ip daddr @peers counter drop
	}
}
`, partitionTable, strings.Join(elems, ", ")))
}

// IsolateLinks cuts the interfaces ifnames of ns off entirely: everything
// in and out of them is dropped, whoever the peer (loopback is never
// touched). Use it to emulate a pulled cable; Isolate is the cluster
// partition. Heal undoes it.
func IsolateLinks(ns *netns.NS, ifnames ...string) {
	ns.Lab().TB().Helper()
	if len(ifnames) == 0 {
		ns.Lab().TB().Fatalf("topo: isolate links of %s: no interfaces", ns.Name())
	}
	q := make([]string, len(ifnames))
	for i, n := range ifnames {
		if n == "lo" {
			ns.Lab().TB().Fatalf("topo: isolate links of %s: not lo", ns.Name())
		}
		q[i] = fmt.Sprintf("%q", n)
	}
	set := strings.Join(q, ", ")
	ns.NFT(resetPartition() + fmt.Sprintf(`table inet %[1]s {
	chain prerouting {
		type filter hook prerouting priority -400; policy accept;
		iifname { %[2]s } counter drop
	}
	chain output {
		type filter hook output priority -400; policy accept;
		oifname { %[2]s } counter drop
	}
	chain forward {
		type filter hook forward priority -400; policy accept;
		oifname { %[2]s } counter drop
	}
}
`, partitionTable, set))
}

// Heal removes what Isolate or IsolateLinks installed in ns; healing a
// namespace that is not isolated is a no-op.
func Heal(ns *netns.NS) {
	ns.Lab().TB().Helper()
	ns.NFT(resetPartition())
}

// resetPartition returns nft commands that delete the partition table
// whether or not it exists (nft 1.0.6 has no `destroy`).
func resetPartition() string {
	return fmt.Sprintf("add table inet %[1]s\ndelete table inet %[1]s\n", partitionTable)
}
