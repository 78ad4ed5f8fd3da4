package dataplane

import (
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"unsafe"
)

func TestTableBasic(t *testing.T) {
	for _, name := range []string{"new", "zero"} {
		t.Run(name, func(t *testing.T) {
			tb := NewTable()
			if name == "zero" {
				tb = &Table{}
			}
			if _, ok := tb.Lookup(testKey(1)); ok || tb.Delete(testKey(1)) {
				t.Fatal("empty table has an entry")
			}
			const n = 5000 // several resizes
			for i := 0; i < n; i++ {
				tb.Put(testKey(i), Entry{Backend: uint32(i), Created: int64(i), LastSeen: int64(i)})
			}
			if tb.Len() != n {
				t.Fatalf("Len = %d, want %d", tb.Len(), n)
			}
			// Touch (same binding), rebind (new backend), delete.
			tb.Put(testKey(1), Entry{Backend: 1, Created: 1, LastSeen: 99})
			tb.Put(testKey(2), Entry{Backend: 7, Created: 50, LastSeen: 50})
			if !tb.Delete(testKey(3)) || tb.Delete(testKey(3)) {
				t.Fatal("Delete(3) twice")
			}
			want := map[ClientKey]Entry{}
			for i := 0; i < n; i++ {
				want[testKey(i)] = Entry{Backend: uint32(i), Created: int64(i), LastSeen: int64(i)}
			}
			want[testKey(1)] = Entry{Backend: 1, Created: 1, LastSeen: 99}
			want[testKey(2)] = Entry{Backend: 7, Created: 50, LastSeen: 50}
			delete(want, testKey(3))
			if tb.Len() != len(want) {
				t.Fatalf("Len = %d, want %d", tb.Len(), len(want))
			}
			for k, e := range want {
				if got, ok := tb.Get(k); !ok || got != e {
					t.Fatalf("Get(%v) = %v %v, want %v", k, got, ok, e)
				}
			}
			seen := 0
			tb.Range(func(k ClientKey, e Entry) bool {
				if want[k] != e {
					t.Errorf("Range: %v = %v, want %v", k, e, want[k])
				}
				seen++
				return true
			})
			if seen != len(want) {
				t.Fatalf("Range saw %d, want %d", seen, len(want))
			}
			stopped := 0
			tb.Range(func(ClientKey, Entry) bool { stopped++; return stopped < 3 })
			if stopped != 3 {
				t.Fatalf("Range did not stop: %d calls", stopped)
			}
			tb.Reset()
			if _, ok := tb.Lookup(testKey(5)); ok || tb.Len() != 0 {
				t.Fatal("Reset left entries")
			}
		})
	}
}

func TestTableV6AndServicesDistinct(t *testing.T) {
	tb := NewTable()
	a := AddrFrom(netip.MustParseAddr("2001:db8::1"))
	tb.Put(ClientKey{1, a}, Entry{Backend: 1})
	tb.Put(ClientKey{2, a}, Entry{Backend: 2})
	if e, _ := tb.Lookup(ClientKey{1, a}); e.Backend != 1 {
		t.Fatalf("service 1: %v", e)
	}
	if e, _ := tb.Lookup(ClientKey{2, a}); e.Backend != 2 {
		t.Fatalf("service 2: %v", e)
	}
}

// TestTableConcurrent runs readers against one writer that inserts, touches,
// rebinds, deletes, resizes and resets. Every entry the writer stores has
// Created == Backend*1000 + key, so a reader that sees a torn entry or a
// half-linked chain fails. Run it with -race.
func TestTableConcurrent(t *testing.T) {
	tb := NewTable()
	const keys = 4000
	var stop atomic.Bool
	var wg sync.WaitGroup
	var reads atomic.Int64
	for r := 0; r < 3; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				k := i % keys
				if e, ok := tb.Lookup(testKey(k)); ok && e.Created != int64(e.Backend)*1000+int64(k) {
					t.Errorf("torn entry for %d: %+v", k, e)
					return
				}
				reads.Add(1)
			}
		}()
	}
	wg.Add(1)
	go func() { // a Range reader too
		defer wg.Done()
		for !stop.Load() {
			tb.Range(func(k ClientKey, e Entry) bool { return true })
		}
	}()
	// At least 4 rounds, and on until the readers have overlapped the writer.
	for round := 0; round < 4 || (reads.Load() < 10000 && round < 1000); round++ {
		for i := 0; i < keys; i++ {
			b := uint32(round%3 + 1)
			tb.Put(testKey(i), Entry{Backend: b, Created: int64(b)*1000 + int64(i), LastSeen: int64(round)})
			if i%7 == 0 {
				tb.Delete(testKey(i / 2))
			}
		}
		if round%3 == 2 {
			tb.Reset()
		}
	}
	stop.Store(true)
	wg.Wait()
	if reads.Load() < 10000 {
		t.Fatalf("readers overlapped the writer for only %d reads", reads.Load())
	}
}

// TestTableMemory measures heap bytes per entry at 1,000,000 entries; the
// target is ≤ 150 B.
func TestTableMemory(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("1M entries; measured without -short and -race")
	}
	const n = 1_000_000
	keys := make([]ClientKey, n)
	for i := range keys {
		keys[i] = testKey(i)
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	tb := NewTable()
	for i, k := range keys {
		tb.Put(k, Entry{Backend: uint32(i % 5), Created: int64(i), LastSeen: int64(i)})
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / n
	t.Logf("table: %.1f bytes/entry at %d entries (%d buckets)", per, tb.Len(), len(tb.buckets.Load().slots))
	if per > 150 {
		t.Errorf("%.1f bytes/entry, target ≤ 150", per)
	}
	runtime.KeepAlive(tb)
	runtime.KeepAlive(keys)
}

func BenchmarkTableLookup(b *testing.B) {
	tb := NewTable()
	const n = 100_000
	keys := make([]ClientKey, n)
	for i := range keys {
		keys[i] = testKey(i)
		tb.Put(keys[i], Entry{Backend: 1})
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, ok := tb.Lookup(keys[i%n]); !ok {
			b.Fatal("miss")
		}
	}
}

// BenchmarkTableLookupParallel: readers on every P while nothing writes.
func BenchmarkTableLookupParallel(b *testing.B) {
	tb := NewTable()
	const n = 100_000
	for i := 0; i < n; i++ {
		tb.Put(testKey(i), Entry{Backend: 1})
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			tb.Lookup(testKey(i % n))
			i++
		}
	})
}

// BenchmarkGoMapBaseline is the baseline for BenchmarkTableLookup: a plain Go
// map (not safe for concurrent writes) with the same keys.
func BenchmarkGoMapBaseline(b *testing.B) {
	m := map[ClientKey]Entry{}
	const n = 100_000
	keys := make([]ClientKey, n)
	for i := range keys {
		keys[i] = testKey(i)
		m[keys[i]] = Entry{Backend: 1}
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if _, ok := m[keys[i%n]]; !ok {
			b.Fatal("miss")
		}
	}
}

// netipKey is the ClientKey layout not chosen: it carries netip.Addr.
type netipKey struct {
	Service uint32
	Client  netip.Addr
}

// BenchmarkKeyLayout compares map lookups keyed by ClientKey ([16]byte
// address, 20 bytes) and by netipKey (netip.Addr with its zone handle, 32
// bytes); DESIGN.md quotes the result.
func BenchmarkKeyLayout(b *testing.B) {
	const n = 100_000
	b.Run("ClientKey", func(b *testing.B) {
		m := map[ClientKey]Entry{}
		keys := make([]ClientKey, n)
		for i := range keys {
			keys[i] = testKey(i)
			m[keys[i]] = Entry{}
		}
		b.ReportMetric(float64(unsafe.Sizeof(ClientKey{})), "key_bytes")
		for i := 0; b.Loop(); i++ {
			_ = m[keys[i%n]]
		}
	})
	b.Run("netipKey", func(b *testing.B) {
		m := map[netipKey]Entry{}
		keys := make([]netipKey, n)
		for i := range keys {
			k := testKey(i)
			keys[i] = netipKey{k.Service, k.Client.Netip()}
			m[keys[i]] = Entry{}
		}
		b.ReportMetric(float64(unsafe.Sizeof(netipKey{})), "key_bytes")
		for i := 0; b.Loop(); i++ {
			_ = m[keys[i%n]]
		}
	})
}

func TestNodeSize(t *testing.T) {
	if s := unsafe.Sizeof(tableNode{}); unsafe.Sizeof(uintptr(0)) == 8 && s != 48 {
		t.Errorf("tableNode is %d bytes, DESIGN.md says 48", s)
	}
}
