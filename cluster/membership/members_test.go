package membership

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	autopilot "github.com/hashicorp/raft-autopilot"
)

// cluster3 starts a (the seed) and b, c joining through a alone, and waits
// until every member sees three alive.
func cluster3(t *testing.T, mutate func(*Config)) (a, b, c *Members) {
	t.Helper()
	log := testLogger(t)
	mk := func(name string, join []string) *Members {
		cfg := testConfig(log, name)
		cfg.Join = join
		if mutate != nil {
			mutate(&cfg)
		}
		return start(t, cfg)
	}
	a = mk("a", nil)
	seed := []string{a.LocalAddr().String()}
	b = mk("b", seed)
	c = mk("c", seed)
	join(t, b)
	join(t, c)
	for _, m := range []*Members{a, b, c} {
		waitFor(t, 10*time.Second, "three alive", aliveCount(m, 3))
	}
	return a, b, c
}

func TestThreeMembersJoinThroughOneSeed(t *testing.T) {
	a, b, c := cluster3(t, func(cfg *Config) {
		if cfg.Name == "c" {
			cfg.Meta.Role = RoleWitness
		}
	})
	byName := map[string]*Members{"a": a, "b": b, "c": c}
	for _, observer := range []*Members{a, b, c} {
		for _, mem := range observer.Members() {
			want := testConfig(nil, mem.Name).Meta
			if mem.Name == "c" {
				want.Role = RoleWitness
			}
			if mem.Meta != want || mem.MetaErr != nil {
				t.Errorf("%s sees %s meta %+v (err %v), want %+v", observer.LocalName(), mem.Name, mem.Meta, mem.MetaErr, want)
			}
			if got := byName[mem.Name].LocalAddr(); mem.Addr != got {
				t.Errorf("%s sees %s at %v, want %v", observer.LocalName(), mem.Name, mem.Addr, got)
			}
		}
	}

	// The seed reported its own join and the two others', in order.
	var joined []string
	for len(joined) < 3 {
		ev := waitEvent(t, a.Events(), 5*time.Second, "join events on a", func(e Event) bool { return e.Kind == EventJoin })
		joined = append(joined, ev.Member.Name)
	}
	if joined[0] != "a" {
		t.Errorf("first join event on a is %q, want a itself (all: %v)", joined[0], joined)
	}

	// What the leader hands autopilot's KnownServers.
	servers := AutopilotServers(a.Members())
	if len(servers) != 3 {
		t.Fatalf("AutopilotServers: %d servers, want 3", len(servers))
	}
	s := servers["c"]
	want := autopilot.Server{ID: "c", Name: "c", Address: raft.ServerAddress("c.raft.test:7452"),
		NodeStatus: autopilot.NodeAlive, Version: "test-c"}
	if s.ID != want.ID || s.Name != want.Name || s.Address != want.Address || s.NodeStatus != want.NodeStatus ||
		s.Version != want.Version || s.Meta["role"] != RoleWitness || s.Meta["admin_addr"] != "c.admin.test:7450" {
		t.Errorf("AutopilotServers[c] = %+v, want %+v with role witness", *s, want)
	}
}

func TestShutdownWithoutLeaveIsDetectedAsFailed(t *testing.T) {
	a, b, c := cluster3(t, nil)
	if err := c.Shutdown(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	// fastTunables: suspicion 3×100ms, ≤2× that without confirmation, plus
	// up to two probe rounds; 5s leaves room for -race on a busy machine.
	const bound = 5 * time.Second
	for _, m := range []*Members{a, b} {
		waitFor(t, bound, "c declared failed", hasStatus(m, "c", StatusFailed))
	}
	t.Logf("c failed on a and b %v after Shutdown (fast tunables)", time.Since(killed).Round(time.Millisecond))
	ev := waitEvent(t, a.Events(), time.Second, "failed event on a", func(e Event) bool { return e.Member.Name == "c" && e.Kind != EventJoin })
	if ev.Kind != EventFailed || ev.Member.Status != StatusFailed {
		t.Errorf("event for c: %v %v, want failed", ev.Kind, ev.Member.Status)
	}
	if s := AutopilotServers(a.Members())["c"]; s == nil || s.NodeStatus != autopilot.NodeFailed {
		t.Errorf("autopilot server c: %+v, want status failed", s)
	}
}

func TestLeaveIsSeenAsLeft(t *testing.T) {
	a, b, c := cluster3(t, nil)
	if err := c.Leave(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	if err := c.Leave(time.Second); err != nil {
		t.Errorf("second leave: %v", err)
	}
	for _, m := range []*Members{a, b} {
		waitFor(t, 2*time.Second, "c left", hasStatus(m, "c", StatusLeft))
	}
	ev := waitEvent(t, b.Events(), time.Second, "leave event on b", func(e Event) bool { return e.Member.Name == "c" && e.Kind != EventJoin })
	if ev.Kind != EventLeave {
		t.Errorf("event for c on b: %v, want leave", ev.Kind)
	}
	if err := c.SetMeta(testConfig(nil, "c").Meta, time.Second); !errors.Is(err, ErrShutdown) {
		t.Errorf("SetMeta after Leave: %v, want ErrShutdown", err)
	}
	if err := c.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if err := c.Leave(time.Second); !errors.Is(err, ErrShutdown) {
		t.Errorf("Leave after Shutdown: %v, want ErrShutdown", err)
	}
	// Shutdown after Leave does not turn left into failed.
	for _, m := range []*Members{a, b} {
		if mem, _ := member(m, "c"); mem.Status != StatusLeft {
			t.Errorf("%s sees c %v after its shutdown, want left", m.LocalName(), mem.Status)
		}
	}
	for range c.Events() { // Shutdown closed it, so this ends
	}
}

func TestSetMetaIsGossiped(t *testing.T) {
	a, b, _ := cluster3(t, nil)
	meta := testConfig(nil, "b").Meta
	meta.Version = "v2"
	meta.Role = RoleWitness
	if err := b.SetMeta(meta, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	ev := waitEvent(t, a.Events(), 5*time.Second, "update event on a", func(e Event) bool { return e.Kind == EventUpdate && e.Member.Name == "b" })
	if ev.Member.Meta != meta {
		t.Errorf("update carries %+v, want %+v", ev.Member.Meta, meta)
	}
	if mem, _ := member(a, "b"); mem.Meta != meta || mem.Status != StatusAlive {
		t.Errorf("a sees b %+v, want alive with %+v", mem, meta)
	}
	big := meta
	big.Version = strings.Repeat("v", 600)
	if err := b.SetMeta(big, time.Second); !errors.Is(err, ErrMetaTooLarge) {
		t.Errorf("SetMeta with 600-byte version: %v, want ErrMetaTooLarge", err)
	}
}

func TestEncryption(t *testing.T) {
	key1 := bytes.Repeat([]byte{1}, 32)
	key2 := bytes.Repeat([]byte{2}, 32)
	a, b, _ := cluster3(t, func(cfg *Config) { cfg.EncryptKey = key1 })

	for _, tc := range []struct {
		name string
		key  []byte
	}{
		{"other-key", key2},
		{"no-key", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(testLogger(t), "intruder-"+tc.name)
			cfg.EncryptKey = tc.key
			cfg.Join = []string{a.LocalAddr().String()}
			m := start(t, cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
			defer cancel()
			err := m.Join(ctx)
			if !errors.Is(err, ErrJoin) {
				t.Fatalf("join with %s: %v, want ErrJoin", tc.name, err)
			}
			t.Logf("join error: %v", err)
			if !strings.Contains(err.Error(), a.LocalAddr().String()) || !strings.Contains(err.Error(), "crypt") {
				t.Errorf("join error %q names neither the seed nor the encryption problem", err)
			}
			for _, observer := range []*Members{a, b, m} {
				if _, ok := member(observer, cfg.Name); ok && observer != m {
					t.Errorf("%s knows the intruder", observer.LocalName())
				}
				if observer == m {
					if n := len(m.Members()); n != 1 {
						t.Errorf("intruder sees %d members, want only itself", n)
					}
				}
			}
		})
	}
}

func TestJoinRetriesUntilASeedAnswers(t *testing.T) {
	log := testLogger(t)
	// Take a free port for the seed, then free it: b starts joining an
	// address where nobody listens yet.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	seedAddr := l.Addr().String()
	l.Close()

	bcfg := testConfig(log, "b")
	bcfg.Join = []string{seedAddr}
	failed := make(chan struct{}, 1)
	bcfg.Logger = slog.New(&signalHandler{Handler: log.Handler(), msg: "join attempt failed", ch: failed})
	b := start(t, bcfg)
	joined := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		joined <- b.Join(ctx)
	}()
	// Start the seed only after b's first attempt has failed.
	select {
	case <-failed:
	case err := <-joined:
		t.Fatalf("join returned before the seed existed: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("no failed join attempt logged")
	}
	acfg := testConfig(log, "a")
	acfg.BindAddr = seedAddr
	a, err := New(acfg)
	if err != nil {
		t.Skipf("the freed seed port was taken meanwhile: %v", err)
	}
	t.Cleanup(func() { a.Shutdown() })
	select {
	case err := <-joined:
		if err != nil {
			t.Fatalf("join: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("join did not return")
	}
	waitFor(t, 5*time.Second, "two alive", aliveCount(a, 2))
}

func TestJoinGivesUpWithContextAndStopsOnShutdown(t *testing.T) {
	log := testLogger(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := l.Addr().String()
	l.Close()

	cfg := testConfig(log, "lonely")
	cfg.Join = []string{dead}
	m := start(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancel()
	begin := time.Now()
	err = m.Join(ctx)
	if !errors.Is(err, ErrJoin) || !strings.Contains(err.Error(), dead) {
		t.Fatalf("join: %v, want ErrJoin naming %s", err, dead)
	}
	if took := time.Since(begin); took > 3*time.Second {
		t.Errorf("join took %v with a 700ms context", took)
	}
	if !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("join error %q lacks memberlist's cause", err)
	}
	t.Logf("join error: %v", err)

	// Shutdown ends a Join that would otherwise retry for a minute.
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		done <- m.Join(ctx)
	}()
	if err := m.Shutdown(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrShutdown) {
			t.Errorf("join during shutdown: %v, want ErrShutdown", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("join still running after Shutdown")
	}
	if err := m.Join(context.Background()); !errors.Is(err, ErrShutdown) {
		t.Errorf("join after shutdown: %v, want ErrShutdown", err)
	}
	if err := m.Shutdown(); err != nil {
		t.Errorf("second shutdown: %v", err)
	}
}

func TestEventsNeverBlockMemberlist(t *testing.T) {
	log := testLogger(t)
	acfg := testConfig(log, "a")
	acfg.EventBuffer = 1 // filled by a's own join; nobody reads
	a := start(t, acfg)
	seed := []string{a.LocalAddr().String()}
	var others []*Members
	for _, name := range []string{"b", "c", "d"} {
		cfg := testConfig(log, name)
		cfg.Join = seed
		m := start(t, cfg)
		join(t, m)
		others = append(others, m)
	}
	waitFor(t, 10*time.Second, "four alive on a", aliveCount(a, 4))
	if d := a.DroppedEvents(); d < 3 {
		t.Errorf("dropped events = %d, want at least 3 (joins of b, c, d)", d)
	}
	// memberlist goes on: it still detects a failure and a meta change.
	before := a.DroppedEvents()
	if err := others[2].Shutdown(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "d failed on a", hasStatus(a, "d", StatusFailed))
	meta := testConfig(nil, "b").Meta
	meta.Version = "v2"
	if err := others[0].SetMeta(meta, time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "b's new meta on a", func() (bool, string) {
		mem, _ := member(a, "b")
		return mem.Meta == meta, "a sees b version " + mem.Meta.Version
	})
	if a.DroppedEvents() < before+2 {
		t.Errorf("dropped events %d → %d, want the failure and the update dropped too", before, a.DroppedEvents())
	}
	// The one buffered event is still a's own join.
	if ev := <-a.Events(); ev.Kind != EventJoin || ev.Member.Name != "a" {
		t.Errorf("buffered event %v %s, want join a", ev.Kind, ev.Member.Name)
	}
}

func TestRestartUnderSameNameAtNewAddress(t *testing.T) {
	a, b, c := cluster3(t, nil)
	oldAddr := c.LocalAddr()
	if err := c.Shutdown(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "c failed", hasStatus(a, "c", StatusFailed))

	cfg := testConfig(testLogger(t), "c")
	cfg.Join = []string{b.LocalAddr().String()}
	c2 := start(t, cfg)
	join(t, c2)
	// memberlist accepts the new address once DeadNodeReclaimTime (200ms
	// here) has passed; push/pull (1s) carries it.
	waitFor(t, 5*time.Second, "c alive again at its new address", func() (bool, string) {
		mem, _ := member(a, "c")
		return mem.Status == StatusAlive && mem.Addr == c2.LocalAddr(),
			"a sees c " + mem.Status.String() + " at " + mem.Addr.String()
	})
	if c2.LocalAddr() == oldAddr {
		t.Logf("c came back on the same address %v", oldAddr)
	}
}

// signalHandler passes records on and signals ch when one has message msg,
// whatever the level.
type signalHandler struct {
	slog.Handler
	msg string
	ch  chan struct{}
}

func (h *signalHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *signalHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == h.msg {
		select {
		case h.ch <- struct{}{}:
		default:
		}
	}
	if !h.Handler.Enabled(ctx, r.Level) {
		return nil
	}
	return h.Handler.Handle(ctx, r)
}

func (h *signalHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &signalHandler{Handler: h.Handler.WithAttrs(as), msg: h.msg, ch: h.ch}
}

func (h *signalHandler) WithGroup(g string) slog.Handler {
	return &signalHandler{Handler: h.Handler.WithGroup(g), msg: h.msg, ch: h.ch}
}
