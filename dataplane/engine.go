package dataplane

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Engine is the packet path: one UDP listener per VIP:port of the committed
// services, forwarding each client's datagrams to the backend its committed
// affinity (or, before that commits, Pick) names, and proposing bindings and
// touches without ever waiting for them.
type Engine struct {
	// set once
	cfg      Config
	log      *slog.Logger
	table    *Table
	proposer Proposer
	pool     *batchPool
	cancel   context.CancelFunc
	wg       sync.WaitGroup // the clock goroutine

	now       atomic.Int64 // coarse clock, Unix ns, updated every ClockTick
	flowCount atomic.Int64 // open flows, all listeners
	upstreams atomic.Int64 // of which with an upstream socket (nat), bounded by MaxFlows
	kernel    swappable[KernelPath]

	// Transparent mode's reply path: backend:port → listener, rebuilt by
	// SetServices; replies matching no route are counted.
	replyRoutes      atomic.Pointer[map[replyKey]*replyRoute]
	unmatchedReplies atomic.Uint64

	mu        sync.Mutex // guards the following
	closed    bool
	listeners map[netip.AddrPort]*listener
	views     map[uint32]*serviceView // the committed set, by service ID
	counters  map[uint32]*serviceCounters
	reply4    replyConn // transparent reply sockets, opened when first needed
	reply6    replyConn
}

// New starts an engine with no services.
func New(cfg Config) (*Engine, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if nofile, ok := openFileLimit(); ok && cfg.MaxFlows > flowRoom(nofile) {
		cfg.Logger.Warn("NAT flows capped below the open-file limit; raise it (systemd LimitNOFILE=) for more concurrent userspace flows",
			"max_flows", flowRoom(nofile), "configured", cfg.MaxFlows, "open_file_limit", nofile)
		cfg.MaxFlows = flowRoom(nofile)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &Engine{
		cfg:      cfg,
		log:      cfg.Logger,
		table:    cfg.Table,
		proposer: cfg.Proposer,
		// A batch is held only while its socket has data, so about one per
		// running goroutine is in use; keep a few per P, allocate (and let
		// the GC take) beyond that.
		pool:      newBatchPool(max(8, 4*runtime.GOMAXPROCS(0)), cfg.BatchSize, cfg.MaxDatagram),
		cancel:    cancel,
		listeners: make(map[netip.AddrPort]*listener),
		views:     make(map[uint32]*serviceView),
		counters:  make(map[uint32]*serviceCounters),
	}
	e.now.Store(cfg.Now())
	e.wg.Add(1)
	go e.runClock(ctx)
	return e, nil
}

func (e *Engine) runClock(ctx context.Context) {
	defer e.wg.Done()
	t := time.NewTicker(e.cfg.ClockTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			e.now.Store(e.cfg.Now())
		}
	}
}

// SetServices makes services the committed set: it swaps each listener's
// service atomically, opens listeners for new VIP:ports and closes (and
// waits for) those of removed ones. An invalid set changes nothing. A
// listener that cannot be opened is reported (ErrListen, naming the address)
// while the rest of the set is applied.
func (e *Engine) SetServices(services []Service) error {
	want := make(map[netip.AddrPort]uint32)
	ids := make(map[uint32]bool)
	replyFrom := make(map[replyKey]uint32) // transparent backend:port → service
	for i := range services {
		s := &services[i]
		if err := validateService(s); err != nil {
			return err
		}
		if ids[s.ID] {
			return fmt.Errorf("%w: service id %d twice", ErrInvalidService, s.ID)
		}
		ids[s.ID] = true
		for _, p := range s.Ports {
			ap := netip.AddrPortFrom(s.VIP.Unmap(), p)
			if other, dup := want[ap]; dup {
				return fmt.Errorf("%w: %s in services %d and %d", ErrInvalidService, ap, other, s.ID)
			}
			want[ap] = s.ID
			if s.Mode != ModeTransparent {
				continue
			}
			for _, b := range s.Backends {
				k := replyKey{addr: AddrFrom(b.Addr.Unmap()), port: p}
				if other, dup := replyFrom[k]; dup && other != s.ID {
					return fmt.Errorf("%w: transparent services %d and %d share backend %s port %d: their replies could not be told apart",
						ErrInvalidService, other, s.ID, b.Addr.Unmap(), p)
				}
				replyFrom[k] = s.ID
			}
		}
	}

	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return ErrClosed
	}
	views := make(map[uint32]*serviceView, len(services))
	counters := make(map[uint32]*serviceCounters, len(services))
	for _, s := range services {
		sc := e.counters[s.ID]
		if sc == nil {
			sc = &serviceCounters{}
		}
		counters[s.ID] = sc
		sv := newServiceView(s, sc, e.cfg.FlowTimeout)
		if s.Mode == ModeTransparent {
			sv.mtu = make([]int, len(sv.backends))
			for i, b := range sv.backends {
				sv.mtu[i] = e.cfg.sockets.mtu(b.Addr)
			}
		}
		views[s.ID] = sv
	}

	var errs []error
	// The reply sockets a transparent service needs; without them its
	// listeners are not opened (replies could not come back).
	noReply := map[bool]bool{}
	for _, sv := range views {
		if sv.svc.Mode != ModeTransparent {
			continue
		}
		v6 := !sv.svc.VIP.Is4()
		if _, tried := noReply[v6]; tried {
			continue
		}
		err := e.openReplyLocked(v6)
		noReply[v6] = err != nil
		if err != nil {
			errs = append(errs, err)
		}
	}

	for ap, l := range e.listeners {
		id, ok := want[ap]
		if !ok || l.mode != views[id].svc.Mode {
			l.close()
			delete(e.listeners, ap)
			e.log.Info("listener closed", slog.String("listen_addr", ap.String()))
		}
	}
	for ap, id := range want {
		sv := views[id]
		if l := e.listeners[ap]; l != nil {
			l.svc.Store(sv)
			continue
		}
		if sv.svc.Mode == ModeTransparent && noReply[!ap.Addr().Is4()] {
			continue
		}
		l, err := e.openListener(ap, sv)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		e.listeners[ap] = l
		go l.run()
		e.log.Info("listener opened", slog.String("listen_addr", ap.String()), slog.Uint64("service_id", uint64(id)),
			slog.String("mode", sv.svc.Mode.String()))
		if on, err := addrOnHost(ap.Addr()); err == nil && !on {
			// Bound anyway (IP_FREEBIND): a VRRP backup has no VIP yet.
			// Said once per listener, for the operator who forgot it.
			e.log.Info("the VIP is on none of this host's interfaces: nothing arrives until it is added (ip addr, keepalived) or routed here",
				slog.String("vip", ap.Addr().String()))
		}
	}
	e.views, e.counters = views, counters

	routes := make(map[replyKey]*replyRoute)
	for _, sv := range views {
		if sv.svc.Mode != ModeTransparent {
			continue
		}
		for _, p := range sv.svc.Ports {
			l := e.listeners[netip.AddrPortFrom(sv.svc.VIP, p)]
			if l == nil {
				continue
			}
			for i, b := range sv.backends {
				routes[replyKey{addr: AddrFrom(b.Addr), port: p}] = &replyRoute{l: l, bc: sv.counters[i], svc: sv.svcCounters}
			}
		}
	}
	e.replyRoutes.Store(&routes)
	return errors.Join(errs...)
}

// openListener opens the socket(s) of a listener for sv on ap.
func (e *Engine) openListener(ap netip.AddrPort, sv *serviceView) (*listener, error) {
	c, err := e.cfg.sockets.listen(ap)
	if err != nil {
		return nil, err
	}
	var raw rawConn
	if sv.svc.Mode == ModeTransparent {
		if raw, err = e.cfg.sockets.raw(!ap.Addr().Is4()); err != nil {
			c.Close()
			return nil, fmt.Errorf("%w: %s: %w", ErrListen, ap, err)
		}
	}
	return newListener(e, c, raw, sv), nil
}

// openReplyLocked opens the family's TPROXY reply socket and its reader,
// unless it is open.
func (e *Engine) openReplyLocked(v6 bool) error {
	rp := &e.reply4
	if v6 {
		rp = &e.reply6
	}
	if *rp != nil {
		return nil
	}
	rc, err := e.cfg.sockets.tproxy(v6, e.cfg.ReplyPort)
	if err != nil {
		return err
	}
	*rp = rc
	e.wg.Add(1)
	go e.runReplies(rc)
	e.log.Info("transparent reply socket opened", slog.String("listen_addr", rc.LocalAddr().String()))
	return nil
}

// ReplyPorts returns the ports of the transparent reply sockets (IPv4,
// IPv6); 0 for a family with no transparent service yet. The host's TPROXY
// rules must divert backends' replies to them (cmd/internal/hostnet).
func (e *Engine) ReplyPorts() (v4, v6 uint16) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.reply4 != nil {
		v4 = e.reply4.LocalAddr().Port()
	}
	if e.reply6 != nil {
		v6 = e.reply6.LocalAddr().Port()
	}
	return v4, v6
}

// UnmatchedReplies counts datagrams on the reply sockets that came from no
// transparent service's backend and port (or were not intercepted), since
// New.
func (e *Engine) UnmatchedReplies() uint64 { return e.unmatchedReplies.Load() }

// Close stops every listener, flow and goroutine and waits for them.
func (e *Engine) Close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil
	}
	e.closed = true
	for ap, l := range e.listeners {
		l.close()
		delete(e.listeners, ap)
	}
	for _, rc := range []replyConn{e.reply4, e.reply6} {
		if rc != nil {
			rc.Close()
		}
	}
	e.mu.Unlock()
	e.cancel()
	e.wg.Wait()
	return nil
}

// Counters returns every committed service's counters, by service ID.
func (e *Engine) Counters() []ServiceCounters {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]ServiceCounters, 0, len(e.views))
	for id, sv := range e.views {
		out = append(out, e.counters[id].snapshot(sv))
	}
	slices.SortFunc(out, func(a, b ServiceCounters) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// Flows returns the number of open client flows: NAT flows (each with an
// upstream socket) and transparent flows (pacing state only).
func (e *Engine) Flows() int { return int(e.flowCount.Load()) }

// KernelPath is a kernel fast path that forwards some clients without the
// engine (cmd/internal/hostnet's FastPath). Its methods are called from
// the listeners' goroutines (per flow at most every 100 ms while it gets
// datagrams, per datagram the flow limit drops, at sweeps and when a flow
// closes) and must not block.
type KernelPath interface {
	// Forwards reports whether the kernel forwards k's datagrams now.
	Forwards(k ClientKey) bool
	// Handover is told the nat flows that still get datagrams although
	// the kernel forwards their client (once more at the listener's
	// first sweep after the kernel forwards it), and every datagram the
	// flow limit dropped, whether or not the kernel forwards its client
	// yet (Upstream and Backend are zero: there is no flow; a kernel path
	// may take such a client whole, once its binding commits).
	//
	// It returns true when the kernel carries the flow itself, with the
	// flow's own addresses (stateless NAT at ingress): the engine then
	// keeps the flow and its upstream socket, which holds the SNAT port
	// the kernel writes, open while the flow is active in the engine or
	// in the kernel (LastActive), forwards what the kernel leaves to it
	// (fragments, oversized datagrams) through the same socket, and
	// calls Release when it closes the flow.
	//
	// It returns false when the kernel forwards the client through
	// conntrack: the datagrams arrive through a conntrack entry made
	// before the client's binding reached the kernel, and would keep
	// doing so while the entry lives; the kernel path deletes that entry
	// (Client → Local), so that the next datagram is decided by the
	// kernel, and the flow closes after Config.HandoverIdle.
	Handover(f KernelFlow) bool
	// LastActive returns when (coarse Unix ns) the kernel last forwarded
	// a datagram of a flow it carries, either way; 0 if unknown.
	LastActive(f KernelFlow) int64
	// Release tells the kernel path that the engine closed a flow
	// Handover took: its socket, and so its SNAT port, is gone.
	Release(f KernelFlow)
}

// KernelFlow is a nat flow as the kernel sees it: the client's datagrams
// Client → Local (the listener's VIP:port) leave as Upstream → Backend.
type KernelFlow struct {
	Service  uint32
	Client   netip.AddrPort
	Local    netip.AddrPort
	Upstream netip.AddrPort // the flow socket's address and port
	Backend  netip.AddrPort
}

// SetKernelPath tells the engine which clients the kernel forwards (nil:
// none). A nat flow of such a client that still gets datagrams is handed
// over (KernelPath.Handover): one the kernel carries with the flow's own
// addresses stays open while it is active in the engine or in the kernel,
// up to the flow timeout, and is released to the path that took it when
// it closes (even after SetKernelPath replaced that path); the others
// close after Config.HandoverIdle.
func (e *Engine) SetKernelPath(kp KernelPath) { e.kernel.Store(kp) }
