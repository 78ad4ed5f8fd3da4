package membership

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-multierror"
	"github.com/hashicorp/memberlist"
)

// Join retries back off exponentially between these bounds, with jitter.
const (
	joinBackoffMin = 200 * time.Millisecond
	joinBackoffMax = 5 * time.Second
)

// Members is this node's view of the gossip cluster: it runs memberlist,
// keeps every member's latest state (alive, failed or left) and meta, and
// reports changes on Events. Create it with New; Shutdown stops it.
type Members struct {
	// Set once by New.
	cfg       Config
	log       *slog.Logger
	ml        *memberlist.Memberlist
	localAddr netip.AddrPort
	events    chan Event
	done      chan struct{} // closed when Shutdown begins; stops Join
	meta      atomic.Pointer[[]byte]
	dropped   atomic.Uint64

	// life serialises Leave, SetMeta and Shutdown: memberlist panics on a
	// Leave after Shutdown. It guards localMeta.
	life      sync.Mutex
	localMeta Meta
	// wg counts the goroutines running memberlist.Join; Shutdown waits for
	// them before it stops memberlist.
	wg sync.WaitGroup

	mu sync.Mutex
	// mu guards the following. memberlist calls the event callbacks with
	// its own lock held and they take mu: never call memberlist with mu held.
	members  map[string]Member
	left     bool // Leave succeeded
	stopping bool // Shutdown began: no new goroutines
	closed   bool // Events is closed: callbacks record nothing
}

// New validates cfg, binds the gossip sockets and starts memberlist. The
// member is alive in a cluster of one until Join.
func New(cfg Config) (*Members, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	m := &Members{
		cfg:       cfg,
		log:       cfg.Logger.With("component", "membership"),
		events:    make(chan Event, cfg.EventBuffer),
		done:      make(chan struct{}),
		members:   map[string]Member{},
		localMeta: cfg.Meta,
	}
	meta := cfg.Meta.encode(false)
	m.meta.Store(&meta)
	ml, err := memberlist.Create(cfg.memberlistConfig(&delegate{m: m}, newLogWriter(cfg.Logger)))
	if err != nil {
		return nil, fmt.Errorf("start gossip on %s: %w", cfg.BindAddr, err)
	}
	m.ml = ml
	// memberlist reported this member's own join from Create.
	m.mu.Lock()
	m.localAddr = m.members[cfg.Name].Addr
	m.mu.Unlock()
	m.log.Info("gossip started", "name", cfg.Name, "gossip_addr", m.localAddr.String(),
		"encrypted", len(cfg.EncryptKey) > 0)
	return m, nil
}

// LocalName returns this member's name.
func (m *Members) LocalName() string { return m.cfg.Name }

// LocalAddr returns the gossip address this member advertises; other
// members can Join it.
func (m *Members) LocalAddr() netip.AddrPort { return m.localAddr }

// Events returns the channel of membership changes, in the order memberlist
// saw them. Events are sent without blocking: when the channel is full they
// are dropped and counted (DroppedEvents), so the consumer must also
// reconcile against Members on a timer. The channel is closed by Shutdown.
func (m *Members) Events() <-chan Event { return m.events }

// DroppedEvents returns how many events did not fit in the Events channel.
func (m *Members) DroppedEvents() uint64 { return m.dropped.Load() }

// Members returns every known member, this one included, sorted by name:
// alive ones, and failed or left ones for a day after they went (or until
// they come back).
func (m *Members) Members() []Member {
	m.mu.Lock()
	m.reapLocked(time.Now())
	out := make([]Member, 0, len(m.members))
	for _, mem := range m.members {
		out = append(out, mem)
	}
	m.mu.Unlock()
	slices.SortFunc(out, func(a, b Member) int { return cmp.Compare(a.Name, b.Name) })
	return out
}

// reapLocked forgets members that have been failed or left for reapAfter.
func (m *Members) reapLocked(now time.Time) {
	for name, mem := range m.members {
		if mem.Status != StatusAlive && now.Sub(mem.Since) > reapAfter {
			delete(m.members, name)
		}
	}
}

// Join contacts the members in Config.Join until one answers, retrying with
// exponential backoff (200ms to 5s, jittered) until ctx ends. Reaching any
// one address is enough: gossip spreads the rest. With no Join addresses it
// returns nil at once. It fails with ErrShutdown if Shutdown is called, and
// with ErrJoin when ctx ends first, carrying memberlist's last error; for a
// gossip key mismatch that is "no installed keys could decrypt the message"
// or "remote state is encrypted and encryption is not configured". An
// attempt in flight when ctx ends may still complete, and then the member
// has joined.
func (m *Members) Join(ctx context.Context) error {
	addrs := m.cfg.Join
	if len(addrs) == 0 {
		return nil
	}
	start := time.Now()
	backoff := joinBackoffMin
	var lastErr error
	attempts := 0
	for {
		attempts++
		n, err := m.joinOnce(ctx, addrs)
		if err == nil {
			m.log.Info("joined cluster", "contacted", n, "attempts", attempts, "took", time.Since(start).String())
			return nil
		}
		if errors.Is(err, ErrShutdown) {
			return fmt.Errorf("join: %w", ErrShutdown)
		}
		if err != ctx.Err() {
			lastErr = err
		}
		if ctx.Err() == nil {
			m.log.Debug("join attempt failed", "attempt", attempts, "error", err)
			wait := backoff/2 + rand.N(backoff/2+1)
			backoff = min(2*backoff, joinBackoffMax)
			t := time.NewTimer(wait)
			select {
			case <-t.C:
				continue
			case <-m.done:
				t.Stop()
				return fmt.Errorf("join: %w", ErrShutdown)
			case <-ctx.Done():
				t.Stop()
			}
		}
		if lastErr == nil {
			lastErr = ctx.Err()
		}
		return fmt.Errorf("%w: none of %s answered in %d attempts over %v: %w",
			ErrJoin, strings.Join(addrs, ", "), attempts, time.Since(start).Round(time.Millisecond), lastErr)
	}
}

// joinOnce runs one memberlist.Join on a goroutine Shutdown waits for, and
// returns early if ctx ends or Shutdown begins.
func (m *Members) joinOnce(ctx context.Context, addrs []string) (int, error) {
	type result struct {
		n   int
		err error
	}
	res := make(chan result, 1)
	m.mu.Lock()
	if m.stopping {
		m.mu.Unlock()
		return 0, ErrShutdown
	}
	m.wg.Add(1)
	m.mu.Unlock()
	go func() {
		defer m.wg.Done()
		n, err := m.ml.Join(addrs)
		res <- result{n, flattenMultiError(err)}
	}()
	select {
	case r := <-res:
		return r.n, r.err
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-m.done:
		return 0, ErrShutdown
	}
}

// flattenMultiError puts memberlist's multi-line join errors on one line.
func flattenMultiError(err error) error {
	var me *multierror.Error
	if !errors.As(err, &me) || len(me.Errors) == 0 {
		return err
	}
	msgs := make([]string, len(me.Errors))
	for i, e := range me.Errors {
		msgs[i] = e.Error()
	}
	return errors.New(strings.Join(msgs, "; "))
}

// SetMeta replaces this member's meta and gossips it; the other members see
// an EventUpdate. It waits up to timeout for the first broadcast, which is
// not needed for the change to spread: on a timeout error the new meta is
// still in effect.
func (m *Members) SetMeta(meta Meta, timeout time.Duration) error {
	orDefault(&meta.Role, RoleVoter)
	if err := meta.validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	m.life.Lock()
	defer m.life.Unlock()
	m.mu.Lock()
	unusable := m.stopping || m.left
	m.mu.Unlock()
	if unusable {
		return fmt.Errorf("set meta: %w", ErrShutdown)
	}
	m.localMeta = meta
	b := meta.encode(false)
	m.meta.Store(&b)
	if err := m.ml.UpdateNode(timeout); err != nil {
		return fmt.Errorf("set meta: %w", err)
	}
	return nil
}

// Leave tells the cluster this member is leaving, so that the others mark
// it left (not failed) at once, and waits up to timeout (≤0: no bound) for
// the messages to go out. The member keeps gossiping until Shutdown. Leaving
// twice is a no-op.
//
// memberlist tells its EventDelegate of a leave and of a failure alike, so
// Leave first gossips this member's meta with a "leaving" flag (waiting up
// to half of timeout for that broadcast), then has memberlist announce the
// departure; the others read the flag from the last meta they saw. One that
// missed the flag reports the member failed, which the Raft leader handles
// the same way, only later.
func (m *Members) Leave(timeout time.Duration) error {
	m.life.Lock()
	defer m.life.Unlock()
	m.mu.Lock()
	stopping, left := m.stopping, m.left
	m.mu.Unlock()
	switch {
	case stopping:
		return fmt.Errorf("leave: %w", ErrShutdown)
	case left:
		return nil
	}
	var deadline time.Time
	if timeout > 0 {
		deadline = time.Now().Add(timeout)
	}
	b := m.localMeta.encode(true)
	m.meta.Store(&b)
	if err := m.ml.UpdateNode(timeout / 2); err != nil {
		m.log.Warn("leave: the leaving notice may not have reached every member; some will report this one failed", "error", err)
	}
	remaining := time.Duration(0)
	if !deadline.IsZero() {
		remaining = max(time.Until(deadline), time.Millisecond)
	}
	if err := m.ml.Leave(remaining); err != nil {
		return fmt.Errorf("leave: %w", err)
	}
	m.mu.Lock()
	m.left = true
	m.mu.Unlock()
	m.log.Info("left cluster")
	return nil
}

// Shutdown stops gossip without leaving: the others will declare this
// member failed. It stops Join, waits for the join attempt in flight (at most
// TCPTimeout), stops memberlist and closes Events. It is safe to call more
// than once. (memberlist's own goroutines wind down after it returns; their
// late callbacks are ignored.)
func (m *Members) Shutdown() error {
	m.life.Lock()
	defer m.life.Unlock()
	m.mu.Lock()
	if m.stopping {
		m.mu.Unlock()
		return nil
	}
	m.stopping = true
	m.mu.Unlock()
	close(m.done)
	m.wg.Wait()
	err := m.ml.Shutdown()
	m.mu.Lock()
	m.closed = true
	close(m.events)
	m.mu.Unlock()
	m.log.Info("gossip stopped", "dropped_events", m.dropped.Load())
	if err != nil {
		return fmt.Errorf("shutdown memberlist: %w", err)
	}
	return nil
}

// observe records a member's new state and queues its event. memberlist
// calls it with its node lock held, one call at a time: it must not block.
//
// kind is EventJoin, EventUpdate or, for any departure, EventFailed: the
// leaving flag in the member's last meta turns that into EventLeave.
func (m *Members) observe(kind EventKind, n *memberlist.Node) {
	meta, leaving, metaErr := decodeMeta(n.Meta)
	if kind == EventFailed && leaving {
		kind = EventLeave
	}
	ip, _ := netip.AddrFromSlice(n.Addr)
	status := StatusAlive
	switch kind {
	case EventLeave:
		status = StatusLeft
	case EventFailed:
		status = StatusFailed
	}
	now := time.Now()
	mem := Member{
		Name:    n.Name,
		Addr:    netip.AddrPortFrom(ip.Unmap(), n.Port),
		Meta:    meta,
		MetaErr: metaErr,
		Status:  status,
		Since:   now,
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	old, known := m.members[mem.Name]
	if known && old.Status == status {
		mem.Since = old.Since
	}
	m.members[mem.Name] = mem
	if kind == EventUpdate && known && old == mem {
		// Only the leaving flag changed; the departure event follows.
		m.mu.Unlock()
		return
	}
	m.reapLocked(now)
	sent := true
	select {
	case m.events <- Event{Kind: kind, Member: mem}:
	default:
		sent = false
	}
	m.mu.Unlock()

	if !sent {
		if d := m.dropped.Add(1); d&(d-1) == 0 { // 1, 2, 4, 8...: not every drop
			m.log.Warn("membership event dropped: the events channel is full", "dropped_events", d)
		}
	}
	if metaErr != nil {
		m.log.Warn("member meta not understood; it cannot become a raft server",
			"member", mem.Name, "gossip_addr", mem.Addr.String(), "error", metaErr)
	}
	lvl := slog.LevelInfo
	if kind == EventUpdate {
		lvl = slog.LevelDebug
	}
	m.log.Log(context.Background(), lvl, "member "+kind.String(), "member", mem.Name,
		"gossip_addr", mem.Addr.String(), "raft_addr", mem.Meta.RaftAddr, "role", mem.Meta.Role)
}

// delegate is memberlist's Delegate and EventDelegate, kept off Members'
// exported method set.
type delegate struct {
	m *Members
}

var (
	_ memberlist.Delegate      = (*delegate)(nil)
	_ memberlist.EventDelegate = (*delegate)(nil)
)

// NodeMeta returns this member's encoded meta; Validate and SetMeta keep it
// within limit (memberlist panics beyond it).
func (d *delegate) NodeMeta(limit int) []byte {
	b := *d.m.meta.Load()
	if len(b) > limit {
		d.m.log.Error("meta exceeds memberlist's limit; advertising none", "size", len(b), "limit", limit)
		return nil
	}
	return b
}

func (d *delegate) NotifyMsg([]byte)                           {}
func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (d *delegate) LocalState(join bool) []byte                { return nil }
func (d *delegate) MergeRemoteState(buf []byte, join bool)     {}

func (d *delegate) NotifyJoin(n *memberlist.Node)   { d.m.observe(EventJoin, n) }
func (d *delegate) NotifyUpdate(n *memberlist.Node) { d.m.observe(EventUpdate, n) }

// NotifyLeave is called for a failure and a graceful leave alike:
// memberlist.Node.State is never set (memberlist keeps the state in a field
// of its own that shadows it), so observe tells them apart by the meta.
func (d *delegate) NotifyLeave(n *memberlist.Node) { d.m.observe(EventFailed, n) }
