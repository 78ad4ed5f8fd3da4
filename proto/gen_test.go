package proto

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestGeneratedCodeIsCurrent regenerates every .proto with buf and the pinned
// local plugins into a temporary directory and fails on any difference from
// the checked-in code. It also runs `buf lint`.
func TestGeneratedCodeIsCurrent(t *testing.T) {
	if testing.Short() {
		t.Skip("regeneration builds buf; skipped in -short")
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	run := func(args ...string) {
		t.Helper()
		cmd := exec.Command("go", append([]string{"tool", "buf"}, args...)...)
		cmd.Dir = root
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("buf %s: %v\n%s", strings.Join(args, " "), err, b)
		}
	}
	run("lint")
	run("generate", "--template", "proto/buf.gen.yaml", "-o", out)

	var checked int
	err = filepath.WalkDir(filepath.Join(out, "proto"), func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(out, path)
		want, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		got, err := os.ReadFile(filepath.Join(root, rel))
		if err != nil {
			t.Errorf("%s: generated but not checked in (run `go generate ./proto`)", rel)
			return nil
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: differs from freshly generated code (run `go generate ./proto`)", rel)
		}
		checked++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked == 0 {
		t.Fatal("buf generated nothing")
	}
}
