package cluster

import (
	"cmp"
	"context"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/cluster/membership"
	"github.com/ikelb/ikelb/dataplane"
	raftlogv1 "github.com/ikelb/ikelb/proto/raftlog/v1"
)

// handOffLeadership transfers leadership from this witness to an alive
// voter with a dataplane, which runs the health checks the witness cannot.
// It is a no-op when there is none; the leader loop tries again on its
// reconcile timer.
func (n *Node) handOffLeadership() {
	if n.members == nil {
		return
	}
	voters := map[raft.ServerID]raft.ServerAddress{}
	if f := n.raft.GetConfiguration(); f.Error() == nil {
		for _, s := range f.Configuration().Servers {
			if s.Suffrage == raft.Voter {
				voters[s.ID] = s.Address
			}
		}
	}
	for _, m := range n.members.Members() {
		addr, ok := voters[raft.ServerID(m.Name)]
		if !ok || m.Name == n.cfg.Name || m.Status != membership.StatusAlive || m.Meta.Role != membership.RoleVoter {
			continue
		}
		n.log.Info("witness transfers leadership to a node with a dataplane", "to", m.Name)
		if err := n.raft.LeadershipTransferToServer(raft.ServerID(m.Name), addr).Error(); err != nil {
			n.log.Warn("leadership transfer failed", "to", m.Name, "error", err)
			continue
		}
		return
	}
}

// runLeadership starts the leader loop when this node becomes the leader
// and stops it (waiting for it) when leadership is lost or ctx is done.
func (n *Node) runLeadership(ctx context.Context) {
	runLeaderLoops(ctx, n.raft.LeaderCh(), n.log, n.leaderLoop)
}

// runLeaderLoops runs loop for as long as leaderCh last said true, and waits
// for it when leadership is lost or ctx is done.
//
// raft's LeaderCh keeps only the latest value (overrideNotifyBool), so a
// quick lose-and-regain arrives as a second true with the false lost. A
// true while a loop exists therefore means a new term: the old loop is
// stopped (it may already have returned on its own, e.g. after a failed
// barrier) and a fresh one started, which runs the barrier for this term.
func runLeaderLoops(ctx context.Context, leaderCh <-chan bool, log *slog.Logger, loop func(context.Context)) {
	var stop func()
	defer func() {
		if stop != nil {
			stop()
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case isLeader := <-leaderCh:
			if stop != nil {
				log.Info("lost raft leadership")
				stop()
				stop = nil
			}
			if isLeader {
				log.Info("became raft leader")
				lctx, cancel := context.WithCancel(ctx)
				done := make(chan struct{})
				go func() {
					defer close(done)
					loop(lctx)
				}()
				stop = func() { cancel(); <-done }
			}
		}
	}
}

// leaderLoop is the leader's work: it makes sure the FSM has applied
// everything committed by earlier leaders, repairs this node's own address in
// the Raft configuration, reconciles gossip membership with the Raft
// configuration (on membership events and on a timer that repairs dropped
// events), expires idle affinities, and runs the health checker, committing
// its transitions.
func (n *Node) leaderLoop(ctx context.Context) {
	for {
		err := n.raft.Barrier(n.cfg.ApplyTimeout).Error()
		if err == nil {
			break
		}
		n.log.Warn("leader barrier failed", "error", err)
		if ctx.Err() != nil || n.raft.State() != raft.Leader {
			return
		}
	}
	n.reconcileSelf()
	if n.dp == nil {
		// A witness has no dataplane and, usually, no path to the backends:
		// it must neither probe them (it would commit them all down) nor stay
		// leader while a node that can is available.
		n.handOffLeadership()
	}

	var (
		checker HealthChecker
		hmu     sync.Mutex
		hq      []HealthTransition
		hsignal = make(chan struct{}, 1)
	)
	if n.cfg.HealthChecker != nil && n.dp != nil {
		checker = n.cfg.HealthChecker(func(t HealthTransition) {
			hmu.Lock()
			hq = append(hq, t)
			hmu.Unlock()
			select {
			case hsignal <- struct{}{}:
			default:
			}
		})
		defer checker.Close()
	}

	expiry := time.NewTimer(0)
	defer expiry.Stop()
	// Reconcile at once, then on events, on the interval, and when a
	// pending removal falls due.
	missingSince := map[raft.ServerID]time.Time{}
	reconcile := time.NewTimer(0)
	defer reconcile.Stop()
	reconcileNow := func() {
		next := n.cfg.ReconcileInterval
		if d := n.reconcileMembers(ctx, missingSince); d > 0 {
			next = min(next, d)
		}
		reconcile.Reset(next)
	}
	services := n.fsm.Services()
	if checker != nil {
		checker.Update(healthTargets(n.fsm.ServiceRecords()))
	}
	// commitHealth commits the queued transitions; on failure they are
	// queued again and retried on the next signal or expiry tick.
	commitHealth := func() {
		hmu.Lock()
		batch := hq
		hq = nil
		hmu.Unlock()
		if !n.commitHealth(ctx, batch) {
			hmu.Lock()
			hq = append(batch, hq...)
			hmu.Unlock()
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.fsm.changed:
			services = n.fsm.Services()
			if checker != nil {
				checker.Update(healthTargets(n.fsm.ServiceRecords()))
			}
		case <-hsignal:
			commitHealth()
		case <-n.membersChanged:
			reconcileNow()
		case <-reconcile.C:
			reconcileNow()
			if n.dp == nil {
				n.handOffLeadership()
			}
		case <-expiry.C:
			commitHealth()
			n.expire(ctx)
			expiry.Reset(n.expiryInterval(services))
		}
	}
}

// reconcileSelf updates this node's address in the Raft configuration when
// it restarted on another one (a port-0 test, a changed advertise address).
// It is idempotent.
func (n *Node) reconcileSelf() {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		n.log.Warn("read raft configuration", "error", err)
		return
	}
	self, addr := raft.ServerID(n.cfg.Name), n.transport.LocalAddr()
	for _, s := range f.Configuration().Servers {
		if s.ID == self && s.Address != addr && s.Suffrage == raft.Voter {
			n.log.Info("updating own raft address", "old", string(s.Address), "new", string(addr))
			if err := n.raft.AddVoter(self, addr, 0, n.cfg.ApplyTimeout).Error(); err != nil {
				n.log.Warn("update own raft address", "error", err)
			}
		}
	}
}

// expiryInterval is min(shortest timeout/10, 10s), at least 1s, unless set.
func (n *Node) expiryInterval(services []dataplane.Service) time.Duration {
	if n.cfg.ExpiryInterval > 0 {
		return n.cfg.ExpiryInterval
	}
	d := 10 * time.Second
	for _, s := range services {
		d = min(d, s.Timeout/10)
	}
	return max(d, time.Second)
}

// expire proposes Expire records, carrying the last-seen observed, for every
// affinity idle longer than its service's timeout (or whose service is
// gone). The FSM deletes only those not refreshed in between.
//
// Timeouts are read from the FSM here, not from the leader loop's copy of
// the services: that copy may lag behind a commit the loop has not seen yet
// (a new service, a longer timeout), and using it would expire live
// clients. An entry whose service is unknown is expired only if its service
// is still unknown after the scan (ids are never reused), since the service
// may have been created while the table was scanned.
func (n *Node) expire(ctx context.Context) {
	services := n.fsm.Services()
	timeout := make(map[uint32]int64, len(services))
	for _, s := range services {
		timeout[s.ID] = int64(s.Timeout)
	}
	now := n.cfg.Now().UnixNano()
	var expires []*raftlogv1.Expire
	n.table.Range(func(k dataplane.ClientKey, e dataplane.Entry) bool {
		t, ok := timeout[k.Service]
		if !ok || e.LastSeen+t < now {
			expires = append(expires, &raftlogv1.Expire{ServiceId: k.Service, Client: clientBytes(k.Client), LastSeenNs: e.LastSeen})
		}
		return true
	})
	expires = slices.DeleteFunc(expires, func(x *raftlogv1.Expire) bool {
		if _, ok := timeout[x.ServiceId]; ok {
			return false
		}
		_, exists := n.fsm.serviceByID(x.ServiceId)
		return exists
	})
	var deleted uint64
	for chunk := range slices.Chunk(expires, max(n.cfg.Batch.MaxBatch, 1)) {
		r, err := n.applyEntry(ctx, entryAffinityBatch, &raftlogv1.AffinityBatch{Expires: chunk})
		if err != nil {
			n.log.Warn("propose affinity expiry", "entries", len(chunk), "error", err)
			return
		}
		deleted += r.deleted
	}
	if len(expires) > 0 {
		n.log.Debug("expired affinities", "proposed", len(expires), "deleted", deleted)
	}
}

// healthTargets lists the backends to probe: every backend of every service
// whose check type is not NONE.
// Check parameters left zero get the admin API's defaults.
func healthTargets(recs []*raftlogv1.ServiceRecord) []HealthTarget {
	var out []HealthTarget
	for _, r := range recs {
		hc := r.GetHealthCheck()
		t := HealthCheckType(hc.GetType())
		if t == 0 {
			t = HealthCheckICMP
		}
		if t == HealthCheckNone {
			continue
		}
		for _, b := range r.GetBackends() {
			a, ok := addrFromBytes(b.GetAddr())
			if !ok || !a.IsValid() {
				continue
			}
			out = append(out, HealthTarget{
				Service:  r.GetId(),
				Backend:  b.GetId(),
				Addr:     a,
				Type:     t,
				Interval: cmp.Or(time.Duration(hc.GetIntervalNs()), defaultCheckInterval),
				Timeout:  cmp.Or(time.Duration(hc.GetTimeoutNs()), defaultCheckTimeout),
				Rise:     cmp.Or(hc.GetRise(), defaultCheckRise),
				Fall:     cmp.Or(hc.GetFall(), defaultCheckFall),
				Port:     uint16(cmp.Or(hc.GetPort(), defaultCheckPort)),
			})
		}
	}
	return out
}

// commitHealth commits health transitions as one HealthBatch and reports
// whether it did.
func (n *Node) commitHealth(ctx context.Context, ts []HealthTransition) bool {
	if len(ts) == 0 {
		return true
	}
	b := &raftlogv1.HealthBatch{}
	n.mu.Lock()
	for _, t := range ts {
		h := uint32(2) // BACKEND_HEALTH_DOWN
		if t.Up {
			h = 1
		}
		b.Changes = append(b.Changes, &raftlogv1.HealthChange{ServiceId: t.Service, BackendId: t.Backend, Health: h, AtNs: t.At.UnixNano()})
		n.probeError[backendKey{t.Service, t.Backend}] = t.Err
	}
	n.mu.Unlock()
	if _, err := n.applyEntry(ctx, entryHealthBatch, b); err != nil {
		n.log.Warn("commit health transitions", "changes", len(b.Changes), "error", err)
		return false
	}
	return true
}
