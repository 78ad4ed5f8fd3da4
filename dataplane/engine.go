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

	mu        sync.Mutex // guards the following
	closed    bool
	listeners map[netip.AddrPort]*listener
	views     map[uint32]*serviceView // the committed set, by service ID
	counters  map[uint32]*serviceCounters
}

// New starts an engine with no services.
func New(cfg Config) (*Engine, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
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
		views[s.ID] = newServiceView(s, sc, e.cfg.FlowTimeout)
	}

	for ap, l := range e.listeners {
		if _, ok := want[ap]; !ok {
			l.close()
			delete(e.listeners, ap)
			e.log.Info("listener closed", slog.String("listen_addr", ap.String()))
		}
	}
	var errs []error
	for ap, id := range want {
		sv := views[id]
		if l := e.listeners[ap]; l != nil {
			l.svc.Store(sv)
			continue
		}
		c, err := e.cfg.sockets.listen(ap)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		l := newListener(e, c, sv)
		e.listeners[ap] = l
		go l.run()
		e.log.Info("listener opened", slog.String("listen_addr", ap.String()), slog.Uint64("service_id", uint64(id)))
	}
	e.views, e.counters = views, counters
	return errors.Join(errs...)
}

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

// Flows returns the number of open NAT flows (upstream sockets).
func (e *Engine) Flows() int { return int(e.flowCount.Load()) }
