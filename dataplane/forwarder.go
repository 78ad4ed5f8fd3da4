package dataplane

import "net/netip"

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
// kernel's choice) and a kernel-chosen port: the backend sees one peer per
// client flow.
type natForwarder struct{ ops socketOps }

func (f natForwarder) upstream(sv *serviceView, _, vip netip.AddrPort, backend netip.Addr) (conn, error) {
	return f.ops.dial(sv.snat, netip.AddrPortFrom(backend, vip.Port()))
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
