package dataplane

import (
	"net/netip"
	"testing"
	"time"
)

const sec = int64(time.Second)

// handlerService has three backends; Pick sends testClient to one of them
// (pickedFor tells which) and the service's touch interval is 30 s.
func handlerService(mut func(bs []Backend)) *serviceView {
	bs := testBackends(3)
	if mut != nil {
		mut(bs)
	}
	s := Service{ID: 7, Name: "vpn", VIP: netip.MustParseAddr("192.0.2.1"), Ports: []uint16{500, 4500},
		Backends: bs, Timeout: 8 * time.Hour, Mode: ModeNAT, Key: KeySourceIP}
	return newServiceView(s, &serviceCounters{backends: map[uint32]*backendCounters{}}, 0)
}

var testClient = AddrFrom(netip.MustParseAddr("198.18.1.2"))

func TestDecide(t *testing.T) {
	ike := MinimalIKESAInit(1, false)
	key := ClientKey{Service: 7, Client: testClient}
	picked, _ := Pick(handlerService(nil).backends, key)
	other := uint32(100)
	if picked.ID == other {
		other = 101
	}
	const now = 1000 * sec

	type want struct {
		verdict  verdict
		backend  uint32 // when forwarding
		reason   DropReason
		proposal *Proposal
	}
	bind := func(id uint32) *Proposal { return &Proposal{Kind: ProposeBind, Key: key, Backend: id, At: now} }
	touch := func(id uint32) *Proposal { return &Proposal{Kind: ProposeTouch, Key: key, Backend: id, At: now} }
	tests := []struct {
		name    string
		entry   *Entry
		mut     func(bs []Backend)
		pacing  pacing
		payload []byte
		want    want
	}{
		{name: "new client picks and binds", payload: ike,
			want: want{verdictForward, picked.ID, 0, bind(picked.ID)}},
		{name: "bind not repeated within retry", payload: ike,
			pacing: pacing{bindBackend: picked.ID, bindAt: now - sec/2},
			want:   want{verdictForward, picked.ID, 0, nil}},
		{name: "bind repeated after retry", payload: ike,
			pacing: pacing{bindBackend: picked.ID, bindAt: now - sec},
			want:   want{verdictForward, picked.ID, 0, bind(picked.ID)}},
		{name: "bind proposed again when pick changes", payload: ike,
			pacing: pacing{bindBackend: other, bindAt: now - 1},
			want:   want{verdictForward, picked.ID, 0, bind(picked.ID)}},
		{name: "committed binding followed, fresh: no touch", payload: ike,
			entry: &Entry{Backend: other, Created: now - sec, LastSeen: now - sec},
			want:  want{verdictForward, other, 0, nil}},
		{name: "committed binding stale: touch",
			entry: &Entry{Backend: other, Created: now - 40*sec, LastSeen: now - 30*sec},
			want:  want{verdictForward, other, 0, touch(other)}},
		{name: "stale but this flow touched recently",
			entry:  &Entry{Backend: other, Created: now - 40*sec, LastSeen: now - 31*sec},
			pacing: pacing{touchAt: now - 10*sec},
			want:   want{verdictForward, other, 0, nil}},
		{name: "draining backend keeps its client", payload: []byte{0xff},
			entry: &Entry{Backend: other, LastSeen: now},
			mut:   func(bs []Backend) { bs[other-100].State = StateDrain },
			want:  want{verdictForward, other, 0, nil}},
		{name: "disabled backend: re-pick and rebind",
			entry: &Entry{Backend: picked.ID, LastSeen: now},
			mut:   func(bs []Backend) { bs[picked.ID-100].State = StateDisabled },
			want:  want{verdictForward, 0, 0, nil}}, // checked below: another backend, a bind
		{name: "down backend: re-pick",
			entry: &Entry{Backend: picked.ID, LastSeen: now},
			mut:   func(bs []Backend) { bs[picked.ID-100].Health = HealthDown },
			want:  want{verdictForward, 0, 0, nil}},
		{name: "removed backend: re-pick",
			entry: &Entry{Backend: 999, LastSeen: now},
			want:  want{verdictForward, picked.ID, 0, bind(picked.ID)}},
		{name: "nothing accepts new: drop",
			mut: func(bs []Backend) {
				for i := range bs {
					bs[i].State = StateDrain
				}
			},
			want: want{verdictDrop, 0, DropNoBackend, nil}},
		{name: "garbage is forwarded", payload: []byte{1, 2, 3},
			want: want{verdictForward, picked.ID, 0, bind(picked.ID)}},
		{name: "empty datagram is forwarded", payload: []byte{},
			want: want{verdictForward, picked.ID, 0, bind(picked.ID)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sv := handlerService(tt.mut)
			tb := NewTable()
			if tt.entry != nil {
				tb.Put(key, *tt.entry)
			}
			d := decide(sv, tb, testClient, 500, tt.payload, tt.pacing, now)
			if d.verdict != tt.want.verdict {
				t.Fatalf("verdict %v, want %v (%+v)", d.verdict, tt.want.verdict, d)
			}
			if d.verdict == verdictDrop {
				if d.reason != tt.want.reason || d.propose {
					t.Fatalf("drop %v propose %v, want %v and no proposal", d.reason, d.propose, tt.want.reason)
				}
				return
			}
			got := sv.backends[d.backend]
			if tt.want.backend == 0 { // re-pick away from the bound backend
				if got.ID == tt.entry.Backend || !got.AcceptsNew() {
					t.Fatalf("re-picked %d (bound %d)", got.ID, tt.entry.Backend)
				}
				tt.want.proposal = bind(got.ID)
			} else if got.ID != tt.want.backend {
				t.Fatalf("backend %d, want %d", got.ID, tt.want.backend)
			}
			switch {
			case tt.want.proposal == nil && d.propose:
				t.Fatalf("unexpected proposal %+v", d.proposal)
			case tt.want.proposal != nil && (!d.propose || d.proposal != *tt.want.proposal):
				t.Fatalf("proposal %v %+v, want %+v", d.propose, d.proposal, *tt.want.proposal)
			}
			if d.propose && d.proposal.Kind == ProposeTouch && d.pacing.touchAt != now {
				t.Fatal("touch not recorded in pacing")
			}
			if d.propose && d.proposal.Kind == ProposeBind && (d.pacing.bindAt != now || d.pacing.bindBackend != got.ID) {
				t.Fatal("bind not recorded in pacing")
			}
		})
	}
}

// TestDecideTouchPacing runs one flow through an hour of a datagram a second
// against a table that never commits the touches: touches stay at most one
// per touch interval.
func TestDecideTouchPacing(t *testing.T) {
	sv := handlerService(nil)
	tb := NewTable()
	key := ClientKey{Service: 7, Client: testClient}
	tb.Put(key, Entry{Backend: 101, Created: sec, LastSeen: sec})
	var p pacing
	touches := 0
	for now := sec; now <= 3600*sec; now += sec {
		d := decide(sv, tb, testClient, 4500, []byte{0xff}, p, now)
		p = d.pacing
		if d.propose {
			touches++
		}
	}
	if touches < 118 || touches > 120 {
		t.Fatalf("%d touches in an hour at 30 s pacing", touches)
	}
}

func TestDecideClassifies(t *testing.T) {
	sv := handlerService(nil)
	for _, d := range loadCapture(t)[:20] {
		if d.Dst.Port() != 500 && d.Dst.Port() != 4500 {
			continue
		}
		client := AddrFrom(d.Src.Addr())
		got := decide(sv, NewTable(), client, d.Dst.Port(), d.Payload, pacing{}, sec)
		if want := Classify(d.Dst.Port(), d.Payload); got.class != want || want == ClassMalformed {
			t.Errorf("class %v, want %v", got.class, want)
		}
	}
}

func TestDecideAllocs(t *testing.T) {
	sv := handlerService(nil)
	tb := NewTable()
	for i := 0; i < 1000; i++ {
		tb.Put(ClientKey{Service: 7, Client: testKey(i).Client}, Entry{Backend: 100 + uint32(i%3), LastSeen: sec})
	}
	ike := MinimalIKESAInit(9, true)
	i := 0
	allocs := testing.AllocsPerRun(1000, func() {
		c := testKey(i % 2000).Client // half hit, half miss (pick + bind)
		d := decide(sv, tb, c, 4500, ike, pacing{}, int64(i)*sec)
		if d.verdict != verdictForward {
			t.Fatal("dropped")
		}
		i++
	})
	if allocs != 0 {
		t.Fatalf("decide allocates %v per datagram", allocs)
	}
}

func BenchmarkDecideHit(b *testing.B) {
	sv := handlerService(nil)
	tb := NewTable()
	const n = 10000
	for i := 0; i < n; i++ {
		tb.Put(ClientKey{Service: 7, Client: testKey(i).Client}, Entry{Backend: 100 + uint32(i%3), LastSeen: 0})
	}
	esp := []byte{1, 2, 3, 4, 0, 0, 0, 1}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		decide(sv, tb, testKey(i%n).Client, 4500, esp, pacing{touchAt: 1}, 2)
	}
}

func BenchmarkDecideMiss(b *testing.B) {
	sv := handlerService(nil)
	tb := NewTable()
	ike := MinimalIKESAInit(9, false)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		decide(sv, tb, testKey(i).Client, 500, ike, pacing{}, 2)
	}
}

func BenchmarkClassify(b *testing.B) {
	ds := loadCapture(b)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		d := &ds[i%len(ds)]
		Classify(d.Dst.Port(), d.Payload)
	}
}

// FuzzDecide: any datagram, client, port, pacing and clock gives a decision
// that names a real backend or a drop, and a proposal for this client only.
func FuzzDecide(f *testing.F) {
	for _, d := range loadCapture(f)[:12] {
		f.Add(d.Payload, []byte(d.Src.Addr().AsSlice()), d.Dst.Port(), uint8(0), int64(5), uint32(0))
	}
	f.Add([]byte{0xff}, []byte{1, 2, 3, 4}, uint16(4500), uint8(101), int64(-1), uint32(1))
	f.Fuzz(func(t *testing.T, payload, client []byte, port uint16, bound uint8, now int64, mut uint32) {
		sv := handlerService(func(bs []Backend) {
			for i := range bs {
				bs[i].State = BackendState(mut>>(i*4)&3 + 1)
				bs[i].Health = Health(mut >> (i*4 + 2) & 3)
			}
		})
		var c Addr
		copy(c[:], client)
		tb := NewTable()
		key := ClientKey{Service: 7, Client: c}
		if bound != 0 {
			tb.Put(key, Entry{Backend: uint32(bound), LastSeen: now - int64(bound)*sec})
		}
		d := decide(sv, tb, c, port, payload, pacing{touchAt: now / 2}, now)
		if d.verdict == verdictForward {
			if d.backend < 0 || d.backend >= len(sv.backends) || !sv.backends[d.backend].Usable() {
				t.Fatalf("forward to %d", d.backend)
			}
		} else if d.reason != DropNoBackend {
			t.Fatalf("drop reason %v", d.reason)
		}
		if d.propose && d.proposal.Key != key {
			t.Fatalf("proposal for %v", d.proposal.Key)
		}
	})
}
