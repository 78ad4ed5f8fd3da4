package test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestEveryPackageHasADoc: every package states its job in a doc comment.
func TestEveryPackageHasADoc(t *testing.T) {
	cmd := exec.Command("go", "list", "-f", "{{.ImportPath}} {{if .Doc}}ok{{else}}missing{{end}}", "./...")
	cmd.Dir = ".."
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	n := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		n++
		if strings.HasSuffix(line, " missing") {
			t.Errorf("%s has no package doc comment", strings.TrimSuffix(line, " missing"))
		}
	}
	if n < 10 {
		t.Fatalf("go list found only %d packages:\n%s", n, out)
	}
}
