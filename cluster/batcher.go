package cluster

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/ikelb/ikelb/dataplane"
	raftlogv1 "github.com/ikelb/ikelb/proto/raftlog/v1"
)

// batcher implements dataplane.Proposer: Propose puts a proposal on a
// bounded queue without blocking, and one goroutine packs the queue into
// AffinityBatch entries of up to MaxBatch proposals, waiting at most Linger
// for a batch to fill. Within a batch, repeated binds of one client keep the
// first (the FSM would too) and repeated touches keep the latest time.
type batcher struct {
	// Set once.
	cfg   BatchConfig
	queue chan dataplane.Proposal

	dropped   atomic.Uint64 // queue full
	notLeader atomic.Uint64 // dropped because no leader was known
	failed    atomic.Uint64 // batches not committed (raft error, or forwarding failed)
	proposed  atomic.Uint64 // handed to raft on this node (the leader)
	forwarded atomic.Uint64 // sent to the leader (on a follower)
	batches   atomic.Uint64 // batches handed to raft or forwarded
	received  atomic.Uint64 // proposals other nodes forwarded to this one
}

var _ dataplane.Proposer = (*batcher)(nil)

func newBatcher(cfg BatchConfig) *batcher {
	return &batcher{cfg: cfg, queue: make(chan dataplane.Proposal, cfg.QueueSize)}
}

// Propose enqueues p; when the queue is full it counts p as dropped and
// returns false. It never blocks.
func (b *batcher) Propose(p dataplane.Proposal) bool {
	select {
	case b.queue <- p:
		return true
	default:
		b.dropped.Add(1)
		return false
	}
}

// pending is one batch being filled.
type pending struct {
	batch   raftlogv1.AffinityBatch
	binds   map[dataplane.ClientKey]struct{}
	touches map[dataplane.ClientKey]int // index in batch.Touches
	n       int                         // proposals taken, including coalesced ones
}

func (p *pending) reset() {
	p.batch = raftlogv1.AffinityBatch{}
	clear(p.binds)
	clear(p.touches)
	p.n = 0
}

func (p *pending) add(pr dataplane.Proposal) {
	p.n++
	switch pr.Kind {
	case dataplane.ProposeBind:
		if _, ok := p.binds[pr.Key]; ok {
			return
		}
		p.binds[pr.Key] = struct{}{}
		p.batch.Binds = append(p.batch.Binds, &raftlogv1.Bind{
			ServiceId: pr.Key.Service, Client: clientBytes(pr.Key.Client), BackendId: pr.Backend, AtNs: pr.At,
		})
	case dataplane.ProposeTouch:
		if i, ok := p.touches[pr.Key]; ok {
			if t := p.batch.Touches[i]; pr.At > t.AtNs {
				t.AtNs = pr.At
			}
			return
		}
		p.touches[pr.Key] = len(p.batch.Touches)
		p.batch.Touches = append(p.batch.Touches, &raftlogv1.Touch{
			ServiceId: pr.Key.Service, Client: clientBytes(pr.Key.Client), AtNs: pr.At,
		})
	}
}

func clientBytes(a dataplane.Addr) []byte {
	b := make([]byte, 16)
	copy(b, a[:])
	return b
}

// batchSink commits affinity batches; the Node implements it (raft on the
// leader, forwarding to the leader on a follower).
type batchSink interface {
	// submitBatch hands one batch on without waiting for it to commit; it
	// returns the future, or false if the batch was dropped. b is reused
	// once it returns.
	submitBatch(b *raftlogv1.AffinityBatch, proposals int) (batchFuture, bool)
}

// run packs proposals into batches until ctx is done. Up to MaxInflight
// batches wait for commit at once, on a second goroutine that run owns.
func (b *batcher) run(ctx context.Context, sink batchSink) {
	inflight := make(chan batchFuture, b.cfg.MaxInflight)
	reaped := make(chan struct{})
	go func() {
		defer close(reaped)
		for f := range inflight {
			if err := f.Error(); err != nil {
				b.failed.Add(1)
			}
		}
	}()
	defer func() {
		close(inflight)
		<-reaped
	}()

	p := &pending{binds: map[dataplane.ClientKey]struct{}{}, touches: map[dataplane.ClientKey]int{}}
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case pr := <-b.queue:
			p.add(pr)
		}
		linger.Reset(b.cfg.Linger)
	fill:
		for p.n < b.cfg.MaxBatch {
			select {
			case pr := <-b.queue:
				p.add(pr)
			case <-linger.C:
				break fill
			case <-ctx.Done():
				return
			}
		}
		linger.Stop()
		if f, ok := sink.submitBatch(&p.batch, p.n); ok {
			select {
			case inflight <- f:
			case <-ctx.Done():
				return
			}
		}
		p.reset()
	}
}
