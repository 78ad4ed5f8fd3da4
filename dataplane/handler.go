package dataplane

// The packet handler: a pure function from one datagram and its addresses
// (plus the committed state it reads) to a decision. No syscalls, no
// allocation, no logging, no clock: the read loop passes the coarse time in
// and carries out the decision.

// verdict is what happens to the datagram.
type verdict uint8

const (
	verdictDrop verdict = iota
	verdictForward
)

// pacing is one client flow's proposal state, owned by its listener's
// goroutine and threaded through decide.
type pacing struct {
	bindBackend uint32 // backend of the last bind proposed
	bindAt      int64  // when it was proposed; 0 never
	touchAt     int64  // when the last touch was proposed; 0 never
}

// decision is decide's answer.
type decision struct {
	verdict  verdict
	backend  int        // index in serviceView.backends, when forwarding
	reason   DropReason // when dropping
	class    Class      // what the datagram carries, for counters
	propose  bool       // whether to hand proposal to the Proposer
	proposal Proposal
	pacing   pacing // the flow's pacing after this datagram
}

// decide handles one datagram from client on the service's listener port.
//
// A committed binding to a backend that is still in the service and Usable
// is followed, with a touch proposed when neither the committed last-seen
// time nor this flow's last touch is within sv.touchEvery. Otherwise Pick
// chooses, and a bind is proposed (at most once per bindRetry per flow for
// the same backend, until it commits). With nothing to choose the datagram
// is dropped. The payload is only classified: every datagram is forwarded
// whatever it holds.
func decide(sv *serviceView, t *Table, client Addr, port uint16, payload []byte, p pacing, now int64) decision {
	d := decision{class: Classify(port, payload), pacing: p}
	key := ClientKey{Service: sv.svc.ID, Client: client}

	if e, ok := t.Lookup(key); ok {
		if i, ok := sv.backendIndex(e.Backend); ok && sv.backends[i].Usable() {
			d.verdict, d.backend = verdictForward, i
			if now-max(e.LastSeen, p.touchAt) >= sv.touchEvery {
				d.propose = true
				d.proposal = Proposal{Kind: ProposeTouch, Key: key, Backend: e.Backend, At: now}
				d.pacing.touchAt = now
			}
			return d
		}
		// Bound to a backend that is gone, disabled or down: choose again.
	}

	i := pickIndex(sv.backends, key)
	if i < 0 {
		d.verdict, d.reason = verdictDrop, DropNoBackend
		return d
	}
	d.verdict, d.backend = verdictForward, i
	id := sv.backends[i].ID
	if p.bindAt == 0 || p.bindBackend != id || now-p.bindAt >= bindRetry {
		d.propose = true
		d.proposal = Proposal{Kind: ProposeBind, Key: key, Backend: id, At: now}
		d.pacing.bindBackend, d.pacing.bindAt = id, now
	}
	return d
}
