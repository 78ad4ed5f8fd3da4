package health

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/ikelb/ikelb/dataplane"
)

const (
	U = dataplane.HealthUnknown
	H = dataplane.HealthUp
	D = dataplane.HealthDown
)

func TestMachine(t *testing.T) {
	tests := []struct {
		name       string
		rise, fall int
		results    string // o = success, x = failure
		want       []dataplane.Health
	}{
		{"rise after 2", 2, 3, "oo", []dataplane.Health{H}},
		{"fall after 3 from unknown", 2, 3, "xxx", []dataplane.Health{D}},
		{"flap below rise stays unknown", 2, 3, "oxoxox", nil},
		{"up then down", 2, 3, "ooxxx", []dataplane.Health{H, D}},
		{"two failures do not bring down", 2, 3, "ooxxoxxo", []dataplane.Health{H}},
		{"down then up needs rise", 2, 3, "xxxoxoo", []dataplane.Health{D, H}},
		{"rise 1 fall 1 follows every result", 1, 1, "oxo", []dataplane.Health{H, D, H}},
		{"repeated success reports once", 1, 1, "oooo", []dataplane.Health{H}},
		{"repeated failure reports once", 2, 2, "xxxxxx", []dataplane.Health{D}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := newMachine(tc.rise, tc.fall)
			var got []dataplane.Health
			prev := U
			for _, r := range tc.results {
				from, to, changed := m.observe(r == 'o')
				if from != prev {
					t.Fatalf("from = %v, want previous %v", from, prev)
				}
				if changed {
					got = append(got, to)
				}
				prev = to
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("transitions %v, want %v", got, tc.want)
			}
		})
	}
}

// scriptProber answers from a per-address script of results ('o' success,
// 'x' failure; the last one repeats) and counts probes.
type scriptProber struct {
	mu      sync.Mutex
	scripts map[netip.Addr]string
	calls   map[netip.Addr]int
}

func (p *scriptProber) Probe(ctx context.Context, t Target) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.scripts[t.Addr]
	i := min(p.calls[t.Addr], len(s)-1)
	p.calls[t.Addr]++
	if s[i] == 'o' {
		return nil
	}
	return errors.New("scripted failure")
}

type recorder struct {
	mu  sync.Mutex
	got []Transition
}

func (r *recorder) add(tr Transition) {
	r.mu.Lock()
	r.got = append(r.got, tr)
	r.mu.Unlock()
}

func (r *recorder) take() []Transition {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.got
	r.got = nil
	return out
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), nil))
}

func TestCheckerTransitions(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := netip.MustParseAddr("192.0.2.1")
		b := netip.MustParseAddr("192.0.2.2")
		p := &scriptProber{
			scripts: map[netip.Addr]string{a: "ooxxxoo", b: "x"},
			calls:   map[netip.Addr]int{},
		}
		var rec recorder
		c := New(testLogger(t), rec.add, WithProber(p))
		defer c.Close()
		ka, kb := Key{1, 1}, Key{1, 2}
		if err := c.Update([]Target{
			{Key: ka, Addr: a, Type: TypeICMP, Interval: time.Second, Timeout: time.Second},
			{Key: kb, Addr: b, Type: TypeICMP, Interval: time.Second, Timeout: time.Second},
		}); err != nil {
			t.Fatal(err)
		}
		// Probes at t=0s,1s,...,6s: a goes up at 1s, down at 4s, up at 6s;
		// b goes down at 2s.
		want := []struct {
			at   time.Duration
			key  Key
			from dataplane.Health
			to   dataplane.Health
		}{
			{time.Second, ka, U, H},
			{2 * time.Second, kb, U, D},
			{4 * time.Second, ka, H, D},
			{6 * time.Second, ka, D, H},
		}
		start := time.Now()
		var got []Transition
		for range 7 {
			synctest.Wait()
			got = append(got, rec.take()...)
			time.Sleep(time.Second) // fake time: advances the bubble's clock
		}
		synctest.Wait()
		got = append(got, rec.take()...)
		if len(got) != len(want) {
			t.Fatalf("got %d transitions %+v, want %d", len(got), got, len(want))
		}
		for i, w := range want {
			g := got[i]
			if g.Key != w.key || g.From != w.from || g.To != w.to || g.At.Sub(start) != w.at {
				t.Errorf("transition %d = %v %v→%v at %v, want %v %v→%v at %v",
					i, g.Key, g.From, g.To, g.At.Sub(start), w.key, w.from, w.to, w.at)
			}
			if (g.To == D) != (g.Reason != nil) {
				t.Errorf("transition %d to %v has reason %v", i, g.To, g.Reason)
			}
		}
		st := c.Status()
		if len(st) != 2 {
			t.Fatalf("status has %d targets, want 2", len(st))
		}
		for _, s := range st {
			if s.Target.Key == kb && (s.Health != D || s.LastErr == nil || s.Target.Rise != DefaultRise) {
				t.Errorf("status of b = %+v, want down with an error and default rise", s)
			}
		}
	})
}

func TestCheckerUpdate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := netip.MustParseAddr("192.0.2.1")
		a2 := netip.MustParseAddr("192.0.2.9")
		p := &scriptProber{scripts: map[netip.Addr]string{a: "o", a2: "o"}, calls: map[netip.Addr]int{}}
		var rec recorder
		c := New(testLogger(t), rec.add, WithProber(p))
		k := Key{7, 1}
		ta := Target{Key: k, Addr: a, Type: TypeIKE, Interval: time.Second, Timeout: 500 * time.Millisecond, Rise: 1}
		for range 2 { // idempotent: the second Update changes nothing
			if err := c.Update([]Target{ta}); err != nil {
				t.Fatal(err)
			}
			synctest.Wait()
		}
		if got := rec.take(); len(got) != 1 || got[0].To != H {
			t.Fatalf("after start: %+v, want one unknown→up", got)
		}
		if got := c.Status()[0].Target.Port; got != DefaultIKEPort {
			t.Errorf("default IKE port %d, want %d", got, DefaultIKEPort)
		}

		// A changed address restarts the target from unknown.
		tb := ta
		tb.Addr = a2
		if err := c.Update([]Target{tb}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if got := rec.take(); len(got) != 1 || got[0].From != U || got[0].Addr != a2 {
			t.Fatalf("after change: %+v, want one unknown→up for %v", got, a2)
		}

		// Invalid targets are reported and skipped; valid ones still apply.
		err := c.Update([]Target{tb, {Key: Key{7, 2}, Type: TypeICMP}, {Key: Key{7, 3}, Addr: a, Type: 9}})
		if !errors.Is(err, ErrInvalidTarget) {
			t.Errorf("update with invalid targets: %v, want ErrInvalidTarget", err)
		}
		if n := len(c.Status()); n != 1 {
			t.Errorf("%d targets after invalid update, want 1", n)
		}

		// Removing stops probing.
		if err := c.Update(nil); err != nil {
			t.Fatal(err)
		}
		p.mu.Lock()
		calls := p.calls[a2]
		p.mu.Unlock()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		p.mu.Lock()
		after := p.calls[a2]
		p.mu.Unlock()
		if after != calls {
			t.Errorf("removed target probed %d more times", after-calls)
		}

		c.Close()
		c.Close() // idempotent
		if err := c.Update([]Target{ta}); err == nil {
			t.Error("update after close succeeded")
		}
		if got := rec.take(); len(got) != 0 {
			t.Errorf("transitions after removal/close: %+v", got)
		}
	})
}

func TestCheckerRunStopsOnContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := &scriptProber{scripts: map[netip.Addr]string{}, calls: map[netip.Addr]int{}}
		a := netip.MustParseAddr("192.0.2.1")
		p.scripts[a] = "o"
		c := New(nil, nil, WithProber(p))
		if err := c.Update([]Target{{Key: Key{1, 1}, Addr: a, Type: TypeICMP}}); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { c.Run(ctx); close(done) }()
		time.Sleep(time.Minute)
		cancel()
		synctest.Wait()
		select {
		case <-done:
		default:
			t.Fatal("Run did not return after cancel")
		}
		if n := len(c.Status()); n != 0 {
			t.Errorf("%d targets after Run returned", n)
		}
	})
}
