package cluster

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/raft"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	raftlogv1 "github.com/ikelb/ikelb/proto/raftlog/v1"
	"google.golang.org/protobuf/proto"
)

// readYourWritesWait bounds how long a forwarded admin write waits for this
// node to apply the entry the leader committed, so that a read sent here
// right after it sees it. The write has succeeded either way.
const readYourWritesWait = time.Second

// forwarder is the applier the admin API writes through: on the leader it
// commits locally; on a follower it sends the entry to the leader's
// ClusterService.ForwardApply and, once committed there, waits (briefly) for
// this node to apply it too.
type forwarder struct{ n *Node }

var _ applier = forwarder{}

// applyEntry commits one admin write through the leader, holding it while
// there is none: a write that certainly did not reach the log
// (unappliedError: no leader known, an election, a leadership transfer) is
// sent again, with backoff, until it applies or ctx (without a deadline,
// ApplyTimeout) runs out. An operator's write during a failover then waits
// for the election instead of failing; Consul and Nomad hold RPCs the same
// way (RPCHoldTimeout). On the deadline the last error says why.
func (f forwarder) applyEntry(ctx context.Context, t entryType, m proto.Message) (applyResult, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, f.n.cfg.ApplyTimeout)
		defer cancel()
	}
	wait := 10 * time.Millisecond
	for {
		r, err := f.once(ctx, t, m)
		if err == nil || !isUnapplied(err) {
			return r, err
		}
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return r, err
		case <-timer.C:
		}
		wait = min(2*wait, 200*time.Millisecond)
	}
}

// once applies the write on this node if it leads, else forwards it to the
// leader.
func (f forwarder) once(ctx context.Context, t entryType, m proto.Message) (applyResult, error) {
	n := f.n
	if !n.running() {
		return applyResult{}, ErrShutdown
	}
	if n.members == nil || n.raft.State() == raft.Leader {
		return n.applyEntry(ctx, t, m)
	}
	req := &ikelbv1.ForwardApplyRequest{From: n.cfg.Name}
	switch m := m.(type) {
	case *raftlogv1.PutService:
		req.Entry = &ikelbv1.ForwardApplyRequest_PutService{PutService: m}
	case *raftlogv1.DeleteService:
		req.Entry = &ikelbv1.ForwardApplyRequest_DeleteService{DeleteService: m}
	case *raftlogv1.DeleteAffinities:
		req.Entry = &ikelbv1.ForwardApplyRequest_DeleteAffinities{DeleteAffinities: m}
	default:
		return applyResult{}, fmt.Errorf("%w: %v entries are not forwarded", ErrInvalid, t)
	}
	leader, c, err := n.leaderClient()
	if err != nil {
		return applyResult{}, err
	}
	resp, err := c.ForwardApply(ctx, req)
	if err != nil { // unapplied if the leader said so (RetryInfo)
		return applyResult{}, fmt.Errorf("forwarded to leader %s: %w", leader, errorFromStatus(err))
	}
	// Read your writes: wait for this node to apply the entry. raft's own
	// applied index covers an entry that arrived inside an installed
	// snapshot (FSM.Restore cannot know the snapshot's index).
	if n.raft.AppliedIndex() < resp.GetIndex() {
		wctx, cancel := context.WithTimeout(ctx, readYourWritesWait)
		defer cancel()
		_ = n.fsm.waitApplied(wctx, resp.GetIndex())
	}
	return applyResult{index: resp.GetIndex(), service: resp.GetService(), deleted: resp.GetDeleted()}, nil
}

// batchFuture is an affinity batch on its way: raft.ApplyFuture on the
// leader, a forwarded RPC on a follower.
type batchFuture interface {
	Error() error
}

// forwardFuture is a batch forwarded to the leader.
type forwardFuture struct {
	done chan struct{}
	err  error // set before done is closed
}

func (f *forwardFuture) Error() error {
	<-f.done
	return f.err
}

// submitBatch hands one affinity batch to raft on the leader, or forwards
// it to the leader's ClusterService on a follower, without waiting for
// either. The batcher bounds how many are in flight. Without a known
// leader the batch is dropped and counted: the dataplane goes on by the
// deterministic choice, and proposes again on the client's next packets.
func (n *Node) submitBatch(b *raftlogv1.AffinityBatch, proposals int) (batchFuture, bool) {
	if n.raft.State() == raft.Leader {
		data, err := encodeEntry(entryAffinityBatch, b)
		if err != nil {
			n.log.Error("encode affinity batch", "error", err)
			n.batcher.failed.Add(1)
			return nil, false
		}
		n.batcher.proposed.Add(uint64(proposals))
		n.batcher.batches.Add(1)
		return n.raft.Apply(data, n.cfg.ApplyTimeout), true
	}
	if n.members == nil {
		// No leader reachable: the batcher holds the batch and offers it again.
		return nil, false
	}
	_, c, err := n.leaderClient()
	if err != nil {
		// No leader reachable: the batcher holds the batch and offers it again.
		return nil, false
	}
	// The batcher reuses its pending batch once this returns; the RPC
	// marshals later, on another goroutine.
	req := &ikelbv1.ForwardBatchRequest{From: n.cfg.Name, Batch: proto.CloneOf(b)}
	f := &forwardFuture{done: make(chan struct{})}
	ok := n.tryGoroutine(func() {
		defer close(f.done)
		ctx, cancel := context.WithTimeout(n.ctx, n.cfg.ForwardTimeout)
		defer cancel()
		_, f.err = c.ForwardBatch(ctx, req)
	})
	if !ok {
		return nil, false
	}
	n.batcher.forwarded.Add(uint64(proposals))
	n.batcher.batches.Add(1)
	return f, true
}

// ClusterServer implements ikelbv1.ClusterServiceServer, the node-to-node
// API, on a Node. Register it on the same gRPC server as the AdminServer:
// members reach it at the admin address they gossip.
type ClusterServer struct {
	ikelbv1.UnimplementedClusterServiceServer

	node *Node
}

var _ ikelbv1.ClusterServiceServer = (*ClusterServer)(nil)

// NewClusterServer returns the node-to-node API of n. Register it with
// ikelbv1.RegisterClusterServiceServer.
func NewClusterServer(n *Node) *ClusterServer { return &ClusterServer{node: n} }

// ForwardBatch commits a follower's binds and touches. Expires are dropped:
// expiry is the leader's own decision.
func (s *ClusterServer) ForwardBatch(ctx context.Context, req *ikelbv1.ForwardBatchRequest) (*ikelbv1.ForwardBatchResponse, error) {
	b := req.GetBatch()
	if len(b.GetBinds())+len(b.GetTouches()) == 0 {
		return &ikelbv1.ForwardBatchResponse{}, nil
	}
	s.node.batcher.received.Add(uint64(len(b.GetBinds()) + len(b.GetTouches())))
	r, err := s.node.applyEntry(ctx, entryAffinityBatch, &raftlogv1.AffinityBatch{Binds: b.GetBinds(), Touches: b.GetTouches()})
	if err != nil {
		return nil, grpcError(err)
	}
	return &ikelbv1.ForwardBatchResponse{Index: r.index, Bound: r.bound, Kept: r.kept, Touched: r.touched}, nil
}

// ForwardApply commits a follower's admin write. It does not forward again:
// a node that is not the leader answers UNAVAILABLE.
func (s *ClusterServer) ForwardApply(ctx context.Context, req *ikelbv1.ForwardApplyRequest) (*ikelbv1.ForwardApplyResponse, error) {
	var (
		t entryType
		m proto.Message
	)
	switch e := req.GetEntry().(type) {
	case *ikelbv1.ForwardApplyRequest_PutService:
		t, m = entryPutService, e.PutService
	case *ikelbv1.ForwardApplyRequest_DeleteService:
		t, m = entryDeleteService, e.DeleteService
	case *ikelbv1.ForwardApplyRequest_DeleteAffinities:
		t, m = entryDeleteAffinities, e.DeleteAffinities
	default:
		return nil, grpcError(fmt.Errorf("%w: no entry", ErrInvalid))
	}
	r, err := s.node.applyEntry(ctx, t, m)
	if err != nil {
		return nil, grpcError(err)
	}
	return &ikelbv1.ForwardApplyResponse{Index: r.index, Service: r.service, Deleted: r.deleted}, nil
}

// GetStats reports this node's Raft progress.
func (s *ClusterServer) GetStats(context.Context, *ikelbv1.GetStatsRequest) (*ikelbv1.GetStatsResponse, error) {
	st := s.node.Status()
	return &ikelbv1.GetStatsResponse{
		Name: st.Name, RaftState: st.RaftState, Term: st.Term, LastIndex: st.LastIndex,
		CommitIndex: st.CommitIndex, AppliedIndex: st.AppliedIndex, Role: st.Role, Degraded: st.Degraded,
	}, nil
}
