package cluster

import (
	"bytes"
	"cmp"
	"container/heap"
	"slices"

	"github.com/ikelb/ikelb/dataplane"
	raftlogv1 "github.com/ikelb/ikelb/proto/raftlog/v1"
)

// Read accessors. They return committed records, which are never mutated:
// callers must not modify them either.

// serviceByName returns the committed service called name.
func (f *FSM) serviceByName(name string) (*service, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	s, ok := f.byName[name]
	return s, ok
}

// serviceByID returns the committed service with id.
func (f *FSM) serviceByID(id uint32) (*service, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	s, ok := f.byID[id]
	return s, ok
}

// services returns every committed service, sorted by name.
func (f *FSM) services() []*service {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]*service, 0, len(f.byName))
	for _, s := range f.byName {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b *service) int { return cmp.Compare(a.rec.GetName(), b.rec.GetName()) })
	return out
}

// Services returns the committed service set as the dataplane sees it,
// sorted by id.
func (f *FSM) Services() []dataplane.Service {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]dataplane.Service, 0, len(f.byID))
	for _, s := range f.byID {
		out = append(out, s.dp)
	}
	slices.SortFunc(out, func(a, b dataplane.Service) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// ServiceRecords returns the committed service records, sorted by id.
func (f *FSM) ServiceRecords() []*raftlogv1.ServiceRecord {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]*raftlogv1.ServiceRecord, 0, len(f.byID))
	for _, s := range f.byID {
		out = append(out, s.rec)
	}
	slices.SortFunc(out, func(a, b *raftlogv1.ServiceRecord) int { return cmp.Compare(a.GetId(), b.GetId()) })
	return out
}

// Lookup returns the committed affinity of key. It does not take the lock.
func (f *FSM) Lookup(key dataplane.ClientKey) (dataplane.Entry, bool) {
	return f.table.Lookup(key)
}

// Len returns the number of committed affinities.
func (f *FSM) Len() int { return f.table.Len() }

// backendKey names one backend of one service.
type backendKey struct{ service, backend uint32 }

// affinityCounts returns how many committed affinities point at each backend.
func (f *FSM) affinityCounts() map[backendKey]uint64 {
	out := map[backendKey]uint64{}
	f.table.Range(func(k dataplane.ClientKey, e dataplane.Entry) bool {
		out[backendKey{k.Service, e.Backend}]++
		return true
	})
	return out
}

func compareKeys(a, b dataplane.ClientKey) int {
	if c := cmp.Compare(a.Service, b.Service); c != 0 {
		return c
	}
	return bytes.Compare(a.Client[:], b.Client[:])
}

// affinityHeap is a max-heap by key: it keeps the smallest keys seen.
type affinityHeap []affinity

func (h affinityHeap) Len() int           { return len(h) }
func (h affinityHeap) Less(i, j int) bool { return compareKeys(h[i].key, h[j].key) > 0 }
func (h affinityHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *affinityHeap) Push(x any)        { *h = append(*h, x.(affinity)) }
func (h *affinityHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// listAffinities returns up to limit affinities that match selects, in key
// order, starting after the key after (nil: from the start), and whether
// more follow. The table is a hash table, so each page scans it whole:
// O(n log limit) per page.
func (f *FSM) listAffinities(after *dataplane.ClientKey, limit int, match func(dataplane.ClientKey, dataplane.Entry) bool) ([]affinity, bool) {
	h := make(affinityHeap, 0, limit+1)
	f.table.Range(func(k dataplane.ClientKey, e dataplane.Entry) bool {
		if after != nil && compareKeys(k, *after) <= 0 {
			return true
		}
		if match != nil && !match(k, e) {
			return true
		}
		if len(h) <= limit {
			heap.Push(&h, affinity{k, e})
		} else if compareKeys(k, h[0].key) < 0 {
			h[0] = affinity{k, e}
			heap.Fix(&h, 0)
		}
		return true
	})
	out := []affinity(h)
	slices.SortFunc(out, func(a, b affinity) int { return compareKeys(a.key, b.key) })
	if len(out) > limit {
		return out[:limit], true
	}
	return out, false
}
