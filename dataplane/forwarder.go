package dataplane

import (
	"errors"
	"fmt"
	"net/netip"
	"syscall"
)

// forwarder is one forwarding mode: it opens the upstream socket that
// carries one client flow (client addr:port → VIP:port) to a backend on the
// same port, and on which the backend's replies arrive. The listener does
// the rest: it writes client datagrams to the upstream and sends what the
// upstream reads back to the client from the VIP:port socket.
//
// A transparent flow has no upstream (nil conn): the listener writes its
// datagrams on its raw socket with the client's address as source, and the
// replies arrive on the engine's TPROXY reply socket (transparent.go).
type forwarder interface {
	upstream(sv *serviceView, client, vip netip.AddrPort, backend netip.Addr) (conn, error)
}

// natForwarder sources each flow from the service's SNAT address (or the
// kernel's choice) and one port per client flow: the backend sees one peer
// per client flow.
//
// With an SNAT address — one that moves with the VIP, or that every anycast
// node shares — the port is chosen deterministically from the client flow
// (snatPorts), so that after a failover the node taking over sources the
// same client flow from the same address AND port, and the VPN server sees
// the same peer instead of a new one (DOMAIN.md, "Failover"). Without one
// the address is per node anyway and the kernel picks the port.
type natForwarder struct{ ops socketOps }

func (f natForwarder) upstream(sv *serviceView, client, vip netip.AddrPort, backend netip.Addr) (conn, error) {
	dst := netip.AddrPortFrom(backend, vip.Port())
	if !sv.snat.IsValid() {
		return f.ops.dial(netip.AddrPort{}, dst)
	}
	var last error
	for _, p := range snatPorts(client, vip.Port()) {
		c, err := f.ops.dial(netip.AddrPortFrom(sv.snat, p), dst)
		if err == nil {
			return c, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) {
			return nil, err
		}
		last = err
	}
	// Every deterministic choice is taken on this node: any port will do.
	c, err := f.ops.dial(netip.AddrPortFrom(sv.snat, 0), dst)
	if err != nil && last != nil {
		err = fmt.Errorf("%w (deterministic ports taken: %w)", err, last)
	}
	return c, err
}

// SNAT source ports are chosen in [snatPortLo, 65535]; keep this range of
// the SNAT address free of other listeners.
const (
	snatPortLo     = 20000
	snatPortProbes = 8
)

// snatPorts returns the SNAT source ports to try, in order, for one client
// flow to one VIP port: the client's own port when it is in range (the one
// the kernel fast path's masquerade keeps, so a flow moving to the kernel
// keeps its port too), then ports from a hash of the flow. The hash has no
// seed: every node computes the same list.
func snatPorts(client netip.AddrPort, vipPort uint16) [snatPortProbes]uint16 {
	var out [snatPortProbes]uint16
	a := client.Addr().As16()
	h := uint64(0xcbf29ce484222325)
	for _, b := range a {
		h = (h ^ uint64(b)) * 0x100000001b3
	}
	h = (h ^ uint64(client.Port())<<16 ^ uint64(vipPort)) * 0x100000001b3
	const span = 65536 - snatPortLo
	i := 0
	if p := client.Port(); p >= snatPortLo {
		out[0], i = p, 1
	}
	for ; i < snatPortProbes; i++ {
		h ^= h >> 29
		h *= 0xbf58476d1ce4e5b9
		h ^= h >> 32
		out[i] = uint16(snatPortLo + h%span)
	}
	return out
}

// transparentForwarder keeps only the flow's pacing: nothing is opened.
type transparentForwarder struct{}

func (transparentForwarder) upstream(*serviceView, netip.AddrPort, netip.AddrPort, netip.Addr) (conn, error) {
	return nil, nil
}

func forwarderFor(m Mode, ops socketOps) forwarder {
	switch m {
	case ModeNAT:
		return natForwarder{ops: ops}
	case ModeTransparent:
		return transparentForwarder{}
	}
	return nil // validateService rejects other modes
}
