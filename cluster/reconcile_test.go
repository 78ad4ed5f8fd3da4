package cluster

import (
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/cluster/membership"
)

func TestPlanReconcile(t *testing.T) {
	now := time.Unix(1000, 0)
	const dead = 10 * time.Second
	voter := func(id string) raft.Server {
		return raft.Server{ID: raft.ServerID(id), Address: raft.ServerAddress(id + ":7452"), Suffrage: raft.Voter}
	}
	member := func(name string, st membership.Status, since time.Duration) membership.Member {
		return membership.Member{Name: name, Meta: membership.Meta{RaftAddr: name + ":7452"}, Status: st, Since: now.Add(-since)}
	}
	alive := func(name string) membership.Member { return member(name, membership.StatusAlive, time.Hour) }
	for _, tt := range []struct {
		name    string
		servers []raft.Server
		members []membership.Member
		missing map[raft.ServerID]time.Time
		want    []string // "+id" add, "-id" remove
		recheck time.Duration
	}{
		{
			name:    "alive members become voters",
			servers: []raft.Server{voter("a")},
			members: []membership.Member{alive("a"), alive("c"), alive("b")},
			want:    []string{"+b", "+c"},
		},
		{
			name:    "in sync: nothing to do",
			servers: []raft.Server{voter("a"), voter("b"), voter("c")},
			members: []membership.Member{alive("a"), alive("b"), alive("c")},
		},
		{
			name:    "changed raft address and non-voter are re-added",
			servers: []raft.Server{voter("a"), {ID: "b", Address: "old:1", Suffrage: raft.Voter}, {ID: "c", Address: "c:7452", Suffrage: raft.Nonvoter}},
			members: []membership.Member{alive("a"), alive("b"), alive("c")},
			want:    []string{"+b", "+c"},
		},
		{
			name:    "bad meta or no raft address is never added",
			servers: []raft.Server{voter("a")},
			members: []membership.Member{alive("a"), {Name: "b", Status: membership.StatusAlive, MetaErr: errors.New("bad")}, {Name: "c", Status: membership.StatusAlive}},
		},
		{
			name:    "left is removed at once",
			servers: []raft.Server{voter("a"), voter("b"), voter("c")},
			members: []membership.Member{alive("a"), alive("b"), member("c", membership.StatusLeft, 0)},
			want:    []string{"-c"},
		},
		{
			name:    "failed is removed only after the dead server timeout",
			servers: []raft.Server{voter("a"), voter("b"), voter("c")},
			members: []membership.Member{alive("a"), alive("b"), member("c", membership.StatusFailed, 4*time.Second)},
			recheck: 6 * time.Second,
		},
		{
			name:    "failed past the timeout is removed",
			servers: []raft.Server{voter("a"), voter("b"), voter("c")},
			members: []membership.Member{alive("a"), alive("b"), member("c", membership.StatusFailed, dead)},
			want:    []string{"-c"},
		},
		{
			name:    "never itself",
			servers: []raft.Server{voter("a"), voter("b"), voter("c")},
			members: []membership.Member{member("a", membership.StatusLeft, time.Hour), alive("b"), alive("c")},
		},
		{
			name:    "at most (voters-1)/2 voters per round, left first",
			servers: []raft.Server{voter("a"), voter("b"), voter("c"), voter("d"), voter("e")},
			members: []membership.Member{alive("a"), member("b", membership.StatusFailed, time.Hour), member("c", membership.StatusFailed, time.Hour), member("d", membership.StatusLeft, 0), member("e", membership.StatusFailed, time.Hour)},
			want:    []string{"-d", "-b"},
		},
		{
			name:    "two voters: the dead one stays (removing it is no safer)",
			servers: []raft.Server{voter("a"), voter("b")},
			members: []membership.Member{alive("a"), member("b", membership.StatusFailed, time.Hour)},
		},
		{
			name:    "non-voters are not capped",
			servers: []raft.Server{voter("a"), {ID: "x", Address: "x:1", Suffrage: raft.Nonvoter}, {ID: "y", Address: "y:1", Suffrage: raft.Nonvoter}},
			members: []membership.Member{alive("a"), member("x", membership.StatusLeft, 0), member("y", membership.StatusLeft, 0)},
			want:    []string{"-x", "-y"},
		},
		{
			name:    "unknown to gossip: noticed now, removed after the timeout",
			servers: []raft.Server{voter("a"), voter("b"), voter("c")},
			members: []membership.Member{alive("a"), alive("b")},
			recheck: dead,
		},
		{
			name:    "unknown to gossip for the timeout is removed",
			servers: []raft.Server{voter("a"), voter("b"), voter("c")},
			members: []membership.Member{alive("a"), alive("b")},
			missing: map[raft.ServerID]time.Time{"c": now.Add(-dead), "gone": now},
			want:    []string{"-c"},
		},
		{
			name:    "removals come before adds",
			servers: []raft.Server{voter("a"), voter("b"), voter("c")},
			members: []membership.Member{alive("a"), alive("b"), member("c", membership.StatusLeft, 0), alive("d")},
			want:    []string{"-c", "+d"},
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			missing := tt.missing
			if missing == nil {
				missing = map[raft.ServerID]time.Time{}
			}
			changes, recheck := planReconcile(reconcileInput{
				self: "a", servers: tt.servers, members: tt.members, now: now, deadAfter: dead, missingSince: missing,
			})
			var got []string
			for _, c := range changes {
				op := "+"
				if c.remove {
					op = "-"
				} else if c.addr != raft.ServerAddress(string(c.id)+":7452") {
					t.Errorf("add %s at %s", c.id, c.addr)
				}
				got = append(got, op+string(c.id))
			}
			if !slices.Equal(got, tt.want) || recheck != tt.recheck {
				t.Fatalf("changes %v recheck %v, want %v %v", got, recheck, tt.want, tt.recheck)
			}
			if _, ok := missing["gone"]; ok {
				t.Fatal("missingSince keeps a server no longer in the configuration")
			}
		})
	}
}

// TestPlanReconcileUnknownIsRemembered: the first round notices a server
// gossip does not know; a later round past the timeout removes it; one that
// gossip knows again is forgotten.
func TestPlanReconcileUnknownIsRemembered(t *testing.T) {
	servers := []raft.Server{{ID: "a", Suffrage: raft.Voter}, {ID: "b", Suffrage: raft.Voter}, {ID: "c", Suffrage: raft.Voter}}
	members := []membership.Member{{Name: "a", Status: membership.StatusAlive}, {Name: "b", Status: membership.StatusAlive}}
	missing := map[raft.ServerID]time.Time{}
	t0 := time.Unix(0, 0)
	plan := func(at time.Duration, ms []membership.Member) string {
		c, _ := planReconcile(reconcileInput{self: "a", servers: servers, members: ms, now: t0.Add(at), deadAfter: time.Second, missingSince: missing})
		return fmt.Sprint(len(c))
	}
	if got := plan(0, members) + plan(999*time.Millisecond, members) + plan(time.Second, members); got != "001" {
		t.Fatalf("changes per round %s, want 001", got)
	}
	plan(2*time.Second, append(members, membership.Member{Name: "c", Status: membership.StatusAlive}))
	if len(missing) != 0 {
		t.Fatalf("missingSince %v after c reappeared", missing)
	}
}
