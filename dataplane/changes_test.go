package dataplane

import (
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"
)

// recorder is a TableObserver that records calls.
type recorder struct {
	keys   []ClientKey
	resets int
}

func (r *recorder) Changed(k ClientKey) { r.keys = append(r.keys, k) }
func (r *recorder) Reset()              { r.resets++ }

func TestTableObserver(t *testing.T) {
	tb := NewTable()
	tb.Put(testKey(9), Entry{Backend: 1}) // before SetObserver: not reported
	r := &recorder{}
	tb.SetObserver(r)
	tb.Put(testKey(1), Entry{Backend: 1, Created: 1, LastSeen: 1}) // insert
	tb.Put(testKey(1), Entry{Backend: 1, Created: 1, LastSeen: 5}) // touch: not reported
	tb.Put(testKey(1), Entry{Backend: 2, Created: 7, LastSeen: 7}) // re-bind
	tb.Put(testKey(1), Entry{Backend: 2, Created: 8, LastSeen: 8}) // same backend, new binding
	tb.Delete(testKey(2))                                          // absent: not reported
	tb.Delete(testKey(1))                                          // delete
	for i := range 200 {                                           // inserts across a resize
		tb.Put(testKey(100+i), Entry{Backend: 3})
	}
	want := []ClientKey{testKey(1), testKey(1), testKey(1), testKey(1)}
	for i := range 200 {
		want = append(want, testKey(100+i))
	}
	if !slices.Equal(r.keys, want) || r.resets != 0 {
		t.Fatalf("changes %d %v (resets %d), want %d", len(r.keys), r.keys[:min(5, len(r.keys))], r.resets, len(want))
	}
	tb.Reset()
	if r.resets != 1 {
		t.Fatalf("resets %d", r.resets)
	}
	tb.SetObserver(nil)
	tb.Put(testKey(3), Entry{Backend: 1})
	if len(r.keys) != len(want) {
		t.Fatal("reported after SetObserver(nil)")
	}
}

func TestChangeQueue(t *testing.T) {
	q := NewChangeQueue(3)
	select {
	case <-q.Ready():
		t.Fatal("ready while empty")
	default:
	}
	q.Changed(testKey(1))
	q.Changed(testKey(2))
	<-q.Ready()
	got, resync := q.Take(nil, 1)
	if resync || !slices.Equal(got, []ClientKey{testKey(1)}) {
		t.Fatalf("Take(max 1) = %v %v", got, resync)
	}
	<-q.Ready() // one left: signalled again
	if got, _ = q.Take(got[:0], 0); !slices.Equal(got, []ClientKey{testKey(2)}) {
		t.Fatalf("Take = %v", got)
	}
	// Overflow: the fourth change asks for a resync and drops the queue.
	for i := range 4 {
		q.Changed(testKey(10 + i))
	}
	if got, resync = q.Take(got[:0], 0); !resync || len(got) != 0 || q.Resyncs() != 1 {
		t.Fatalf("after overflow Take = %v %v, resyncs %d", got, resync, q.Resyncs())
	}
	if got, resync = q.Take(got[:0], 0); resync || len(got) != 0 {
		t.Fatalf("resync not cleared / queue not drained: %v %v", got, resync)
	}
	q.Reset()
	if _, resync = q.Take(nil, 0); !resync || q.Resyncs() != 2 {
		t.Fatal("Reset did not ask for a resync")
	}
}

// TestChangeQueueConverges mirrors a table through a tiny queue (so it
// overflows often) while the writer puts, re-binds, deletes and resets; at
// the end the mirror equals the table.
func TestChangeQueueConverges(t *testing.T) {
	tb := NewTable()
	q := NewChangeQueue(4)
	tb.SetObserver(q)
	mirror := map[ClientKey]uint32{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	var resyncs int
	consume := func() {
		keys, resync := q.Take(nil, 0)
		if resync {
			resyncs++
			clear(mirror)
			tb.Range(func(k ClientKey, e Entry) bool { mirror[k] = e.Backend; return true })
			return
		}
		for _, k := range keys {
			if e, ok := tb.Lookup(k); ok {
				mirror[k] = e.Backend
			} else {
				delete(mirror, k)
			}
		}
	}
	go func() {
		defer wg.Done()
		for {
			select {
			case <-q.Ready():
				consume()
			case <-stop:
				consume()
				return
			}
		}
	}()
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 20000 {
		k := testKey(rng.IntN(300))
		switch r := rng.IntN(100); {
		case r < 60:
			tb.Put(k, Entry{Backend: uint32(rng.IntN(4)), Created: int64(i)})
		case r < 99:
			tb.Delete(k)
		default:
			tb.Reset()
		}
	}
	close(stop)
	wg.Wait()
	want := map[ClientKey]uint32{}
	tb.Range(func(k ClientKey, e Entry) bool { want[k] = e.Backend; return true })
	if len(want) != len(mirror) {
		t.Fatalf("mirror has %d keys, table %d", len(mirror), len(want))
	}
	for k, b := range want {
		if mirror[k] != b {
			t.Fatalf("mirror[%v] = %d, table %d", k, mirror[k], b)
		}
	}
	if resyncs == 0 || q.Resyncs() == 0 {
		t.Fatal("the queue never overflowed: the test does not test resync")
	}
	t.Logf("%d resyncs", resyncs)
}

// TestPutWithObserverNoBlock: a full queue nobody drains never blocks the
// writer.
func TestPutWithObserverNoBlock(t *testing.T) {
	tb := NewTable()
	tb.SetObserver(NewChangeQueue(1))
	done := make(chan struct{})
	go func() {
		for i := range 10000 {
			tb.Put(testKey(i), Entry{Backend: 1})
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Put blocked on a full observer queue")
	}
}
