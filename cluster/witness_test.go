package cluster

import (
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// TestWitnessHandsLeadershipBack: a witness has no dataplane and may not
// reach the servers, so when it becomes leader it must not run health checks
// and hands leadership to an alive voter with a dataplane.
func TestWitnessHandsLeadershipBack(t *testing.T) {
	c := newTestCluster(t, clusterRaft, time.Minute)
	n1 := c.add("n1", false)
	w := c.add("w", true)
	c.waitVoters(10*time.Second, "n1", "w")
	waitWithin(t, 10*time.Second, "n1 leads", func() bool { return n1.node.IsLeader() })

	// Make the witness the leader, as an election after n1 restarts could.
	// Observers on both see every leader change: w leading (w sees it
	// first, whether or not n1 hears from w before w hands over), then n1
	// again.
	obs := make(chan raft.Observation, 64)
	for _, tn := range []*testNode{n1, w} {
		o := raft.NewObserver(obs, false, func(o *raft.Observation) bool {
			_, ok := o.Data.(raft.LeaderObservation)
			return ok
		})
		tn.node.raft.RegisterObserver(o)
		defer tn.node.raft.DeregisterObserver(o)
	}
	addr := raft.ServerAddress(w.node.RaftAddr())
	deadline := time.After(10 * time.Second)
	retry := time.NewTicker(300 * time.Millisecond)
	defer retry.Stop()
	// A transfer may not take: it fails while w is catching up, and it can
	// answer nil without an election when n1 loses leadership meanwhile
	// (raft: "lost leadership during transfer (expected)"). It is sent
	// again until w has led.
	_ = n1.node.raft.LeadershipTransferToServer("w", addr)
	wLed := false
	for {
		select {
		case ob := <-obs:
			switch ob.Data.(raft.LeaderObservation).LeaderID {
			case "w":
				wLed = true
			case "n1":
				if wLed {
					return // the witness led, then handed leadership back
				}
			}
		case <-retry.C:
			if !wLed && n1.node.IsLeader() {
				_ = n1.node.raft.LeadershipTransferToServer("w", addr)
			}
		case <-deadline:
			t.Fatalf("after 10 s: the witness led %v, and leadership did not come back to n1", wLed)
		}
	}
}
