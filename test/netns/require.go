package netns

import (
	"os"
	"os/exec"
	"testing"
)

// Require skips t unless it can build namespaces here: it must run as root
// and find `ip` (and every tool named in tools, e.g. "nft", "socat") in PATH.
// When the environment has CI=true it fails t instead of skipping, so a CI
// run never goes green by skipping its end-to-end tests.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		unavailable(t, "needs root to create network namespaces")
		return
	}
	for _, tool := range append([]string{"ip"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			unavailable(t, "needs "+tool+" in PATH: "+err.Error())
			return
		}
	}
}

func unavailable(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("netns: %s (CI=true: failing instead of skipping)", why)
		return
	}
	t.Skipf("netns: %s", why)
}
