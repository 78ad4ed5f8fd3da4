package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/dataplane"
	raftlogv1 "github.com/ikelb/ikelb/proto/raftlog/v1"
	"google.golang.org/protobuf/proto"
)

// testFSM is an FSM fed with entries at increasing indexes.
type testFSM struct {
	*FSM
	t     testing.TB
	index uint64
}

func newTestFSM(t testing.TB) *testFSM {
	return &testFSM{FSM: newFSM(dataplane.NewTable(), slog.New(slog.DiscardHandler)), t: t}
}

func (f *testFSM) apply(typ entryType, m proto.Message) any {
	f.t.Helper()
	data, err := encodeEntry(typ, m)
	if err != nil {
		f.t.Fatal(err)
	}
	f.index++
	return f.Apply(&raft.Log{Index: f.index, Term: 1, Type: raft.LogCommand, Data: data})
}

func (f *testFSM) mustApply(typ entryType, m proto.Message) applyResult {
	f.t.Helper()
	r := f.apply(typ, m)
	if err, ok := r.(error); ok {
		f.t.Fatalf("apply %v: %v", typ, err)
	}
	return r.(applyResult)
}

func ip(s string) []byte { return addrBytes(netip.MustParseAddr(s)) }

func client(s string) []byte {
	a := dataplane.AddrFrom(netip.MustParseAddr(s))
	return a[:]
}

func key(svc uint32, c string) dataplane.ClientKey {
	return dataplane.ClientKey{Service: svc, Client: dataplane.AddrFrom(netip.MustParseAddr(c))}
}

func testService(name, vip string, backends ...string) *raftlogv1.ServiceRecord {
	r := &raftlogv1.ServiceRecord{
		Name: name, Vip: ip(vip), Ports: []uint32{500, 4500},
		PersistenceTimeoutNs: 300e9, ForwardingMode: 1, AffinityKey: 1,
		HealthCheck: &raftlogv1.HealthCheckRecord{Type: 1},
	}
	for _, b := range backends {
		r.Backends = append(r.Backends, &raftlogv1.BackendRecord{Addr: ip(b), Weight: 100, State: 1})
	}
	return r
}

func bind(svc, backend uint32, c string, at int64) *raftlogv1.Bind {
	return &raftlogv1.Bind{ServiceId: svc, Client: client(c), BackendId: backend, AtNs: at}
}

// dump renders the whole state canonically, for comparing replicas.
func dump(f *FSM) string {
	var b strings.Builder
	f.mu.RLock()
	defer f.mu.RUnlock()
	fmt.Fprintf(&b, "next_service_id=%d\n", f.nextServiceID)
	var recs []*raftlogv1.ServiceRecord
	for _, s := range f.byID {
		if f.byName[s.rec.GetName()] != s {
			fmt.Fprintf(&b, "INCONSISTENT %q\n", s.rec.GetName())
		}
		recs = append(recs, s.rec)
	}
	slices.SortFunc(recs, func(a, b *raftlogv1.ServiceRecord) int { return int(a.GetId()) - int(b.GetId()) })
	for _, r := range recs {
		m, _ := proto.MarshalOptions{Deterministic: true}.Marshal(r)
		fmt.Fprintf(&b, "service %x\n", m)
	}
	var lines []string
	f.table.Range(func(k dataplane.ClientKey, e dataplane.Entry) bool {
		lines = append(lines, fmt.Sprintf("aff %d %v %d %d %d", k.Service, k.Client, e.Backend, e.Created, e.LastSeen))
		return true
	})
	slices.Sort(lines)
	b.WriteString(strings.Join(lines, "\n"))
	return b.String()
}

func TestPutServiceAssignsIDsAndKeepsBackendsByAddress(t *testing.T) {
	f := newTestFSM(t)
	r := f.mustApply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("a", "10.0.0.1", "10.1.0.1", "10.1.0.2")})
	if r.service.GetId() != 1 || r.service.GetVersion() != 1 {
		t.Fatalf("created id %d version %d, want 1 1", r.service.GetId(), r.service.GetVersion())
	}
	if ids := backendIDs(r.service); !slices.Equal(ids, []uint32{1, 2}) {
		t.Fatalf("backend ids %v", ids)
	}
	if err, _ := f.apply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("a", "10.0.0.2")}).(error); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate create: %v, want ErrExists", err)
	}
	if err, _ := f.apply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("b", "10.0.0.1")}).(error); !errors.Is(err, ErrAddrInUse) {
		t.Fatalf("same vip:port: %v, want ErrAddrInUse", err)
	}
	if err, _ := f.apply(entryPutService, &raftlogv1.PutService{Service: testService("zz", "10.0.0.9")}).(error); !errors.Is(err, ErrNotFound) {
		t.Fatalf("replace missing: %v, want ErrNotFound", err)
	}

	// Health of a kept backend survives a replace.
	f.mustApply(entryHealthBatch, &raftlogv1.HealthBatch{Changes: []*raftlogv1.HealthChange{{ServiceId: 1, BackendId: 2, Health: 2, AtNs: 7}}})
	f.mustApply(entryAffinityBatch, &raftlogv1.AffinityBatch{Binds: []*raftlogv1.Bind{bind(1, 1, "192.0.2.1", 10)}})

	// Replace: drop 10.1.0.1, keep 10.1.0.2, add 10.1.0.3.
	rep := testService("a", "10.0.0.1", "10.1.0.3", "10.1.0.2")
	if err, _ := f.apply(entryPutService, &raftlogv1.PutService{Service: rep, ExpectedVersion: 99}).(error); !errors.Is(err, ErrConflict) {
		t.Fatalf("stale expected version: %v, want ErrConflict", err)
	}
	r = f.mustApply(entryPutService, &raftlogv1.PutService{Service: rep, ExpectedVersion: 1})
	if ids := backendIDs(r.service); !slices.Equal(ids, []uint32{3, 2}) {
		t.Fatalf("backend ids after replace %v, want [3 2]", ids)
	}
	if h := r.service.GetBackends()[1].GetHealth(); h != 2 {
		t.Fatalf("kept backend health %d, want 2", h)
	}
	if r.service.GetVersion() != f.index {
		t.Fatalf("version %d, want %d", r.service.GetVersion(), f.index)
	}
	if _, ok := f.Lookup(key(1, "192.0.2.1")); ok {
		t.Fatal("affinity to a removed backend survived the replace")
	}
	// The next create gets a fresh id.
	r = f.mustApply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("b", "10.0.0.2")})
	if r.service.GetId() != 2 {
		t.Fatalf("second service id %d", r.service.GetId())
	}
}

func backendIDs(r *raftlogv1.ServiceRecord) []uint32 {
	var ids []uint32
	for _, b := range r.GetBackends() {
		ids = append(ids, b.GetId())
	}
	return ids
}

func TestBindFirstWriterWins(t *testing.T) {
	f := newTestFSM(t)
	f.mustApply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("a", "10.0.0.1", "10.1.0.1", "10.1.0.2", "10.1.0.3")})
	// Two nodes bind the same client to different backends in one entry
	// and in a later one: the first committed bind wins both times.
	r := f.mustApply(entryAffinityBatch, &raftlogv1.AffinityBatch{Binds: []*raftlogv1.Bind{bind(1, 1, "192.0.2.1", 10), bind(1, 2, "192.0.2.1", 11)}})
	if r.bound != 1 || r.kept != 1 {
		t.Fatalf("bound %d kept %d, want 1 1", r.bound, r.kept)
	}
	f.mustApply(entryAffinityBatch, &raftlogv1.AffinityBatch{Binds: []*raftlogv1.Bind{bind(1, 3, "192.0.2.1", 12)}})
	e, _ := f.Lookup(key(1, "192.0.2.1"))
	if want := (dataplane.Entry{Backend: 1, Created: 10, LastSeen: 12}); e != want {
		t.Fatalf("entry %+v, want %+v", e, want)
	}

	tests := []struct {
		name   string
		change proto.Message
		typ    entryType
	}{
		{"backend down", &raftlogv1.HealthBatch{Changes: []*raftlogv1.HealthChange{{ServiceId: 1, BackendId: 1, Health: 2, AtNs: 20}}}, entryHealthBatch},
		{"backend disabled", disabled(testService("a", "10.0.0.1", "10.1.0.1", "10.1.0.2", "10.1.0.3"), 0), entryPutService},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newTestFSM(t)
			f.mustApply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("a", "10.0.0.1", "10.1.0.1", "10.1.0.2", "10.1.0.3")})
			f.mustApply(entryAffinityBatch, &raftlogv1.AffinityBatch{Binds: []*raftlogv1.Bind{bind(1, 1, "192.0.2.1", 10)}})
			f.mustApply(tt.typ, tt.change)
			// A bind to the unusable backend is ignored; a bind elsewhere overwrites.
			r := f.mustApply(entryAffinityBatch, &raftlogv1.AffinityBatch{Binds: []*raftlogv1.Bind{bind(1, 1, "192.0.2.9", 30), bind(1, 2, "192.0.2.1", 30)}})
			if r.bound != 1 {
				t.Fatalf("bound %d, want 1", r.bound)
			}
			if _, ok := f.Lookup(key(1, "192.0.2.9")); ok {
				t.Fatal("bind to an unusable backend was committed")
			}
			e, _ := f.Lookup(key(1, "192.0.2.1"))
			if want := (dataplane.Entry{Backend: 2, Created: 30, LastSeen: 30}); e != want {
				t.Fatalf("entry %+v, want %+v", e, want)
			}
		})
	}
	// Binds for unknown services or backends and malformed clients are ignored.
	r = f.mustApply(entryAffinityBatch, &raftlogv1.AffinityBatch{Binds: []*raftlogv1.Bind{
		bind(9, 1, "192.0.2.5", 1), bind(1, 9, "192.0.2.5", 1), {ServiceId: 1, BackendId: 1, Client: []byte{1, 2, 3, 4}},
	}})
	if r.bound != 0 || f.Len() != 1 {
		t.Fatalf("bound %d len %d, want 0 1", r.bound, f.Len())
	}
}

func disabled(r *raftlogv1.ServiceRecord, i int) *raftlogv1.PutService {
	r.Backends[i].State = 3
	return &raftlogv1.PutService{Service: r}
}

func TestTouchExpireRace(t *testing.T) {
	setup := func(t *testing.T) *testFSM {
		f := newTestFSM(t)
		f.mustApply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("a", "10.0.0.1", "10.1.0.1")})
		f.mustApply(entryAffinityBatch, &raftlogv1.AffinityBatch{Binds: []*raftlogv1.Bind{bind(1, 1, "192.0.2.1", 100)}})
		return f
	}
	touch := &raftlogv1.AffinityBatch{Touches: []*raftlogv1.Touch{{ServiceId: 1, Client: client("192.0.2.1"), AtNs: 200}}}
	expire := &raftlogv1.AffinityBatch{Expires: []*raftlogv1.Expire{{ServiceId: 1, Client: client("192.0.2.1"), LastSeenNs: 100}}}

	t.Run("touch committed first", func(t *testing.T) {
		f := setup(t)
		f.mustApply(entryAffinityBatch, touch)
		if r := f.mustApply(entryAffinityBatch, expire); r.deleted != 0 {
			t.Fatal("expire deleted an entry refreshed after it was judged expired")
		}
		if e, ok := f.Lookup(key(1, "192.0.2.1")); !ok || e.LastSeen != 200 {
			t.Fatalf("entry %+v %v, want last seen 200", e, ok)
		}
	})
	t.Run("expire committed first", func(t *testing.T) {
		f := setup(t)
		if r := f.mustApply(entryAffinityBatch, expire); r.deleted != 1 {
			t.Fatalf("deleted %d, want 1", r.deleted)
		}
		if r := f.mustApply(entryAffinityBatch, touch); r.touched != 0 {
			t.Fatal("touch resurrected an expired entry")
		}
		if _, ok := f.Lookup(key(1, "192.0.2.1")); ok {
			t.Fatal("entry still present")
		}
	})
	t.Run("older touch does not move last seen back", func(t *testing.T) {
		f := setup(t)
		f.mustApply(entryAffinityBatch, touch)
		f.mustApply(entryAffinityBatch, &raftlogv1.AffinityBatch{Touches: []*raftlogv1.Touch{{ServiceId: 1, Client: client("192.0.2.1"), AtNs: 150}}})
		if e, _ := f.Lookup(key(1, "192.0.2.1")); e.LastSeen != 200 {
			t.Fatalf("last seen %d, want 200", e.LastSeen)
		}
	})
}

func TestDeleteAffinitiesAndService(t *testing.T) {
	f := newTestFSM(t)
	f.mustApply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("a", "10.0.0.1", "10.1.0.1", "10.1.0.2")})
	f.mustApply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("b", "10.0.0.2", "10.1.0.1")})
	f.mustApply(entryAffinityBatch, &raftlogv1.AffinityBatch{Binds: []*raftlogv1.Bind{
		bind(1, 1, "192.0.2.1", 1), bind(1, 2, "192.0.2.2", 1), bind(1, 2, "192.0.2.3", 1), bind(2, 1, "192.0.2.1", 1),
	}})
	del := func(m *raftlogv1.DeleteAffinities) uint64 { return f.mustApply(entryDeleteAffinities, m).deleted }
	if n := del(&raftlogv1.DeleteAffinities{ServiceId: 1, Client: client("192.0.2.1"), BackendId: 2}); n != 0 {
		t.Fatalf("deleted %d with the wrong backend filter", n)
	}
	if n := del(&raftlogv1.DeleteAffinities{ServiceId: 1, Client: client("192.0.2.1")}); n != 1 {
		t.Fatalf("delete one: %d", n)
	}
	f.mustApply(entryAffinityBatch, &raftlogv1.AffinityBatch{Binds: []*raftlogv1.Bind{bind(1, 1, "192.0.2.1", 1)}})
	if n := del(&raftlogv1.DeleteAffinities{ServiceId: 1, BackendId: 2}); n != 2 {
		t.Fatalf("delete backend's: %d, want 2", n)
	}
	if n := del(&raftlogv1.DeleteAffinities{ServiceId: 1}); n != 1 {
		t.Fatalf("delete service's: %d, want 1", n)
	}
	if err, _ := f.apply(entryDeleteAffinities, &raftlogv1.DeleteAffinities{ServiceId: 7}).(error); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown service: %v", err)
	}
	if n := f.mustApply(entryDeleteService, &raftlogv1.DeleteService{Name: "b"}).deleted; n != 1 {
		t.Fatalf("delete service removed %d affinities, want 1", n)
	}
	if f.Len() != 0 {
		t.Fatalf("%d affinities left", f.Len())
	}
	if _, ok := f.serviceByName("b"); ok {
		t.Fatal("service b still present")
	}
	if err, _ := f.apply(entryDeleteService, &raftlogv1.DeleteService{Name: "b"}).(error); !errors.Is(err, ErrNotFound) {
		t.Fatalf("delete twice: %v", err)
	}
}

func TestHealthBatchKeepsVersionAndPublishes(t *testing.T) {
	f := newTestFSM(t)
	f.mustApply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("a", "10.0.0.1", "10.1.0.1", "10.1.0.2")})
	<-f.Updates()
	r := f.mustApply(entryHealthBatch, &raftlogv1.HealthBatch{Changes: []*raftlogv1.HealthChange{
		{ServiceId: 1, BackendId: 2, Health: 2, AtNs: 5}, {ServiceId: 1, BackendId: 1, Health: 1, AtNs: 5}, {ServiceId: 9, BackendId: 1, Health: 2},
	}})
	if r.changed != 2 {
		t.Fatalf("changed %d, want 2", r.changed)
	}
	if r.service.GetVersion() != 1 {
		t.Fatalf("version %d after a health change, want 1", r.service.GetVersion())
	}
	set := <-f.Updates()
	if h := set[0].Backends[1].Health; h != dataplane.HealthDown {
		t.Fatalf("published health %v", h)
	}
	if r := f.mustApply(entryHealthBatch, &raftlogv1.HealthBatch{Changes: []*raftlogv1.HealthChange{{ServiceId: 1, BackendId: 2, Health: 2, AtNs: 6}}}); r.changed != 0 {
		t.Fatal("an unchanged health counted as a change")
	}
}

func TestPublishNeverBlocksAndKeepsLatest(t *testing.T) {
	f := newTestFSM(t)
	for i := range 50 {
		f.mustApply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService(fmt.Sprintf("s%d", i), fmt.Sprintf("10.0.0.%d", i+1))})
	}
	set := <-f.Updates()
	if len(set) != 50 {
		t.Fatalf("latest set has %d services, want 50", len(set))
	}
	select {
	case <-f.Updates():
		t.Fatal("more than one set queued")
	default:
	}
}

func TestCorruptEntryPanics(t *testing.T) {
	for _, data := range [][]byte{nil, {0}, {99, 1, 2}, {byte(entryPutService), 0xff, 0xff, 0xff}} {
		t.Run(fmt.Sprintf("%x", data), func(t *testing.T) {
			f := newTestFSM(t)
			defer func() {
				if recover() == nil {
					t.Fatal("Apply did not panic")
				}
			}()
			f.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: data})
		})
	}
}

// randomLog returns n entries of every type, from a seeded generator.
func randomLog(seed uint64, n int) [][]byte {
	rnd := rand.New(rand.NewPCG(seed, 1))
	var log [][]byte
	add := func(t entryType, m proto.Message) {
		b, err := encodeEntry(t, m)
		if err != nil {
			panic(err)
		}
		log = append(log, b)
	}
	for i := range 3 {
		add(entryPutService, &raftlogv1.PutService{Create: true, Service: testService(fmt.Sprintf("s%d", i), fmt.Sprintf("10.0.0.%d", i+1), "10.1.0.1", "10.1.0.2", "10.1.0.3")})
	}
	cl := func() []byte { return client(fmt.Sprintf("192.0.2.%d", rnd.IntN(50))) }
	for i := range n {
		svc, at := uint32(rnd.IntN(4)+1), int64(i)*1000
		switch rnd.IntN(10) {
		case 0:
			add(entryHealthBatch, &raftlogv1.HealthBatch{Changes: []*raftlogv1.HealthChange{{ServiceId: svc, BackendId: uint32(rnd.IntN(3) + 1), Health: uint32(rnd.IntN(3)), AtNs: at}}})
		case 1:
			add(entryDeleteAffinities, &raftlogv1.DeleteAffinities{ServiceId: svc, BackendId: uint32(rnd.IntN(4))})
		case 2:
			r := testService(fmt.Sprintf("s%d", svc-1), fmt.Sprintf("10.0.0.%d", svc), "10.1.0.2", fmt.Sprintf("10.1.0.%d", rnd.IntN(6)+1))
			if rnd.IntN(2) == 0 {
				r.Backends[0].State = uint32(rnd.IntN(3) + 1)
			}
			add(entryPutService, &raftlogv1.PutService{Service: r})
		default:
			b := &raftlogv1.AffinityBatch{}
			for range 20 {
				b.Binds = append(b.Binds, &raftlogv1.Bind{ServiceId: svc, Client: cl(), BackendId: uint32(rnd.IntN(6) + 1), AtNs: at})
				b.Touches = append(b.Touches, &raftlogv1.Touch{ServiceId: svc, Client: cl(), AtNs: at + int64(rnd.IntN(5000))})
				b.Expires = append(b.Expires, &raftlogv1.Expire{ServiceId: svc, Client: cl(), LastSeenNs: at - int64(rnd.IntN(3))*1000})
			}
			add(entryAffinityBatch, b)
		}
	}
	return log
}

func TestSameLogSameState(t *testing.T) {
	log := randomLog(1, 2000)
	var dumps []string
	for range 2 {
		f := newTestFSM(t)
		for i, data := range log {
			f.Apply(&raft.Log{Index: uint64(i + 1), Term: 1, Type: raft.LogCommand, Data: data})
		}
		dumps = append(dumps, dump(f.FSM))
	}
	if dumps[0] != dumps[1] {
		t.Fatal("two FSMs applying the same log differ")
	}
	if !strings.Contains(dumps[0], "aff ") {
		t.Fatal("the generated log left no affinities: the test proves nothing")
	}
}

// memSink is a raft.SnapshotSink in memory.
type memSink struct {
	bytes.Buffer
	cancelled, closed bool
}

func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Cancel() error { s.cancelled = true; return nil }
func (s *memSink) Close() error  { s.closed = true; return nil }

func snapshotBytes(t testing.TB, f *FSM) []byte {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Release()
	var sink memSink
	if err := snap.Persist(&sink); err != nil || !sink.closed {
		t.Fatalf("persist: %v (closed %v)", err, sink.closed)
	}
	return sink.Bytes()
}

func TestSnapshotRestoreRoundTrip(t *testing.T) {
	f := newTestFSM(t)
	f.mustApply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("a", "10.0.0.1", "10.1.0.1", "10.1.0.2")})
	f.mustApply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("b", "2001:db8::1", "2001:db8:1::1")})
	f.mustApply(entryHealthBatch, &raftlogv1.HealthBatch{Changes: []*raftlogv1.HealthChange{{ServiceId: 1, BackendId: 2, Health: 1, AtNs: 3}}})
	const n = 100_000
	for start := 0; start < n; start += 4096 {
		b := &raftlogv1.AffinityBatch{}
		for i := start; i < min(start+4096, n); i++ {
			var c dataplane.Addr
			c[0], c[1], c[2], c[3] = 0x20, 0x01, byte(i>>16), byte(i>>8)
			c[15] = byte(i)
			b.Binds = append(b.Binds, &raftlogv1.Bind{ServiceId: uint32(i%2 + 1), Client: c[:], BackendId: 1, AtNs: int64(i)})
		}
		f.mustApply(entryAffinityBatch, b)
	}
	if f.Len() != n {
		t.Fatalf("%d affinities, want %d", f.Len(), n)
	}
	data := snapshotBytes(t, f.FSM)

	g := newTestFSM(t)
	// Restore replaces whatever was there.
	g.mustApply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("old", "10.9.9.9")})
	g.mustApply(entryAffinityBatch, &raftlogv1.AffinityBatch{Binds: []*raftlogv1.Bind{{ServiceId: 1, Client: client("192.0.2.1"), BackendId: 0}}})
	if err := g.Restore(io.NopCloser(bytes.NewReader(data))); err != nil {
		t.Fatal(err)
	}
	if dump(f.FSM) != dump(g.FSM) {
		t.Fatal("restored state differs from the snapshotted one")
	}
	if set := <-g.Updates(); len(set) != 2 {
		t.Fatalf("restore published %d services, want 2", len(set))
	}
	// The restored FSM goes on assigning fresh ids.
	if r := g.mustApply(entryPutService, &raftlogv1.PutService{Create: true, Service: testService("c", "10.0.0.3")}); r.service.GetId() != 3 {
		t.Fatalf("id after restore %d, want 3", r.service.GetId())
	}

	for _, bad := range [][]byte{data[:len(data)/2], append(slices.Clone(data), 1, 0), {}} {
		if err := newTestFSM(t).Restore(io.NopCloser(bytes.NewReader(bad))); err == nil {
			t.Errorf("restore of a damaged snapshot (%d bytes) succeeded", len(bad))
		}
	}
}
