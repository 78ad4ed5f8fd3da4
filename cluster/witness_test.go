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
	term := n1.node.Status().Term
	addr := raft.ServerAddress(w.node.RaftAddr())
	// The transfer fails while w is still catching up; retry until it takes.
	waitWithin(t, 10*time.Second, "leadership transferred to the witness", func() bool {
		return n1.node.raft.LeadershipTransferToServer("w", addr).Error() == nil
	})
	// Two elections later (to w, then back), n1 leads again.
	waitWithin(t, 10*time.Second, "the witness hands leadership back to n1", func() bool {
		return n1.node.IsLeader() && n1.node.Status().Term >= term+2
	})
}
