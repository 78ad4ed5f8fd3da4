package hostnet

import (
	"errors"

	"github.com/ikelb/ikelb/dataplane"
)

// Dataplane is an engine whose committed service sets also reconcile the
// host (it satisfies cluster.Dataplane).
type Dataplane struct {
	*dataplane.Engine
	m  *Manager
	fp *FastPath // nil: no kernel fast path
}

// Wrap returns e with m reconciled on every SetServices.
func Wrap(e *dataplane.Engine, m *Manager) *Dataplane { return &Dataplane{Engine: e, m: m} }

// WrapFast is Wrap with the kernel fast path fp (nil: none) also following
// the committed services, its counts added to Counters.
func WrapFast(e *dataplane.Engine, m *Manager, fp *FastPath) *Dataplane {
	return &Dataplane{Engine: e, m: m, fp: fp}
}

// SetServices hands set to the engine, then makes the host's TPROXY rules
// and routes match its transparent services and the engine's reply ports,
// and hands it to the fast path (which returns at once). A set the engine
// rejects as invalid changes none of them.
func (d *Dataplane) SetServices(set []dataplane.Service) error {
	err := d.Engine.SetServices(set)
	if errors.Is(err, dataplane.ErrInvalidService) {
		return err
	}
	if d.fp != nil {
		d.fp.SetServices(set)
	}
	p4, p6 := d.Engine.ReplyPorts()
	return errors.Join(err, d.m.Apply(SpecFor(set, p4, p6)))
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
