package dataplane

import (
	"encoding/binary"
	"math/rand/v2"
	"sync/atomic"
)

// Table is the committed affinity table: ClientKey → Entry.
//
// Readers (the packet path) call Lookup from any number of goroutines; it
// takes no lock and does not allocate. Writers (Put, Delete, Reset) must be
// called from one goroutine at a time — the Raft FSM's Apply/Restore
// goroutine; the Table does not check this. Get, Range and Len are safe from
// any goroutine.
//
// Layout: a power-of-two array of buckets, each an atomic pointer to a chain
// of immutable nodes (only a node's last-seen time changes in place, as an
// atomic). The writer publishes a new node with one atomic store; a resize
// builds a new array with copied nodes and swaps it in atomically, so a
// reader always walks a consistent chain. See DESIGN.md for the memory
// measurement.
type Table struct {
	buckets  atomic.Pointer[bucketArray]
	count    atomic.Int64 // written by the writer only
	observer swappable[TableObserver]
}

// TableObserver is told, on the writer's goroutine, which bindings changed:
// an insert, a re-bind (another backend or created time) or a delete;
// last-seen touches are not reported. It gets only the key: the consumer
// reads the current entry with Lookup, so changes may be coalesced,
// reordered or re-read without ever converging on a stale state.
// Both methods must return promptly and never block (the writer is the
// Raft FSM); ChangeQueue is the implementation to use.
type TableObserver interface {
	// Changed reports that k's binding was inserted, re-bound or deleted.
	Changed(k ClientKey)
	// Reset reports that every entry was removed (Reset; a snapshot
	// restore then Puts its entries).
	Reset()
}

// SetObserver installs o (nil removes it). It may be called from any
// goroutine; writes after it returns are reported to o.
func (t *Table) SetObserver(o TableObserver) { t.observer.Store(o) }

func (t *Table) changed(k ClientKey) {
	if o, ok := t.observer.Load(); ok {
		o.Changed(k)
	}
}

type bucketArray struct {
	slots []atomic.Pointer[tableNode]
	mask  uint64
	seed  [2]uint64
}

// tableNode is 48 bytes on 64-bit platforms (a 48-byte size class).
type tableNode struct {
	next     atomic.Pointer[tableNode]
	lastSeen atomic.Int64
	created  int64
	key      ClientKey
	backend  uint32
}

const (
	minBuckets = 64
	// maxLoad is entries per bucket before the array doubles: chains stay
	// short (mean ≤ 1) and the bucket array costs 8-16 bytes per entry.
	maxLoad = 1
)

// NewTable returns an empty table.
func NewTable() *Table {
	t := &Table{}
	t.buckets.Store(newBucketArray(minBuckets))
	return t
}

func newBucketArray(n int) *bucketArray {
	return &bucketArray{
		slots: make([]atomic.Pointer[tableNode], n),
		mask:  uint64(n - 1),
		// A random seed per array: clients choose their own addresses
		// (IPv6 especially), so a fixed hash would let them build long chains.
		seed: [2]uint64{rand.Uint64(), rand.Uint64()},
	}
}

func (a *bucketArray) slot(k *ClientKey) *atomic.Pointer[tableNode] {
	h := wymix(binary.LittleEndian.Uint64(k.Client[0:8])^a.seed[0],
		binary.LittleEndian.Uint64(k.Client[8:16])^a.seed[1])
	h = wymix(h^uint64(k.Service), 0x9e3779b97f4a7c15^a.seed[0])
	return &a.slots[h&a.mask]
}

func (t *Table) array() *bucketArray {
	if a := t.buckets.Load(); a != nil {
		return a
	}
	// The zero Table is usable: the first writer installs an array. Readers
	// racing with it see nil and find nothing.
	return nil
}

// Lookup returns k's entry. It is lock-free and allocation-free.
func (t *Table) Lookup(k ClientKey) (Entry, bool) {
	a := t.array()
	if a == nil {
		return Entry{}, false
	}
	for n := a.slot(&k).Load(); n != nil; n = n.next.Load() {
		if n.key == k {
			return Entry{Backend: n.backend, Created: n.created, LastSeen: n.lastSeen.Load()}, true
		}
	}
	return Entry{}, false
}

// Get is Lookup, under the name the writer's side uses.
func (t *Table) Get(k ClientKey) (Entry, bool) { return t.Lookup(k) }

// Len returns the number of entries.
func (t *Table) Len() int { return int(t.count.Load()) }

// Put sets k's entry. Writer only.
func (t *Table) Put(k ClientKey, e Entry) {
	a := t.writerArray()
	head := a.slot(&k)
	prev := head
	for n := head.Load(); n != nil; prev, n = &n.next, n.next.Load() {
		if n.key != k {
			continue
		}
		if n.backend == e.Backend && n.created == e.Created {
			n.lastSeen.Store(e.LastSeen) // a touch: no new node
			return
		}
		nn := &tableNode{key: k, backend: e.Backend, created: e.Created}
		nn.lastSeen.Store(e.LastSeen)
		nn.next.Store(n.next.Load())
		prev.Store(nn) // readers see the old node or the new one, never a mix
		t.changed(k)
		return
	}
	nn := &tableNode{key: k, backend: e.Backend, created: e.Created}
	nn.lastSeen.Store(e.LastSeen)
	nn.next.Store(head.Load())
	head.Store(nn)
	if c := t.count.Add(1); c > int64(len(a.slots))*maxLoad {
		t.grow(a)
	}
	t.changed(k)
}

// Delete removes k and reports whether it was present. Writer only.
func (t *Table) Delete(k ClientKey) bool {
	a := t.array()
	if a == nil {
		return false
	}
	prev := a.slot(&k)
	for n := prev.Load(); n != nil; prev, n = &n.next, n.next.Load() {
		if n.key == k {
			// Unlinking leaves n.next intact: a reader standing on n walks on.
			prev.Store(n.next.Load())
			t.count.Add(-1)
			t.changed(k)
			return true
		}
	}
	return false
}

// Reset removes every entry (and gives back the memory). Writer only.
func (t *Table) Reset() {
	t.buckets.Store(newBucketArray(minBuckets))
	t.count.Store(0)
	if o, ok := t.observer.Load(); ok {
		o.Reset()
	}
}

// Range calls fn for every entry until fn returns false. It sees a
// consistent array but not a snapshot: entries written during Range may or
// may not be seen. Called from the writer's goroutine it sees exactly the
// table. fn must not call the writer methods.
func (t *Table) Range(fn func(ClientKey, Entry) bool) {
	a := t.array()
	if a == nil {
		return
	}
	for i := range a.slots {
		for n := a.slots[i].Load(); n != nil; n = n.next.Load() {
			if !fn(n.key, Entry{Backend: n.backend, Created: n.created, LastSeen: n.lastSeen.Load()}) {
				return
			}
		}
	}
}

func (t *Table) writerArray() *bucketArray {
	a := t.array()
	if a == nil {
		a = newBucketArray(minBuckets)
		t.buckets.Store(a)
	}
	return a
}

// grow doubles the bucket array. Nodes are copied, not relinked: readers
// may still be walking the old chains.
func (t *Table) grow(old *bucketArray) {
	na := newBucketArray(len(old.slots) * 2)
	for i := range old.slots {
		for n := old.slots[i].Load(); n != nil; n = n.next.Load() {
			h := na.slot(&n.key)
			nn := &tableNode{key: n.key, backend: n.backend, created: n.created}
			nn.lastSeen.Store(n.lastSeen.Load())
			nn.next.Store(h.Load())
			h.Store(nn)
		}
	}
	t.buckets.Store(na)
}
