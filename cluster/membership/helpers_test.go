package membership

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// fastTunables make failure detection take a few hundred milliseconds, so
// the tests stay short; still loose enough for -race on a shared 2-core box.
var fastTunables = Tunables{
	ProbeInterval:           100 * time.Millisecond,
	ProbeTimeout:            50 * time.Millisecond,
	SuspicionMult:           3,
	SuspicionMaxTimeoutMult: 2,
	GossipInterval:          20 * time.Millisecond,
	PushPullInterval:        time.Second,
	TCPTimeout:              time.Second,
	DeadNodeReclaimTime:     200 * time.Millisecond,
}

// testWriter sends log lines to t.Log until the test's cleanups are done:
// memberlist may log from its own goroutines after Shutdown returns.
type testWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// testLogger logs to the test. Call it before creating members so that its
// cleanup runs after theirs.
func testLogger(t testing.TB) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// testConfig is a valid config on 127.0.0.1 port 0 with fast tunables.
func testConfig(log *slog.Logger, name string) Config {
	return Config{
		Name:     name,
		BindAddr: "127.0.0.1:0",
		Meta: Meta{
			RaftAddr:  name + ".raft.test:7452",
			AdminAddr: name + ".admin.test:7450",
			Role:      RoleVoter,
			Version:   "test-" + name,
		},
		Logger:   log,
		Tunables: fastTunables,
	}
}

// start creates a member and shuts it down when the test ends.
func start(t *testing.T, cfg Config) *Members {
	t.Helper()
	m, err := New(cfg)
	if err != nil {
		t.Fatalf("new %s: %v", cfg.Name, err)
	}
	t.Cleanup(func() {
		if err := m.Shutdown(); err != nil {
			t.Errorf("shutdown %s: %v", cfg.Name, err)
		}
	})
	return m
}

// join joins m to its configured addresses within 10s.
func join(t *testing.T, m *Members) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.Join(ctx); err != nil {
		t.Fatalf("join %s: %v", m.LocalName(), err)
	}
}

// waitFor polls cond every 5ms until it holds, failing the test with cond's
// last explanation after timeout. It returns how long it took.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(timeout)
	for {
		ok, why := cond()
		if ok {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still not true after %v: %s", what, timeout, why)
		}
		time.Sleep(5 * time.Millisecond) // poll interval, not a wait for state
	}
}

// member returns m's view of the member called name.
func member(m *Members, name string) (Member, bool) {
	for _, mem := range m.Members() {
		if mem.Name == name {
			return mem, true
		}
	}
	return Member{}, false
}

// hasStatus is a waitFor condition: observer sees name with status.
func hasStatus(observer *Members, name string, status Status) func() (bool, string) {
	return func() (bool, string) {
		mem, ok := member(observer, name)
		if !ok {
			return false, fmt.Sprintf("%s does not know %s", observer.LocalName(), name)
		}
		return mem.Status == status, fmt.Sprintf("%s sees %s %v", observer.LocalName(), name, mem.Status)
	}
}

// aliveCount is a waitFor condition: observer sees exactly n alive members.
func aliveCount(observer *Members, n int) func() (bool, string) {
	return func() (bool, string) {
		var alive []string
		for _, mem := range observer.Members() {
			if mem.Status == StatusAlive {
				alive = append(alive, mem.Name)
			}
		}
		return len(alive) == n, fmt.Sprintf("%s sees alive %v", observer.LocalName(), alive)
	}
}

// waitEvent reads ch until an event matches, failing after timeout.
func waitEvent(t *testing.T, ch <-chan Event, timeout time.Duration, what string, match func(Event) bool) Event {
	t.Helper()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	var seen []string
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatalf("%s: events closed; saw %v", what, seen)
			}
			if match(ev) {
				return ev
			}
			seen = append(seen, ev.Kind.String()+" "+ev.Member.Name)
		case <-timer.C:
			t.Fatalf("%s: no such event after %v; saw %v", what, timeout, seen)
		}
	}
}
