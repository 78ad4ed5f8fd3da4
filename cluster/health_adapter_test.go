package cluster

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/ikelb/ikelb/cluster/health"
)

type failingProber struct{}

func (failingProber) Probe(context.Context, health.Target) error { return errors.New("probe refused") }

func TestProbeCheckerReportsTransitions(t *testing.T) {
	var (
		mu  sync.Mutex
		got []HealthTransition
	)
	c := NewProbeChecker(nil, health.WithProber(failingProber{}))(func(tr HealthTransition) {
		mu.Lock()
		got = append(got, tr)
		mu.Unlock()
	})
	defer c.Close()
	c.Update([]HealthTarget{{
		Service: 3, Backend: 4, Addr: netip.MustParseAddr("127.0.0.1"), Type: HealthCheckICMP,
		Interval: 10 * time.Millisecond, Timeout: 5 * time.Millisecond, Rise: 1, Fall: 1,
	}})
	waitFor(t, "a down transition", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got) > 0
	})
	mu.Lock()
	defer mu.Unlock()
	if tr := got[0]; tr.Service != 3 || tr.Backend != 4 || tr.Up || tr.Err != "probe refused" {
		t.Fatalf("transition %+v", tr)
	}
}
