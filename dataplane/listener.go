package dataplane

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// listener owns one VIP:port socket, its read loop and the client flows
// that arrived on it. Its goroutine is the only one that touches flows (the
// map and each flow's pacing); each flow's reply goroutine is waited for
// before the listener's goroutine ends.
type listener struct {
	// set once
	engine *Engine
	addr   netip.AddrPort
	conn   conn
	log    *slog.Logger
	done   chan struct{} // closed when run has returned
	mode   Mode          // the forwarding mode it was opened for
	raw    rawConn       // transparent: the raw socket (nil in nat mode)

	svc atomic.Pointer[serviceView] // the committed service, swapped by SetServices

	// owned by the run goroutine
	flows  map[flowKey]*flow
	flowWG sync.WaitGroup
	tally  tally
	target []*flow // per batch slot: where it goes
	tindex []int   // per batch slot: backend index

	rb *rawBatch // transparent: packets being built
	// flows replaced during the batch being handled: closed once its
	// datagrams are sent (earlier slots of the batch may still use them)
	retired []*flow
	ident   uint32 // transparent: last IP fragment identification

	flowErrs    int // upstream sockets that failed to open since the last sweep
	lastFlowErr error
}

// newListener makes the listener of c for sv; raw is its raw socket in
// transparent mode (the listener closes it).
func newListener(e *Engine, c conn, raw rawConn, sv *serviceView) *listener {
	l := &listener{
		engine: e,
		mode:   sv.svc.Mode,
		raw:    raw,
		addr:   c.LocalAddr(),
		conn:   c,
		log:    e.log.With(slog.String("listen_addr", c.LocalAddr().String())),
		done:   make(chan struct{}),
		flows:  make(map[flowKey]*flow),
		target: make([]*flow, e.cfg.BatchSize),
		tindex: make([]int, e.cfg.BatchSize),
	}
	if raw != nil {
		// Room for a full batch of fragmented datagrams is not needed:
		// the builder flushes when the next datagram does not fit.
		l.rb = newRawBatch(max(2*e.cfg.BatchSize, 64))
	}
	l.svc.Store(sv)
	return l
}

// close stops the listener and waits for its goroutines.
func (l *listener) close() {
	l.conn.Close()
	<-l.done
	if l.raw != nil {
		l.raw.Close()
	}
}

func (l *listener) run() {
	defer close(l.done)
	defer l.closeAllFlows()
	e := l.engine
	sweep := e.cfg.SweepInterval
	_ = l.conn.SetReadDeadline(time.Now().Add(sweep))
	var readErrs int
	for {
		b, n, err := l.conn.ReadBatch(e.pool)
		if err != nil {
			switch {
			case errors.Is(err, net.ErrClosed):
				return
			case errors.Is(err, os.ErrDeadlineExceeded):
				l.sweep(e.now.Load())
				if readErrs > 0 {
					l.log.Warn("listener read errors", slog.Int("count", readErrs))
					readErrs = 0
				}
				if l.flowErrs > 0 {
					l.log.Warn("upstream sockets failed to open", slog.Int("count", l.flowErrs),
						slog.Any("last_error", l.lastFlowErr))
					l.flowErrs, l.lastFlowErr = 0, nil
				}
				_ = l.conn.SetReadDeadline(time.Now().Add(sweep))
			default:
				readErrs++ // logged, aggregated, on the next sweep
			}
			continue
		}
		l.handleBatch(b, n, e.now.Load())
		e.pool.put(b)
	}
}

// handleBatch decides each datagram, then sends runs of datagrams that go
// to the same flow with one batched write each. Counters are flushed once.
func (l *listener) handleBatch(b *batch, n int, now int64) {
	e := l.engine
	sv := l.svc.Load()
	t := &l.tally
	t.reset(sv)
	port := l.addr.Port()
	for i := 0; i < n; i++ {
		p := &b.pkts[i]
		l.target[i] = nil
		if p.trunc {
			t.drops[DropTruncated]++
			continue
		}
		fk := flowKey{addr: AddrFrom(p.addr.Addr()), port: p.addr.Port()}
		f := l.flows[fk]
		var pc pacing
		if f != nil {
			pc = f.pacing
		}
		d := decide(sv, e.table, fk.addr, port, p.buf[:p.n], pc, now)
		t.classes[d.class]++
		if d.propose {
			e.proposer.Propose(d.proposal)
		}
		if d.verdict == verdictDrop {
			t.drops[d.reason]++
			continue
		}
		be := &sv.backends[d.backend]
		if f == nil || f.counters != sv.counters[d.backend] || f.backendAddr != be.Addr || f.dead.Load() {
			var reason DropReason
			f, reason = l.replaceFlow(fk, p.addr, sv, d.backend, f, now)
			if f == nil {
				if reason == DropFlowLimit && l.raw == nil {
					// No flow to ask later: a client the kernel
					// forwards would stay here, dropped, while its
					// conntrack entry to the listener lives.
					l.handover(nil, sv, fk, p.addr, now)
				}
				t.drops[reason]++
				t.backends[d.backend].drops++
				continue
			}
		}
		f.pacing = d.pacing
		if f.lastActive.Load() != now {
			f.lastActive.Store(now)
		}
		if f.up != nil && now-f.handoverAt >= int64(handoverEvery) {
			l.handover(f, sv, fk, p.addr, now)
		}
		l.target[i], l.tindex[i] = f, d.backend
		t.backends[d.backend].packets++
		t.backends[d.backend].bytes += uint64(p.n)
	}
	if l.raw != nil {
		l.forwardRaw(b, n, sv, t)
		t.flush(sv)
		l.closeRetired()
		return
	}
	for i := 0; i < n; {
		f := l.target[i]
		if f == nil {
			i++
			continue
		}
		j := i + 1
		for j < n && l.target[j] == f {
			j++
		}
		if sent, _ := f.up.WriteBatch(b, b.pkts[i:j]); sent < j-i {
			lost := uint64(j - i - sent)
			t.drops[DropSendError] += lost
			t.backends[l.tindex[i]].drops += lost
		}
		i = j
	}
	t.flush(sv)
	l.closeRetired()
}

// handoverEvery: how often a nat flow that still gets datagrams asks
// whether the kernel forwards its client.
const handoverEvery = 100 * time.Millisecond

// handover tells the kernel path about a nat flow whose client it
// forwards but whose datagrams still reach the listener (KernelPath); f is
// nil for a datagram the flow limit dropped. A flow the kernel path takes
// is kept, and released to that path when it closes (forgetFlow).
func (l *listener) handover(f *flow, sv *serviceView, fk flowKey, client netip.AddrPort, now int64) {
	kp, ok := l.engine.kernel.Load()
	if f == nil {
		if ok { // whether or not its binding committed yet: see KernelPath.Handover
			kp.Handover(KernelFlow{Service: sv.svc.ID, Client: client, Local: l.addr})
		}
		return
	}
	f.handoverAt = now
	if !ok || !kp.Forwards(ClientKey{Service: sv.svc.ID, Client: fk.addr}) {
		return
	}
	if !f.kf.Client.IsValid() {
		// The upstream is connected to the backend on the listener's
		// port (natForwarder).
		f.kf = KernelFlow{Service: sv.svc.ID, Client: client, Local: l.addr,
			Upstream: unmapAddrPort(f.up.LocalAddr()), Backend: netip.AddrPortFrom(f.backendAddr, l.addr.Port())}
	}
	if !kp.Handover(f.kf) || f.kernel == kp {
		return
	}
	if f.kernel != nil { // taken by a kernel path since replaced (SetKernelPath)
		f.kernel.Release(f.kf)
	}
	f.kernel = kp
}

func unmapAddrPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// closeRetired closes the upstreams of the flows replaced during the batch.
func (l *listener) closeRetired() {
	for i, f := range l.retired {
		if f.up != nil {
			f.up.Close()
		}
		l.retired[i] = nil
	}
	l.retired = l.retired[:0]
}

// replaceFlow closes old (if any) and opens a flow for client to
// sv.backends[bi]. It returns nil and the reason when it cannot.
func (l *listener) replaceFlow(fk flowKey, client netip.AddrPort, sv *serviceView, bi int, old *flow, now int64) (*flow, DropReason) {
	e := l.engine
	if old != nil {
		// Earlier datagrams of this batch may be bound for old: its
		// socket closes after the batch is sent.
		l.forgetFlow(fk, old)
		l.retired = append(l.retired, old)
	}
	// MaxFlows bounds upstream sockets: a transparent flow has none (its
	// datagrams leave by the listener's raw socket), so it is not counted.
	socket := sv.svc.Mode != ModeTransparent
	if socket && e.upstreams.Add(1) > int64(e.cfg.MaxFlows) {
		e.upstreams.Add(-1)
		return nil, DropFlowLimit
	}
	be := &sv.backends[bi]
	up, err := forwarderFor(sv.svc.Mode, e.cfg.sockets).upstream(sv, client, l.addr, be.Addr)
	if err != nil {
		if socket {
			e.upstreams.Add(-1)
		}
		l.flowErrs++
		l.lastFlowErr = err
		return nil, DropFlowError
	}
	e.flowCount.Add(1)
	f := &flow{client: client, backendID: be.ID, backendAddr: be.Addr, up: up, counters: sv.counters[bi], svc: sv.svcCounters}
	if old != nil {
		f.pacing = old.pacing
	}
	f.lastActive.Store(now)
	l.flows[fk] = f
	if up != nil { // transparent flows have no upstream: replies come by TPROXY
		l.flowWG.Add(1)
		go l.replyLoop(f)
	}
	return f, 0
}

// closeFlow removes f and closes its upstream, after the kernel path that
// carries it (if any) has been told.
func (l *listener) closeFlow(fk flowKey, f *flow) {
	l.forgetFlow(fk, f)
	if f.up != nil {
		f.up.Close()
	}
}

// forgetFlow removes f from the flows and the counts without closing it,
// and releases it to the kernel path that carries it.
func (l *listener) forgetFlow(fk flowKey, f *flow) {
	delete(l.flows, fk)
	l.engine.flowCount.Add(-1)
	if f.up != nil {
		l.engine.upstreams.Add(-1)
	}
	if f.kernel != nil {
		f.kernel.Release(f.kf)
		f.kernel = nil
	}
}

// sweep closes flows idle longer than the service's flow timeout (in
// userspace and, for a flow the kernel carries, in the kernel), flows
// whose reply goroutine stopped, and flows idle longer than HandoverIdle
// whose client the kernel forwards without them.
func (l *listener) sweep(now int64) {
	sv := l.svc.Load()
	if sv == nil {
		return
	}
	handover := int64(l.engine.cfg.HandoverIdle)
	kp, kernel := l.engine.kernel.Load()
	for fk, f := range l.flows {
		if f.kernel == nil && f.up != nil && !f.sweepAsked && kernel && kp.Forwards(ClientKey{Service: sv.svc.ID, Client: fk.addr}) {
			// Asked once here, not only at its next datagram: on a core
			// the traffic saturates, the listener reads a fraction of
			// it, and a flow may wait many seconds for a datagram of
			// its own to be read.
			f.sweepAsked = true
			l.handover(f, sv, fk, f.client, now)
		}
		idle := now - f.lastActive.Load()
		if f.kernel != nil && idle > sv.flowIdle {
			// Idle here; the kernel may still carry it.
			idle = min(idle, now-f.kernel.LastActive(f.kf))
		}
		switch {
		case idle > sv.flowIdle || f.dead.Load():
		case f.kernel == nil && idle > handover && kernel && kp.Forwards(ClientKey{Service: sv.svc.ID, Client: fk.addr}):
			// The kernel took the client over, through conntrack.
		default:
			continue
		}
		l.closeFlow(fk, f)
	}
}

func (l *listener) closeAllFlows() {
	for fk, f := range l.flows {
		l.closeFlow(fk, f)
	}
	l.flowWG.Wait()
}

// forwardRaw sends the batch's forwarded datagrams (target[i] != nil) to
// their backends as IP packets from the client's own address and port,
// with one sendmmsg per rawBatch.
func (l *listener) forwardRaw(b *batch, n int, sv *serviceView, t *tally) {
	rb := l.rb
	rb.n = 0
	port := l.addr.Port()
	for i := 0; i < n; i++ {
		if l.target[i] == nil {
			continue
		}
		bi := l.tindex[i]
		p := &b.pkts[i]
		dst := netip.AddrPortFrom(sv.backends[bi].Addr, port)
		mtu := defaultMTU
		if bi < len(sv.mtu) && sv.mtu[bi] > 0 {
			mtu = sv.mtu[bi]
		}
		if rb.add(p.buf[:p.n], p.addr, dst, mtu, i, &l.ident) {
			continue
		}
		l.sendRaw(t)
		if !rb.add(p.buf[:p.n], p.addr, dst, mtu, i, &l.ident) {
			t.drops[DropTruncated]++ // more fragments than a raw batch holds
			t.backends[bi].drops++
		}
	}
	l.sendRaw(t)
}

// sendRaw sends the pending raw batch and counts the datagrams the kernel
// refused (once each, however many of their fragments failed).
func (l *listener) sendRaw(t *tally) {
	rb := l.rb
	if rb.n == 0 {
		return
	}
	if sent, _ := l.raw.Send(rb); sent < rb.n {
		last := -1
		for i := 0; i < rb.n; i++ {
			m := &rb.msgs[i]
			if m.failed && m.slot != last {
				last = m.slot
				t.drops[DropSendError]++
				t.backends[l.tindex[m.slot]].drops++
			}
		}
	}
	rb.n = 0
}
