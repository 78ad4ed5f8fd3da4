package dataplane

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps keeps the packet path free of the control plane: the dataplane
// may import the standard library, golang.org/x/net and golang.org/x/sys
// only, and never raft, memberlist, grpc, protobuf, bbolt, cluster or persist.
func TestDeps(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	out, err := exec.Command("go", "list", "-deps", "./...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	forbidden := []string{
		"github.com/hashicorp/raft",
		"github.com/hashicorp/memberlist",
		"google.golang.org/grpc",
		"google.golang.org/protobuf",
		"go.etcd.io/bbolt",
		"/ikelb/cluster",
		"/ikelb/persist",
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 {
		t.Fatalf("go list returned %d packages; is the test running in dataplane?", len(deps))
	}
	for _, d := range deps {
		for _, f := range forbidden {
			if strings.Contains(d, f) {
				t.Errorf("dataplane depends on %s (forbidden: %s)", d, f)
			}
		}
		// Everything else must be the standard library, x/net, x/sys or ours.
		first, _, _ := strings.Cut(d, "/")
		if strings.Contains(first, ".") && !strings.HasPrefix(d, "golang.org/x/net") &&
			!strings.HasPrefix(d, "golang.org/x/sys") && !strings.HasPrefix(d, "github.com/ikelb/ikelb/dataplane") {
			t.Errorf("dataplane depends on %s: only stdlib, golang.org/x/net and golang.org/x/sys are allowed", d)
		}
	}
}
