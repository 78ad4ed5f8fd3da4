package dataplane

import "sync/atomic"

// ChangeQueue is the TableObserver to install with Table.SetObserver: it
// hands changed keys from the table's writer to one consumer through a
// bounded queue and never blocks the writer. When the queue is full (or
// the table is Reset) it drops the change and asks the consumer to resync
// the whole table from Range instead; since the consumer reads the current
// entry of each key (Lookup), a resync plus the changes queued after it
// converge on the table's state.
//
// The consumer waits on Ready and calls Take; only one goroutine may
// consume.
type ChangeQueue struct {
	ch      chan ClientKey
	ready   chan struct{} // capacity 1: "something to take"
	resync  atomic.Bool
	resyncs atomic.Uint64 // overflows and resets
}

// NewChangeQueue returns a queue holding up to size keys (at least 1).
func NewChangeQueue(size int) *ChangeQueue {
	return &ChangeQueue{ch: make(chan ClientKey, max(size, 1)), ready: make(chan struct{}, 1)}
}

// Changed queues k; on overflow it signals a resync instead. Never blocks.
func (q *ChangeQueue) Changed(k ClientKey) {
	select {
	case q.ch <- k:
	default:
		q.needResync()
		return
	}
	q.wake()
}

// Reset signals a resync. Never blocks.
func (q *ChangeQueue) Reset() { q.needResync() }

func (q *ChangeQueue) needResync() {
	if !q.resync.Swap(true) {
		q.resyncs.Add(1)
	}
	q.wake()
}

func (q *ChangeQueue) wake() {
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// Ready receives when Changed or Reset was called since the last receive.
func (q *ChangeQueue) Ready() <-chan struct{} { return q.ready }

// Take appends the queued keys to buf (up to max, if max > 0) and returns
// it, or returns resync = true (and buf unchanged) when the consumer must
// read the whole table with Range: the queue was full or the table was
// reset. The resync flag is cleared and the queue drained before Take
// returns, so a Range started afterwards sees every change not queued
// again. If keys remain after max, Ready is signalled again.
func (q *ChangeQueue) Take(buf []ClientKey, max int) (_ []ClientKey, resync bool) {
	if q.resync.Swap(false) {
		for {
			select {
			case <-q.ch:
				continue
			default:
			}
			return buf, true
		}
	}
	for n := 0; max <= 0 || n < max; n++ {
		select {
		case k := <-q.ch:
			buf = append(buf, k)
			continue
		default:
		}
		return buf, false
	}
	if len(q.ch) > 0 {
		q.wake()
	}
	return buf, false
}

// Resyncs counts the resyncs asked for (overflows and resets), since New.
func (q *ChangeQueue) Resyncs() uint64 { return q.resyncs.Load() }
