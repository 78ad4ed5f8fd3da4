package hostnet

import (
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/ikelb/ikelb/dataplane"
)

// Dataplane is an engine whose committed service sets also reconcile the
// host (it satisfies cluster.Dataplane).
type Dataplane struct {
	*dataplane.Engine
	m  *Manager
	fp *FastPath // nil: no kernel fast path

	mu   sync.Mutex // serialises Manager applies; guards last
	last []dataplane.Service
}

// fastApplyWait bounds how long SetServices waits for the fast path to
// install a new set's transparent rules before deciding which replies
// hostnet's TPROXY rule still diverts.
const fastApplyWait = 2 * time.Second

// Wrap returns e with m reconciled on every SetServices.
func Wrap(e *dataplane.Engine, m *Manager) *Dataplane { return &Dataplane{Engine: e, m: m} }

// WrapFast is Wrap with the kernel fast path fp (nil: none) also following
// the committed services, its counts added to Counters, and the engine
// told which clients it forwards (their flows close early).
func WrapFast(e *dataplane.Engine, m *Manager, fp *FastPath) *Dataplane {
	d := &Dataplane{Engine: e, m: m, fp: fp}
	if fp != nil {
		e.SetKernelPath(fp)
		fp.mu.Lock()
		fp.notify = d.reapply
		fp.mu.Unlock()
	}
	return d
}

// SetServices hands set to the engine and to the fast path, then makes
// the host's TPROXY rules and routes match the engine's reply ports and
// the transparent services whose replies the fast path does not
// re-address itself: it waits (at most fastApplyWait) for the fast path
// to install the set, so a service's TPROXY rule goes only once the
// kernel's stateless rules are in place (while both exist, TPROXY at
// mangle priority diverts the replies first, which is still correct). A
// set the engine rejects as invalid changes none of them.
func (d *Dataplane) SetServices(set []dataplane.Service) error {
	err := d.Engine.SetServices(set)
	if errors.Is(err, dataplane.ErrInvalidService) {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.last = set
	var covered map[uint32]bool
	if d.fp != nil {
		covered = d.fp.transparent(d.fp.setServices(set), fastApplyWait)
	}
	return errors.Join(err, d.applyHost(set, covered))
}

// reapply re-applies the host setup for the last set after the fast
// path's transparent rules changed on their own (a failed rebuild).
func (d *Dataplane) reapply() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.applyHost(d.last, d.fp.transparent(0, 0)); err != nil {
		d.m.log.Error("host setup for transparent services failed", "error", err)
	}
}

// applyHost applies the TPROXY setup of set's transparent services not in
// covered. Called with d.mu held.
func (d *Dataplane) applyHost(set []dataplane.Service, covered map[uint32]bool) error {
	rest := set
	if len(covered) > 0 {
		rest = slices.DeleteFunc(slices.Clone(set), func(s dataplane.Service) bool { return covered[s.ID] })
	}
	p4, p6 := d.Engine.ReplyPorts()
	return d.m.Apply(SpecFor(rest, p4, p6))
}

// KernelClients is, per nat service, what the kernel fast path carries
// (FastPath.KernelClients); nil without one.
func (d *Dataplane) KernelClients() map[uint32]dataplane.KernelClients {
	if d.fp == nil {
		return nil
	}
	return d.fp.KernelClients()
}

// Counters is the engine's counters plus, per service, the packets the
// kernel fast path forwarded (as of its last poll). The kernel's counts
// are per service: they are in the service's Packets/Bytes/Reply* and in
// Datagrams["kernel"] / Datagrams["kernel_reply"], not in any backend's.
func (d *Dataplane) Counters() []dataplane.ServiceCounters {
	out := d.Engine.Counters()
	if d.fp == nil {
		return out
	}
	fc := d.fp.Counters()
	for i := range out {
		c, ok := fc[out[i].ID]
		if !ok {
			continue
		}
		s := &out[i]
		s.Packets += c.Packets
		s.Bytes += c.Bytes
		s.ReplyPackets += c.ReplyPackets
		s.ReplyBytes += c.ReplyBytes
		if s.Datagrams == nil {
			s.Datagrams = map[string]uint64{}
		}
		s.Datagrams["kernel"] = c.Packets
		s.Datagrams["kernel_reply"] = c.ReplyPackets
	}
	return out
}
