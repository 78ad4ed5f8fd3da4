package dataplane

import (
	"fmt"
	"math"
	"net/netip"
	"testing"
)

func testBackends(n int) []Backend {
	bs := make([]Backend, n)
	for i := range bs {
		bs[i] = Backend{ID: uint32(100 + i), Addr: netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}),
			Weight: 1, State: StateActive, Health: HealthUp}
	}
	return bs
}

func testKey(i int) ClientKey {
	return ClientKey{Service: 7, Client: AddrFrom(netip.AddrFrom4([4]byte{198, byte(i >> 16), byte(i >> 8), byte(i)}))}
}

func TestNegLog2(t *testing.T) {
	for _, x := range []uint64{1, 2, 3, 1 << 32, 12345678901234567, 1 << 63, 3 << 62, math.MaxUint64} {
		got := float64(negLog2(x)) / (1 << 32)
		want := 64 - math.Log2(float64(x|1))
		if math.Abs(got-want) > 1e-8 {
			t.Errorf("negLog2(%d) = %v, want %v", x, got, want)
		}
	}
	if negLog2(math.MaxUint64) < 1 {
		t.Error("negLog2 of max must stay positive")
	}
}

func TestPickWeights(t *testing.T) {
	bs := testBackends(3)
	for i := range bs {
		bs[i].Weight = uint32(i + 1)
	}
	const n = 120000
	counts := map[uint32]int{}
	for i := 0; i < n; i++ {
		b, ok := Pick(bs, testKey(i))
		if !ok {
			t.Fatal("no backend")
		}
		counts[b.ID]++
	}
	for i, b := range bs {
		want := float64(n) * float64(i+1) / 6
		if got := float64(counts[b.ID]); math.Abs(got-want)/want > 0.03 {
			t.Errorf("backend weight %d got %v clients, want %v ±3%%", b.Weight, got, want)
		}
	}
}

func TestPickRemoveAndAdd(t *testing.T) {
	const n, clients = 5, 50000
	bs := testBackends(n + 1)
	before := make([]uint32, clients)
	for i := range before {
		b, _ := Pick(bs[:n], testKey(i))
		before[i] = b.ID
	}

	// Remove backend 2 (and reorder the rest: order must not matter).
	removed := bs[2].ID
	less := []Backend{bs[4], bs[0], bs[3], bs[1]}
	moved := 0
	for i := range before {
		b, _ := Pick(less, testKey(i))
		if b.ID != before[i] {
			moved++
			if before[i] != removed {
				t.Fatalf("client %d moved from %d (not removed) to %d", i, before[i], b.ID)
			}
		} else if b.ID == removed {
			t.Fatalf("client %d still on removed backend", i)
		}
	}
	if f := float64(moved) / clients; math.Abs(f-1.0/n) > 0.02 {
		t.Errorf("removal moved %.3f of clients, want ≈ %.3f", f, 1.0/n)
	}

	// Add backend n: about 1/(n+1) move, all of them to it.
	moved = 0
	for i := range before {
		b, _ := Pick(bs, testKey(i))
		if b.ID != before[i] {
			moved++
			if b.ID != bs[n].ID {
				t.Fatalf("client %d moved to %d, not to the added backend", i, b.ID)
			}
		}
	}
	if f := float64(moved) / clients; math.Abs(f-1.0/(n+1)) > 0.02 {
		t.Errorf("adding moved %.3f of clients, want ≈ %.3f", f, 1.0/(n+1))
	}
}

func TestPickDeterministic(t *testing.T) {
	a := testBackends(4)
	// A second, independently built set: different IDs and order, same addresses.
	b := testBackends(4)
	b[0], b[3] = b[3], b[0]
	for i := range b {
		b[i].ID += 1000
	}
	for i := 0; i < 10000; i++ {
		x, _ := Pick(a, testKey(i))
		y, _ := Pick(b, testKey(i))
		if x.Addr != y.Addr {
			t.Fatalf("key %d: %v vs %v", i, x.Addr, y.Addr)
		}
	}
	// Pinned answers: a change to the hash would silently re-home clients
	// across a rolling upgrade, so it must show up here.
	var got []string
	for i := 0; i < 8; i++ {
		x, _ := Pick(a, testKey(i))
		got = append(got, x.Addr.String())
	}
	want := fmt.Sprint(pinnedPicks)
	if fmt.Sprint(got) != want {
		t.Errorf("pinned picks changed:\n got %v\nwant %v", got, want)
	}
}

var pinnedPicks = []string{"10.0.0.1", "10.0.0.0", "10.0.0.3", "10.0.0.0", "10.0.0.2", "10.0.0.3", "10.0.0.2", "10.0.0.2"}

func TestPickNone(t *testing.T) {
	bs := testBackends(3)
	if _, ok := Pick(nil, testKey(1)); ok {
		t.Error("empty set picked")
	}
	bs[0].State = StateDrain
	bs[1].Health = HealthDown
	bs[2].Weight = 0
	if _, ok := Pick(bs, testKey(1)); ok {
		t.Error("set without AcceptsNew picked")
	}
	bs[1].Health = HealthUnknown
	if b, ok := Pick(bs, testKey(1)); !ok || b.ID != bs[1].ID {
		t.Errorf("Pick = %v %v, want the unknown-health backend", b, ok)
	}
}

func BenchmarkPick(b *testing.B) {
	for _, n := range []int{2, 8, 32} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			bs := testBackends(n)
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				Pick(bs, testKey(i))
			}
		})
	}
}
