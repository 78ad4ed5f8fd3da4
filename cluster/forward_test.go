package cluster

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

// An admin write sent while the cluster has no leader waits for one
// instead of failing: the voter left alone knows no leader, the write is
// held, and it applies once the other voter is back and one is elected.
func TestAdminWriteHeldForLeader(t *testing.T) {
	c := newTestCluster(t, clusterRaft, time.Minute) // no dead-server removal
	n1 := c.add("n1", false)
	n2 := c.add("n2", false)
	c.waitVoters(10*time.Second, "n1", "n2")
	l, other := stopLeader(t, c, n1, n2)

	admin := NewAdminServer(other.node)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := admin.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: apiService("vpn", "10.0.0.1", "10.1.0.1")})
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("the write returned %v while no leader was known; want it held", err)
	case <-time.After(500 * time.Millisecond):
	}
	c.start(l)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("held write: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("held write did not apply within 15 s of the leader's return")
	}
	if _, err := admin.GetService(ctx, &ikelbv1.GetServiceRequest{Name: "vpn"}); err != nil {
		t.Fatalf("service after the held write: %v", err)
	}

	// Without a leader until its deadline, the write fails UNAVAILABLE
	// with the reason and RetryInfo.
	_, follower := stopLeader(t, c, n1, n2)
	short, cancelShort := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancelShort()
	start := time.Now()
	_, err := NewAdminServer(follower.node).DeleteService(short, &ikelbv1.DeleteServiceRequest{Name: "vpn"})
	st := status.Convert(err)
	if st.Code() != codes.Unavailable || !hasRetryInfo(st) || time.Since(start) < 250*time.Millisecond {
		t.Fatalf("write without a leader: %v after %v; want UNAVAILABLE with RetryInfo at the deadline", err, time.Since(start))
	}
}

// stopLeader stops the leader of the two-voter cluster a, b and waits
// until the other, left alone, knows no leader.
func stopLeader(t *testing.T, c *testCluster, a, b *testNode) (stopped, alone *testNode) {
	t.Helper()
	stopped, alone = c.leader(), b
	if stopped == b {
		alone = a
	}
	stopped.stop(t)
	waitWithin(t, 5*time.Second, alone.name+" knows no leader", func() bool {
		_, id := alone.node.raft.LeaderWithID()
		return id == ""
	})
	return stopped, alone
}

func hasRetryInfo(st *status.Status) bool {
	for _, d := range st.Details() {
		if _, ok := d.(*errdetails.RetryInfo); ok {
			return true
		}
	}
	return false
}

// Only writes that certainly missed the log carry RetryInfo, and it
// survives the trip through another node's ClusterService.
func TestUnappliedErrorsCrossNodes(t *testing.T) {
	unapplied := unappliedError{fmt.Errorf("%w: no leader is known", ErrNotLeader)}
	maybe := fmt.Errorf("%w (leadership lost while committing command)", ErrNotLeader)

	st := status.Convert(grpcError(unapplied))
	if st.Code() != codes.Unavailable || !hasRetryInfo(st) {
		t.Fatalf("unapplied: %v, RetryInfo %v; want UNAVAILABLE with RetryInfo", st, hasRetryInfo(st))
	}
	back := errorFromStatus(grpcError(unapplied))
	if !isUnapplied(back) || !errors.Is(back, ErrNotLeader) {
		t.Fatalf("unapplied back from gRPC: %v (unapplied %v)", back, isUnapplied(back))
	}
	if isUnapplied(fmt.Errorf("forwarded to leader n1: %w", back)) != true {
		t.Fatal("wrapping lost the mark")
	}

	st = status.Convert(grpcError(maybe))
	if st.Code() != codes.Unavailable || hasRetryInfo(st) {
		t.Fatalf("maybe applied: %v, RetryInfo %v; want UNAVAILABLE without", st, hasRetryInfo(st))
	}
	if back := errorFromStatus(grpcError(maybe)); isUnapplied(back) || !errors.Is(back, ErrNotLeader) {
		t.Fatalf("maybe applied back from gRPC: %v (unapplied %v)", back, isUnapplied(back))
	}
	if isUnapplied(errorFromStatus(status.Error(codes.Unavailable, "connection refused"))) {
		t.Fatal("a transport error is marked unapplied")
	}
}
