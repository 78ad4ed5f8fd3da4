package cluster

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/dataplane"
	raftlogv1 "github.com/ikelb/ikelb/proto/raftlog/v1"
	"google.golang.org/protobuf/proto"
)

// entryType is the first byte of every Raft log entry; the rest is the
// protobuf message named by the type. Values are persisted forever: never
// reuse or renumber one.
type entryType byte

const (
	entryPutService       entryType = 1 // raftlogv1.PutService
	entryDeleteService    entryType = 2 // raftlogv1.DeleteService
	entryAffinityBatch    entryType = 3 // raftlogv1.AffinityBatch
	entryDeleteAffinities entryType = 4 // raftlogv1.DeleteAffinities
	entryHealthBatch      entryType = 5 // raftlogv1.HealthBatch
)

func (t entryType) String() string {
	switch t {
	case entryPutService:
		return "put_service"
	case entryDeleteService:
		return "delete_service"
	case entryAffinityBatch:
		return "affinity_batch"
	case entryDeleteAffinities:
		return "delete_affinities"
	case entryHealthBatch:
		return "health_batch"
	}
	return fmt.Sprintf("entry_type(%d)", byte(t))
}

// encodeEntry returns the log entry for m.
func encodeEntry(t entryType, m proto.Message) ([]byte, error) {
	b := make([]byte, 1, 1+proto.Size(m))
	b[0] = byte(t)
	b, err := proto.MarshalOptions{Deterministic: true}.MarshalAppend(b, m)
	if err != nil {
		return nil, fmt.Errorf("encode %v: %w", t, err)
	}
	return b, nil
}

// service is one committed service. It is immutable once stored in the FSM's
// maps: every change builds a new one, so readers and snapshots can keep a
// pointer without copying.
type service struct {
	rec     *raftlogv1.ServiceRecord
	dp      dataplane.Service
	backend map[uint32]int // backend id → index in rec.Backends and dp.Backends
}

func newService(rec *raftlogv1.ServiceRecord) (*service, error) {
	dp, err := toDataplane(rec)
	if err != nil {
		return nil, err
	}
	s := &service{rec: rec, dp: dp, backend: make(map[uint32]int, len(dp.Backends))}
	for i, b := range dp.Backends {
		s.backend[b.ID] = i
	}
	return s, nil
}

// usable reports whether backend id exists and may keep its clients.
func (s *service) usable(id uint32) bool {
	i, ok := s.backend[id]
	return ok && s.dp.Backends[i].Usable()
}

// FSM is the replicated state: services with their backends and committed
// health, and the affinity table. It implements raft.FSM. Apply, Snapshot and
// Restore are called by raft's FSM goroutine only; the read methods are safe
// from any goroutine.
type FSM struct {
	// Set once.
	log     *slog.Logger
	table   *dataplane.Table         // the FSM is its only writer
	updates chan []dataplane.Service // 1 slot: the latest service set for the dataplane
	changed chan struct{}            // 1 slot: services changed (wakes the leader loop)

	applied atomic.Uint64 // index of the last entry applied

	wmu sync.Mutex
	// wmu guards wake: closed (and cleared) when applied advances, if
	// someone waits (waitApplied).
	wake chan struct{}

	mu sync.RWMutex
	// mu guards the following. Apply and Restore hold it for writing. The
	// table is written only with mu held for writing; readers use its
	// lock-free Lookup, Range and Len without mu, so a long listing never
	// stalls Apply (and may see a change that is being applied).
	byName        map[string]*service
	byID          map[uint32]*service
	nextServiceID uint32 // the id the next created service gets
}

// newFSM returns an empty FSM storing affinities in table.
func newFSM(table *dataplane.Table, log *slog.Logger) *FSM {
	return &FSM{
		log:           log,
		table:         table,
		updates:       make(chan []dataplane.Service, 1),
		changed:       make(chan struct{}, 1),
		byName:        map[string]*service{},
		byID:          map[uint32]*service{},
		nextServiceID: 1,
	}
}

// Apply applies one committed entry. It is deterministic: everything it uses
// comes from the entry and the current state. It returns an applyResult, or an
// error value for a rejected write; it panics on an entry it cannot decode,
// because continuing would let replicas diverge.
func (f *FSM) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	defer f.setApplied(l.Index)
	if len(l.Data) == 0 {
		panic(fmt.Sprintf("cluster: corrupt raft entry at index %d: empty", l.Index))
	}
	t, body := entryType(l.Data[0]), l.Data[1:]
	var m proto.Message
	switch t {
	case entryPutService:
		m = &raftlogv1.PutService{}
	case entryDeleteService:
		m = &raftlogv1.DeleteService{}
	case entryAffinityBatch:
		m = &raftlogv1.AffinityBatch{}
	case entryDeleteAffinities:
		m = &raftlogv1.DeleteAffinities{}
	case entryHealthBatch:
		m = &raftlogv1.HealthBatch{}
	default:
		panic(fmt.Sprintf("cluster: corrupt raft entry at index %d: unknown type %d", l.Index, l.Data[0]))
	}
	if err := proto.Unmarshal(body, m); err != nil {
		panic(fmt.Sprintf("cluster: corrupt raft entry at index %d (%v): %v", l.Index, t, err))
	}

	f.mu.Lock()
	defer f.mu.Unlock()
	switch m := m.(type) {
	case *raftlogv1.PutService:
		return f.applyPutServiceLocked(l.Index, m)
	case *raftlogv1.DeleteService:
		return f.applyDeleteServiceLocked(m)
	case *raftlogv1.AffinityBatch:
		return f.applyAffinityBatchLocked(m)
	case *raftlogv1.DeleteAffinities:
		return f.applyDeleteAffinitiesLocked(m)
	case *raftlogv1.HealthBatch:
		return f.applyHealthBatchLocked(m)
	}
	panic("unreachable")
}

// applyResult is what Apply returns for a write that succeeded.
type applyResult struct {
	index   uint64                   // Raft index of the entry (set by the proposer, not Apply)
	service *raftlogv1.ServiceRecord // PutService, HealthBatch (last changed)
	deleted uint64                   // DeleteService, DeleteAffinities, AffinityBatch expires
	bound   uint64                   // AffinityBatch: binds that created or replaced an entry
	kept    uint64                   // AffinityBatch: binds that lost to an existing entry
	touched uint64                   // AffinityBatch: touches that found their entry
	changed uint64                   // HealthBatch: backends whose health changed
}

// putServiceLocked stores s (replacing any service with its id) and tells
// the dataplane and the leader loop.
func (f *FSM) putServiceLocked(s *service) {
	if old, ok := f.byID[s.rec.GetId()]; ok && old.rec.GetName() != s.rec.GetName() {
		delete(f.byName, old.rec.GetName())
	}
	f.byID[s.rec.GetId()] = s
	f.byName[s.rec.GetName()] = s
}

// publishLocked hands the current service set to the dataplane without
// blocking: the 1-slot channel always holds the latest set, and the Node's
// goroutine applies whatever it finds there.
func (f *FSM) publishLocked() {
	set := make([]dataplane.Service, 0, len(f.byID))
	for _, s := range f.byID {
		set = append(set, s.dp)
	}
	slices.SortFunc(set, func(a, b dataplane.Service) int { return cmp.Compare(a.ID, b.ID) })
	// The FSM is the only sender, so after draining the slot the send
	// cannot block.
	select {
	case <-f.updates:
	default:
	}
	f.updates <- set
	select {
	case f.changed <- struct{}{}:
	default:
	}
}

// Updates returns the channel on which the FSM publishes the latest service
// set after every change; only the newest set is kept.
func (f *FSM) Updates() <-chan []dataplane.Service { return f.updates }

// AppliedIndex is the index of the last command entry applied. (After a
// snapshot is restored it stays where it was until the next entry.)
func (f *FSM) AppliedIndex() uint64 { return f.applied.Load() }

func (f *FSM) setApplied(index uint64) {
	f.applied.Store(index)
	f.wmu.Lock()
	if f.wake != nil {
		close(f.wake)
		f.wake = nil
	}
	f.wmu.Unlock()
}

// waitApplied waits until an entry at index or later has been applied, or
// ctx is done.
func (f *FSM) waitApplied(ctx context.Context, index uint64) error {
	for {
		f.wmu.Lock()
		if f.wake == nil {
			f.wake = make(chan struct{})
		}
		wake := f.wake
		f.wmu.Unlock()
		if f.applied.Load() >= index {
			return nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

var _ raft.FSM = (*FSM)(nil)

// Snapshot copies the state and returns; Persist writes the copy.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	s := &fsmSnapshot{
		nextServiceID: f.nextServiceID,
		services:      make([]*raftlogv1.ServiceRecord, 0, len(f.byID)),
		affinities:    make([]affinity, 0, f.table.Len()),
	}
	for _, svc := range f.byID {
		s.services = append(s.services, svc.rec)
	}
	slices.SortFunc(s.services, func(a, b *raftlogv1.ServiceRecord) int { return cmp.Compare(a.GetId(), b.GetId()) })
	f.table.Range(func(k dataplane.ClientKey, e dataplane.Entry) bool {
		s.affinities = append(s.affinities, affinity{k, e})
		return true
	})
	return s, nil
}

// Restore replaces the whole state with a snapshot written by Persist.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	return f.restore(rc)
}
