package dataplane

import (
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
)

// flowKey identifies a client flow on one listener. It is a small
// comparable value rather than netip.AddrPort, whose zone pointer makes
// hashing slower and the key larger (see DESIGN.md).
type flowKey struct {
	addr Addr
	port uint16
}

// flow is one client addr:port on one VIP:port, with its upstream socket to
// one backend. The listener goroutine owns it; the flow's reply goroutine
// reads the upstream until the listener closes it.
type flow struct {
	// set once
	client      netip.AddrPort
	backendID   uint32
	backendAddr netip.Addr
	up          conn
	counters    *backendCounters // identifies service and backend ID
	svc         *serviceCounters

	// owned by the listener goroutine
	pacing pacing
	// handoverAt: when the flow last asked the kernel path (coarse Unix ns);
	// sweepAsked: a sweep asked it once its client was forwarded.
	handoverAt int64
	sweepAsked bool
	// kernel is the kernel path that carries the flow with its own
	// addresses (its Handover returned true), told by Release when the
	// flow goes; nil while only userspace carries it. kf is the flow as
	// the kernel sees it, set at the flow's first handover.
	kernel KernelPath
	kf     KernelFlow

	// shared with the reply goroutine
	lastActive atomic.Int64 // coarse Unix ns of the last datagram either way
	dead       atomic.Bool  // the reply goroutine stopped on an error
}

// replyLoop sends what the backend answers back to the client from the
// listener's socket, a batch at a time with one send call per batch.
func (l *listener) replyLoop(f *flow) {
	defer l.flowWG.Done()
	e := l.engine
	for {
		b, n, err := f.up.ReadBatch(e.pool)
		if err != nil {
			switch {
			case errors.Is(err, net.ErrClosed):
				return
			case isConnRefused(err):
				continue // ICMP port unreachable from the backend: keep the flow
			}
			f.dead.Store(true) // the listener replaces the flow on its next datagram
			return
		}
		// Compact away truncated datagrams; address the rest to the client.
		k, bytes, trunc := 0, uint64(0), uint64(0)
		for i := 0; i < n; i++ {
			if b.pkts[i].trunc {
				trunc++
				continue
			}
			b.pkts[i], b.pkts[k] = b.pkts[k], b.pkts[i]
			b.pkts[k].addr = f.client
			bytes += uint64(b.pkts[k].n)
			k++
		}
		sent, _ := l.conn.WriteBatch(b, b.pkts[:k])
		e.pool.put(b)
		f.lastActive.Store(e.now.Load())
		if sent > 0 {
			f.counters.replyPackets.Add(uint64(sent))
			f.counters.replyBytes.Add(bytes) // bytes of the batch, refused sends included
		}
		if refused := uint64(k - sent); refused > 0 {
			f.counters.drops.Add(refused)
			f.svc.drops[DropSendError].Add(refused)
		}
		if trunc > 0 {
			f.counters.drops.Add(trunc)
			f.svc.drops[DropTruncated].Add(trunc)
		}
	}
}
