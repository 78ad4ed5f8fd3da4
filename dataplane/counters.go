package dataplane

import (
	"net/netip"
	"sync/atomic"
)

// DropReason says why a datagram was not forwarded.
type DropReason uint8

const (
	DropNoBackend DropReason = iota // no backend usable or accepting new clients
	DropFlowError                   // the upstream socket could not be opened
	DropFlowLimit                   // Config.MaxFlows reached
	DropSendError                   // the kernel refused the send
	DropTruncated                   // larger than Config.MaxDatagram
	numDropReasons
)

func (r DropReason) String() string {
	switch r {
	case DropNoBackend:
		return "no_backend"
	case DropFlowError:
		return "flow_error"
	case DropFlowLimit:
		return "flow_limit"
	case DropSendError:
		return "send_error"
	case DropTruncated:
		return "truncated"
	}
	return "unknown"
}

// ServiceCounters are one service's counters since its listener opened.
// Packets/Bytes are client → backend and Reply* backend → client, summed
// over the backends; Drops is the sum of DropsByReason (a backend's drops are
// counted under their reason too).
type ServiceCounters struct {
	ID   uint32
	Name string

	Packets, Bytes           uint64
	ReplyPackets, ReplyBytes uint64
	Drops                    uint64
	DropsByReason            map[string]uint64 // DropReason.String() → count
	Datagrams                map[string]uint64 // client datagrams by Class.String()

	Backends []BackendCounters
}

// BackendCounters are one backend's counters.
type BackendCounters struct {
	ID                       uint32
	Addr                     netip.Addr
	Packets, Bytes           uint64
	ReplyPackets, ReplyBytes uint64
	Drops                    uint64 // datagrams for this backend not sent
}

// serviceCounters live as long as the service does, across SetServices.
type serviceCounters struct {
	drops    [numDropReasons]atomic.Uint64
	classes  [numClasses]atomic.Uint64
	backends map[uint32]*backendCounters // structure guarded by Engine.mu
}

type backendCounters struct {
	packets, bytes           atomic.Uint64
	replyPackets, replyBytes atomic.Uint64
	drops                    atomic.Uint64
}

// tally accumulates one batch's counts in plain integers, owned by one
// goroutine, and flushes them to the atomics once per batch.
type tally struct {
	backends []backendTally // indexed like serviceView.backends
	drops    [numDropReasons]uint64
	classes  [numClasses]uint64
}

type backendTally struct{ packets, bytes, drops uint64 }

// reset sizes the tally for sv; it allocates only when sv has more
// backends than any view before it.
func (t *tally) reset(sv *serviceView) {
	n := len(sv.backends)
	if cap(t.backends) < n {
		t.backends = make([]backendTally, n)
	}
	t.backends = t.backends[:n]
}

func (t *tally) flush(sv *serviceView) {
	for i := range t.backends {
		bt := &t.backends[i]
		if *bt == (backendTally{}) {
			continue
		}
		bc := sv.counters[i]
		if bt.packets != 0 {
			bc.packets.Add(bt.packets)
			bc.bytes.Add(bt.bytes)
		}
		if bt.drops != 0 {
			bc.drops.Add(bt.drops)
		}
		*bt = backendTally{}
	}
	for i, n := range t.drops {
		if n != 0 {
			sv.svcCounters.drops[i].Add(n)
			t.drops[i] = 0
		}
	}
	for i, n := range t.classes {
		if n != 0 {
			sv.svcCounters.classes[i].Add(n)
			t.classes[i] = 0
		}
	}
}

func (sc *serviceCounters) snapshot(sv *serviceView) ServiceCounters {
	out := ServiceCounters{
		ID:            sv.svc.ID,
		Name:          sv.svc.Name,
		DropsByReason: make(map[string]uint64, numDropReasons),
		Datagrams:     make(map[string]uint64, numClasses),
	}
	for r := range numDropReasons {
		n := sc.drops[r].Load()
		out.DropsByReason[r.String()] = n
		out.Drops += n
	}
	for c := range numClasses {
		out.Datagrams[c.String()] = sc.classes[c].Load()
	}
	for i, b := range sv.backends {
		bc := sv.counters[i]
		c := BackendCounters{
			ID: b.ID, Addr: b.Addr,
			Packets: bc.packets.Load(), Bytes: bc.bytes.Load(),
			ReplyPackets: bc.replyPackets.Load(), ReplyBytes: bc.replyBytes.Load(),
			Drops: bc.drops.Load(),
		}
		out.Packets += c.Packets
		out.Bytes += c.Bytes
		out.ReplyPackets += c.ReplyPackets
		out.ReplyBytes += c.ReplyBytes
		out.Backends = append(out.Backends, c)
	}
	return out
}

// KernelClients is what a kernel fast path carries of one nat service:
// Flows, flows rewritten statelessly with their own socket's address and
// port (the ingress stage); DNAT, clients on the DNAT map (conntrack:
// every client of a service on the conntrack path, or, with the ingress
// stage, the clients beyond the engine's flow limit).
type KernelClients struct {
	Flows, DNAT int
}
