package cluster

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/ikelb/ikelb/dataplane"
	raftlogv1 "github.com/ikelb/ikelb/proto/raftlog/v1"
	"google.golang.org/protobuf/proto"
)

// applyPutServiceLocked creates a service (fresh id) or replaces one by name.
// Backends are matched by address: a matched backend keeps its id and
// committed health, a new one gets the service's next backend id. The
// service's version becomes the entry's index.
func (f *FSM) applyPutServiceLocked(index uint64, m *raftlogv1.PutService) any {
	if m.GetService().GetName() == "" {
		return fmt.Errorf("put service: no service name: %w", ErrInvalid)
	}
	rec := proto.Clone(m.GetService()).(*raftlogv1.ServiceRecord)
	old := f.byName[rec.GetName()]
	if m.GetCreate() {
		if old != nil {
			return fmt.Errorf("service %q: %w", rec.GetName(), ErrExists)
		}
		rec.Id = f.nextServiceID
		rec.NextBackendId = 1
	} else {
		if old == nil {
			return fmt.Errorf("service %q: %w", rec.GetName(), ErrNotFound)
		}
		if v := m.GetExpectedVersion(); v != 0 && v != old.rec.GetVersion() {
			return fmt.Errorf("service %q is at version %d, not %d: %w", rec.GetName(), old.rec.GetVersion(), v, ErrConflict)
		}
		rec.Id = old.rec.GetId()
		rec.NextBackendId = old.rec.GetNextBackendId()
	}
	rec.Version = index

	// Normalize addresses so that equal addresses are equal bytes.
	if a, ok := addrFromBytes(rec.GetVip()); ok {
		rec.Vip = addrBytes(a)
	}
	if a, ok := addrFromBytes(rec.GetSnatAddress()); ok {
		rec.SnatAddress = addrBytes(a)
	}
	prev := map[netip.Addr]*raftlogv1.BackendRecord{}
	if old != nil {
		for _, b := range old.rec.GetBackends() {
			a, _ := addrFromBytes(b.GetAddr())
			prev[a] = b
		}
	}
	seen := map[netip.Addr]bool{}
	for _, b := range rec.GetBackends() {
		a, ok := addrFromBytes(b.GetAddr())
		if !ok || !a.IsValid() {
			return fmt.Errorf("service %q: bad backend address %x: %w", rec.GetName(), b.GetAddr(), ErrInvalid)
		}
		if seen[a] {
			return fmt.Errorf("service %q: backend %v listed twice: %w", rec.GetName(), a, ErrInvalid)
		}
		seen[a] = true
		b.Addr = addrBytes(a)
		if p, ok := prev[a]; ok {
			b.Id, b.Health, b.HealthChangedNs = p.GetId(), p.GetHealth(), p.GetHealthChangedNs()
		} else {
			b.Id, b.Health, b.HealthChangedNs = rec.NextBackendId, 0, 0
			rec.NextBackendId++
		}
	}
	s, err := newService(rec)
	if err != nil {
		return err
	}
	if err := f.checkAddrFreeLocked(s); err != nil {
		return err
	}
	if m.GetCreate() {
		f.nextServiceID++
	}
	f.putServiceLocked(s)
	if old != nil {
		// Forget the clients of removed backends.
		id := s.rec.GetId()
		if len(old.backend) > 0 {
			f.deleteAffinitiesLocked(func(k dataplane.ClientKey, e dataplane.Entry) bool {
				if k.Service != id {
					return false
				}
				_, ok := s.backend[e.Backend]
				return !ok
			})
		}
	}
	f.publishLocked()
	return applyResult{service: rec}
}

// checkAddrFreeLocked fails when another service uses one of s's VIP:ports.
func (f *FSM) checkAddrFreeLocked(s *service) error {
	for _, o := range f.byID {
		if o.rec.GetId() == s.rec.GetId() || o.dp.VIP != s.dp.VIP {
			continue
		}
		for _, p := range s.dp.Ports {
			if slices.Contains(o.dp.Ports, p) {
				return fmt.Errorf("%v port %d is used by service %q: %w", s.dp.VIP, p, o.rec.GetName(), ErrAddrInUse)
			}
		}
	}
	return nil
}

// deleteAffinitiesLocked deletes the entries match selects and returns how
// many. Keys are collected first: the table is not modified during Range.
func (f *FSM) deleteAffinitiesLocked(match func(dataplane.ClientKey, dataplane.Entry) bool) uint64 {
	var keys []dataplane.ClientKey
	f.table.Range(func(k dataplane.ClientKey, e dataplane.Entry) bool {
		if match(k, e) {
			keys = append(keys, k)
		}
		return true
	})
	for _, k := range keys {
		f.table.Delete(k)
	}
	return uint64(len(keys))
}

func (f *FSM) applyDeleteServiceLocked(m *raftlogv1.DeleteService) any {
	s, ok := f.byName[m.GetName()]
	if !ok {
		return fmt.Errorf("service %q: %w", m.GetName(), ErrNotFound)
	}
	delete(f.byName, m.GetName())
	delete(f.byID, s.rec.GetId())
	id := s.rec.GetId()
	n := f.deleteAffinitiesLocked(func(k dataplane.ClientKey, _ dataplane.Entry) bool { return k.Service == id })
	f.publishLocked()
	return applyResult{deleted: n}
}

// applyAffinityBatchLocked applies binds, then touches, then expires.
//
// Binds: the first committed writer wins. An existing entry whose backend
// still exists and is usable is kept (its last-seen raised to the bind's
// time); otherwise the bind's backend replaces it. A bind to a backend that
// does not exist or is not usable is ignored.
// Touches raise last-seen to max(last-seen, at). Expires delete an entry only
// if its last-seen still equals the one the proposer judged expired.
func (f *FSM) applyAffinityBatchLocked(m *raftlogv1.AffinityBatch) any {
	var r applyResult
	for _, b := range m.GetBinds() {
		s, ok := f.byID[b.GetServiceId()]
		client, okc := clientFromBytes(b.GetClient())
		if !ok || !okc || !s.usable(b.GetBackendId()) {
			continue
		}
		k := dataplane.ClientKey{Service: b.GetServiceId(), Client: client}
		if e, ok := f.table.Lookup(k); ok && s.usable(e.Backend) {
			r.kept++
			if b.GetAtNs() > e.LastSeen {
				e.LastSeen = b.GetAtNs()
				f.table.Put(k, e)
			}
			continue
		}
		f.table.Put(k, dataplane.Entry{Backend: b.GetBackendId(), Created: b.GetAtNs(), LastSeen: b.GetAtNs()})
		r.bound++
	}
	for _, t := range m.GetTouches() {
		client, ok := clientFromBytes(t.GetClient())
		if !ok {
			continue
		}
		k := dataplane.ClientKey{Service: t.GetServiceId(), Client: client}
		if e, ok := f.table.Lookup(k); ok {
			r.touched++
			if t.GetAtNs() > e.LastSeen {
				e.LastSeen = t.GetAtNs()
				f.table.Put(k, e)
			}
		}
	}
	for _, x := range m.GetExpires() {
		client, ok := clientFromBytes(x.GetClient())
		if !ok {
			continue
		}
		k := dataplane.ClientKey{Service: x.GetServiceId(), Client: client}
		if e, ok := f.table.Lookup(k); ok && e.LastSeen == x.GetLastSeenNs() {
			f.table.Delete(k)
			r.deleted++
		}
	}
	return r
}

// applyDeleteAffinitiesLocked deletes one client's entry or all of a
// service's, optionally only those on one backend.
func (f *FSM) applyDeleteAffinitiesLocked(m *raftlogv1.DeleteAffinities) any {
	id := m.GetServiceId()
	if _, ok := f.byID[id]; !ok {
		return fmt.Errorf("service id %d: %w", id, ErrNotFound)
	}
	backend := m.GetBackendId()
	if len(m.GetClient()) > 0 {
		client, ok := clientFromBytes(m.GetClient())
		if !ok {
			return fmt.Errorf("delete affinities: client is %d bytes, not 16: %w", len(m.GetClient()), ErrInvalid)
		}
		k := dataplane.ClientKey{Service: id, Client: client}
		if e, ok := f.table.Lookup(k); ok && (backend == 0 || e.Backend == backend) {
			f.table.Delete(k)
			return applyResult{deleted: 1}
		}
		return applyResult{}
	}
	n := f.deleteAffinitiesLocked(func(k dataplane.ClientKey, e dataplane.Entry) bool {
		return k.Service == id && (backend == 0 || e.Backend == backend)
	})
	return applyResult{deleted: n}
}

// applyHealthBatchLocked records health transitions. A health change does
// not change the service's version: operators' compare-and-set writes must
// not fail because a backend flapped.
func (f *FSM) applyHealthBatchLocked(m *raftlogv1.HealthBatch) any {
	var (
		r     applyResult
		order []uint32
		recs  = map[uint32]*raftlogv1.ServiceRecord{}
	)
	for _, c := range m.GetChanges() {
		s, ok := f.byID[c.GetServiceId()]
		if !ok {
			continue
		}
		i, ok := s.backend[c.GetBackendId()]
		if !ok || c.GetHealth() > 2 {
			continue
		}
		rec, ok := recs[c.GetServiceId()]
		if !ok {
			rec = proto.Clone(s.rec).(*raftlogv1.ServiceRecord)
			recs[c.GetServiceId()] = rec
			order = append(order, c.GetServiceId())
		}
		b := rec.Backends[i]
		if b.GetHealth() == c.GetHealth() {
			continue
		}
		b.Health, b.HealthChangedNs = c.GetHealth(), c.GetAtNs()
		r.changed++
	}
	if r.changed == 0 {
		return r
	}
	for _, id := range order {
		s, err := newService(recs[id])
		if err != nil {
			// The record was accepted before; only health changed.
			panic(fmt.Sprintf("cluster: service %d became invalid on a health change: %v", id, err))
		}
		f.putServiceLocked(s)
		r.service = s.rec
	}
	f.publishLocked()
	return r
}
