package hostnet

import (
	"errors"

	"github.com/ikelb/ikelb/dataplane"
)

// Dataplane is an engine whose committed service sets also reconcile the
// host (it satisfies cluster.Dataplane).
type Dataplane struct {
	*dataplane.Engine
	m *Manager
}

// Wrap returns e with m reconciled on every SetServices.
func Wrap(e *dataplane.Engine, m *Manager) *Dataplane { return &Dataplane{Engine: e, m: m} }

// SetServices hands set to the engine, then makes the host's TPROXY rules
// and routes match its transparent services and the engine's reply ports.
// A set the engine rejects as invalid changes neither.
func (d *Dataplane) SetServices(set []dataplane.Service) error {
	err := d.Engine.SetServices(set)
	if errors.Is(err, dataplane.ErrInvalidService) {
		return err
	}
	p4, p6 := d.Engine.ReplyPorts()
	return errors.Join(err, d.m.Apply(SpecFor(set, p4, p6)))
}
