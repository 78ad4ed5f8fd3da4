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
	cfg     BatchConfig
	queue   chan dataplane.Proposal
	requeue chan *raftlogv1.AffinityBatch // batches that failed to commit, sent again

	dropped   atomic.Uint64 // queue full, or too many held while no leader was reachable
	held      atomic.Int64  // proposals waiting for a leader (degraded), gauge
	requeued  atomic.Uint64 // proposals of failed batches put back to be sent again
	failed    atomic.Uint64 // batches not committed (raft error, or forwarding failed)
	proposed  atomic.Uint64 // handed to raft on this node (the leader)
	forwarded atomic.Uint64 // sent to the leader (on a follower)
	batches   atomic.Uint64 // batches handed to raft or forwarded
	received  atomic.Uint64 // proposals other nodes forwarded to this one
}

var _ dataplane.Proposer = (*batcher)(nil)

func newBatcher(cfg BatchConfig) *batcher {
	return &batcher{cfg: cfg, queue: make(chan dataplane.Proposal, cfg.QueueSize), requeue: make(chan *raftlogv1.AffinityBatch, cfg.MaxInflight)}
}

// holdRetry is how often a batch held while no leader is reachable is
// offered again.
const holdRetry = 250 * time.Millisecond

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

// merge puts a batch that failed to commit back into p, so its binds and
// touches are sent again (Apply is idempotent for both: first writer wins,
// last-seen only grows).
func (p *pending) merge(b *raftlogv1.AffinityBatch) {
	for _, x := range b.Binds {
		c, ok := clientFromBytes(x.Client)
		if !ok {
			continue
		}
		p.add(dataplane.Proposal{Kind: dataplane.ProposeBind, Key: dataplane.ClientKey{Service: x.ServiceId, Client: c}, Backend: x.BackendId, At: x.AtNs})
	}
	for _, x := range b.Touches {
		c, ok := clientFromBytes(x.Client)
		if !ok {
			continue
		}
		p.add(dataplane.Proposal{Kind: dataplane.ProposeTouch, Key: dataplane.ClientKey{Service: x.ServiceId, Client: c}, At: x.AtNs})
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
//
// Nothing is given up while the cluster is degraded: when no leader is
// reachable the batch is held (new proposals still merge into it, up to
// QueueSize distinct clients; beyond that they are dropped and counted) and
// offered again every holdRetry; a batch that fails to commit (a leader
// change, a forwarding error) is merged back and sent again. So a node cut
// off from its peers commits what its clients did once quorum returns.
func (b *batcher) run(ctx context.Context, sink batchSink) {
	type sent struct {
		f     batchFuture
		batch *raftlogv1.AffinityBatch
	}
	inflight := make(chan sent, b.cfg.MaxInflight)
	reaped := make(chan struct{})
	go func() {
		defer close(reaped)
		for s := range inflight {
			if err := s.f.Error(); err != nil {
				b.failed.Add(1)
				select {
				case b.requeue <- s.batch:
				default:
					b.dropped.Add(uint64(len(s.batch.Binds) + len(s.batch.Touches)))
				}
			}
		}
	}()
	defer func() {
		close(inflight)
		<-reaped
	}()

	p := &pending{binds: map[dataplane.ClientKey]struct{}{}, touches: map[dataplane.ClientKey]int{}}
	take := func(pr dataplane.Proposal) {
		if p.n >= b.cfg.QueueSize {
			b.dropped.Add(1)
			return
		}
		p.add(pr)
	}
	requeue := func(rb *raftlogv1.AffinityBatch) {
		n := uint64(len(rb.Binds) + len(rb.Touches))
		if p.n >= b.cfg.QueueSize {
			b.dropped.Add(n)
			return
		}
		b.requeued.Add(n)
		p.merge(rb)
	}
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	holding := false
	for {
		if holding {
			// Degraded: keep merging until it is time to offer the batch again.
			retry.Reset(holdRetry)
		wait:
			for {
				select {
				case <-ctx.Done():
					return
				case pr := <-b.queue:
					take(pr)
				case rb := <-b.requeue:
					requeue(rb)
				case <-retry.C:
					break wait
				}
			}
		} else {
			select {
			case <-ctx.Done():
				return
			case pr := <-b.queue:
				take(pr)
			case rb := <-b.requeue:
				requeue(rb)
			}
			linger.Reset(b.cfg.Linger)
		fill:
			for p.n < b.cfg.MaxBatch {
				select {
				case pr := <-b.queue:
					take(pr)
				case <-linger.C:
					break fill
				case <-ctx.Done():
					return
				}
			}
			linger.Stop()
		}
		f, ok := sink.submitBatch(&p.batch, p.n)
		if !ok {
			holding = true
			b.held.Store(int64(p.n))
			continue
		}
		holding = false
		b.held.Store(0)
		select {
		case inflight <- sent{f, &raftlogv1.AffinityBatch{Binds: p.batch.Binds, Touches: p.batch.Touches}}:
		case <-ctx.Done():
			return
		}
		p.reset()
	}
}
