package cluster

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ikelb/ikelb/dataplane"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	"google.golang.org/protobuf/types/known/durationpb"
)

// TestLeaderLoopRestartedAfterCoalescedLoss: raft's LeaderCh keeps only the
// latest value, so lose-then-regain can arrive as true, true. The second
// true must start a fresh leader loop, both when the first one has already
// returned on its own (failed barrier) and when it is still running.
func TestLeaderLoopRestartedAfterCoalescedLoss(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	leaderCh := make(chan bool, 1)
	var (
		starts  atomic.Int32
		mu      sync.Mutex
		running []context.Context
	)
	loop := func(lctx context.Context) {
		if starts.Add(1) == 1 {
			return // the first term's loop gives up on its own (barrier failed)
		}
		mu.Lock()
		running = append(running, lctx)
		mu.Unlock()
		<-lctx.Done()
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runLeaderLoops(ctx, leaderCh, testLogger(t), loop)
	}()
	defer func() { cancel(); <-done }()

	leaderCh <- true
	waitFor(t, "first leader loop started", func() bool { return starts.Load() == 1 })
	leaderCh <- true // the false in between was overwritten
	waitFor(t, "leader loop restarted for the new term", func() bool { return starts.Load() == 2 })
	leaderCh <- true // again, while the second loop is still running
	waitFor(t, "leader loop restarted while the old one ran", func() bool { return starts.Load() == 3 })
	mu.Lock()
	first := running[0]
	mu.Unlock()
	if first.Err() == nil {
		t.Fatal("the previous term's leader loop was not stopped")
	}
	leaderCh <- false
	waitFor(t, "leader loop stopped on loss", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(running) == 2 && running[1].Err() != nil
	})
}

// TestExpireUsesCommittedTimeouts: expiry must judge idleness by the
// services as committed, not by the leader loop's possibly older copy: a
// service created, or whose timeout was raised, after that copy was taken
// must not have its clients expired.
func TestExpireUsesCommittedTimeouts(t *testing.T) {
	var offset atomic.Int64
	cfg := testConfig(t)
	cfg.Stores = inmemStores()
	cfg.ExpiryInterval = time.Hour // only the test calls expire
	cfg.Now = func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	n := startNode(t, cfg, nil)
	admin := NewAdminServer(n)
	ctx := context.Background()

	s := apiService("vpn", "10.0.0.1", "10.1.0.1")
	s.PersistenceTimeout = durationpb.New(time.Minute)
	mustCreate(t, n, s)
	// The leader loop's view would now hold vpn with a 1m timeout.
	s.PersistenceTimeout = durationpb.New(time.Hour)
	if _, err := admin.UpdateService(ctx, &ikelbv1.UpdateServiceRequest{Service: s}); err != nil {
		t.Fatal(err)
	}
	mustCreate(t, n, apiService("later", "10.0.0.2", "10.1.0.2"))

	now := cfg.Now().UnixNano()
	n.Proposer().Propose(dataplane.Proposal{Kind: dataplane.ProposeBind, Key: key(1, "192.0.2.1"), Backend: 1, At: now})
	n.Proposer().Propose(dataplane.Proposal{Kind: dataplane.ProposeBind, Key: key(2, "192.0.2.2"), Backend: 1, At: now})
	waitFor(t, "binds", func() bool { return n.Table().Len() == 2 })

	offset.Store(int64(2 * time.Minute)) // idle past the old timeout, not the new one
	n.expire(ctx)
	if got := n.Table().Len(); got != 2 {
		t.Fatalf("%d affinities left, want 2: live clients were expired", got)
	}
	offset.Store(int64(2 * time.Hour))
	n.expire(ctx)
	if got := n.Table().Len(); got != 0 {
		t.Fatalf("%d affinities left after 2h idle, want 0", got)
	}
}
