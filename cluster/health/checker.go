package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/ikelb/ikelb/dataplane"
)

// Errors returned by probes and Validate.
var (
	// ErrTimeout means no valid answer arrived before the probe's timeout.
	ErrTimeout = errors.New("no answer before timeout")
	// ErrBadResponse means an answer arrived but was malformed or did not
	// match the request.
	ErrBadResponse = errors.New("bad response")
	// ErrInvalidTarget means a Target failed Validate.
	ErrInvalidTarget = errors.New("invalid target")
)

// Type is a probe type.
type Type uint8

const (
	TypeICMP Type = 1 // ICMP (or ICMPv6) echo
	TypeIKE  Type = 2 // IKEv2 IKE_SA_INIT request to Port
)

func (t Type) String() string {
	switch t {
	case TypeICMP:
		return "icmp"
	case TypeIKE:
		return "ike"
	}
	return "unknown"
}

// Defaults applied by Target.withDefaults.
const (
	DefaultInterval = 5 * time.Second
	DefaultTimeout  = 2 * time.Second
	DefaultRise     = 2
	DefaultFall     = 3
	DefaultIKEPort  = 500
)

// Key identifies one checked backend.
type Key struct {
	Service uint32
	Backend uint32
}

// Target is one backend to check. Zero durations and counts take the
// package defaults.
type Target struct {
	Key      Key
	Addr     netip.Addr
	Type     Type
	Port     uint16 // IKE only; 0 means 500
	Interval time.Duration
	Timeout  time.Duration
	Rise     int
	Fall     int
}

func (t Target) withDefaults() Target {
	if t.Interval == 0 {
		t.Interval = DefaultInterval
	}
	if t.Timeout == 0 {
		t.Timeout = DefaultTimeout
	}
	if t.Rise == 0 {
		t.Rise = DefaultRise
	}
	if t.Fall == 0 {
		t.Fall = DefaultFall
	}
	if t.Type == TypeIKE && t.Port == 0 {
		t.Port = DefaultIKEPort
	}
	return t
}

// Validate reports whether the target, after defaults, can be checked.
func (t Target) Validate() error {
	t = t.withDefaults()
	switch {
	case !t.Addr.IsValid():
		return fmt.Errorf("%w: %v: no address", ErrInvalidTarget, t.Key)
	case t.Type != TypeICMP && t.Type != TypeIKE:
		return fmt.Errorf("%w: %v: unknown probe type %d", ErrInvalidTarget, t.Key, t.Type)
	case t.Interval < 0 || t.Timeout < 0 || t.Rise < 0 || t.Fall < 0:
		return fmt.Errorf("%w: %v: negative interval, timeout, rise or fall", ErrInvalidTarget, t.Key)
	case t.Timeout > t.Interval:
		return fmt.Errorf("%w: %v: timeout %v longer than interval %v", ErrInvalidTarget, t.Key, t.Timeout, t.Interval)
	}
	return nil
}

// Transition is a change of a target's health.
type Transition struct {
	Key    Key
	Addr   netip.Addr
	From   dataplane.Health
	To     dataplane.Health
	At     time.Time
	Reason error // the last probe's error when To is HealthDown; else nil
}

// Status is a target's current state, for the admin API.
type Status struct {
	Target    Target // with defaults applied
	Health    dataplane.Health
	LastCheck time.Time // zero before the first probe
	LastErr   error     // the last probe's error; nil if it succeeded
	Successes int       // consecutive
	Failures  int       // consecutive
}

// Prober runs one probe. It returns nil when the target answered and an
// error saying why not otherwise. It must return when ctx is done.
type Prober interface {
	Probe(ctx context.Context, t Target) error
}

// NetProber is the real Prober: ICMP echo and IKEv2 IKE_SA_INIT.
type NetProber struct{}

// Probe implements Prober.
func (NetProber) Probe(ctx context.Context, t Target) error {
	switch t.Type {
	case TypeICMP:
		return ProbeICMP(ctx, t.Addr)
	case TypeIKE:
		return ProbeIKE(ctx, netip.AddrPortFrom(t.Addr, t.Port))
	}
	return fmt.Errorf("%w: unknown probe type %d", ErrInvalidTarget, t.Type)
}

// Option configures New.
type Option func(*Checker)

// WithProber replaces the network prober (for tests).
func WithProber(p Prober) Option { return func(c *Checker) { c.prober = p } }

// Checker checks a changing set of targets. Create it with New, feed it
// with Update, stop it with Close (or by cancelling the context given to
// Run).
type Checker struct {
	// Set once.
	logger       *slog.Logger
	prober       Prober
	onTransition func(Transition)
	ctx          context.Context
	cancel       context.CancelFunc

	updateMu sync.Mutex // serializes Update and Close

	mu      sync.Mutex // guards the following
	workers map[Key]*worker
	closed  bool
}

// worker is one target's goroutine. Its machine is touched only by that
// goroutine; status is published under Checker.mu.
type worker struct {
	target Target
	cancel context.CancelFunc
	done   chan struct{}

	status Status // guarded by Checker.mu
}

// New returns a Checker with no targets. onTransition is called from the
// targets' goroutines, with no lock held, and must not block: hand the
// transition to a buffered channel or a non-blocking send, and never call
// Update or Close from it. It is not called after Close returns.
func New(logger *slog.Logger, onTransition func(Transition), opts ...Option) *Checker {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Checker{
		logger:       logger,
		prober:       NetProber{},
		onTransition: onTransition,
		ctx:          ctx,
		cancel:       cancel,
		workers:      make(map[Key]*worker),
	}
	for _, o := range opts {
		o(c)
	}
	return c
}

// Update reconciles the checked set with targets: it starts new targets,
// stops removed ones and restarts changed ones (which then start again from
// unknown). Unchanged targets keep their state. Invalid targets are skipped
// and reported in the returned error; the valid ones are applied anyway.
// Update is idempotent and safe to call concurrently.
func (c *Checker) Update(targets []Target) error {
	c.updateMu.Lock()
	defer c.updateMu.Unlock()

	var errs []error
	want := make(map[Key]Target, len(targets))
	for _, t := range targets {
		if err := t.Validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		if _, dup := want[t.Key]; dup {
			errs = append(errs, fmt.Errorf("%w: %v: duplicate key", ErrInvalidTarget, t.Key))
			continue
		}
		want[t.Key] = t.withDefaults()
	}

	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return errors.New("checker closed")
	}
	var stopping []*worker
	for k, w := range c.workers {
		if t, ok := want[k]; !ok || t != w.target {
			w.cancel()
			stopping = append(stopping, w)
			delete(c.workers, k)
		}
	}
	c.mu.Unlock()

	// Wait outside mu: a stopping worker may be publishing its status.
	// Waiting before starting replacements means an old goroutine never
	// reports after its replacement has started.
	for _, w := range stopping {
		<-w.done
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	for k, t := range want {
		if _, ok := c.workers[k]; ok {
			continue
		}
		ctx, cancel := context.WithCancel(c.ctx)
		w := &worker{target: t, cancel: cancel, done: make(chan struct{}),
			status: Status{Target: t, Health: dataplane.HealthUnknown}}
		c.workers[k] = w
		go c.run(ctx, w)
	}
	if len(stopping) > 0 || len(errs) > 0 {
		c.logger.Info("health targets updated", "targets", len(c.workers), "restarted_or_removed", len(stopping), "invalid", len(errs))
	}
	return errors.Join(errs...)
}

// Status returns every target's status, in no particular order.
func (c *Checker) Status() []Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Status, 0, len(c.workers))
	for _, w := range c.workers {
		out = append(out, w.status)
	}
	return out
}

// Run blocks until ctx is done, then closes the Checker.
func (c *Checker) Run(ctx context.Context) error {
	select {
	case <-ctx.Done():
	case <-c.ctx.Done():
	}
	c.Close()
	return nil
}

// Close stops all targets and waits for their goroutines. After it returns
// onTransition is not called again. Close is idempotent.
func (c *Checker) Close() {
	c.updateMu.Lock()
	defer c.updateMu.Unlock()
	c.mu.Lock()
	c.closed = true
	c.cancel()
	workers := c.workers
	c.workers = make(map[Key]*worker)
	c.mu.Unlock()
	for _, w := range workers {
		<-w.done
	}
}

// run is the goroutine owning one target.
func (c *Checker) run(ctx context.Context, w *worker) {
	defer close(w.done)
	t := w.target
	m := newMachine(t.Rise, t.Fall)
	log := c.logger.With("service", t.Key.Service, "backend", t.Key.Backend, "addr", t.Addr, "probe", t.Type)

	timer := time.NewTimer(0) // first probe at once
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		pctx, cancel := context.WithTimeout(ctx, t.Timeout)
		err := c.prober.Probe(pctx, t)
		cancel()
		if ctx.Err() != nil {
			return // stopped mid-probe: the result means nothing
		}
		now := time.Now()
		from, to, changed := m.observe(err == nil)

		c.mu.Lock()
		w.status.Health = to
		w.status.LastCheck = now
		w.status.LastErr = err
		w.status.Successes = m.successes
		w.status.Failures = m.failures
		c.mu.Unlock()

		if changed {
			tr := Transition{Key: t.Key, Addr: t.Addr, From: from, To: to, At: now}
			if to == dataplane.HealthDown {
				tr.Reason = err
				log.Warn("backend down", "from", healthName(from), "error", err)
			} else {
				log.Info("backend up", "from", healthName(from))
			}
			if c.onTransition != nil {
				c.onTransition(tr)
			}
		}
		timer.Reset(t.Interval)
	}
}

func healthName(h dataplane.Health) string {
	switch h {
	case dataplane.HealthUp:
		return "up"
	case dataplane.HealthDown:
		return "down"
	}
	return "unknown"
}
