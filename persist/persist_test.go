package persist

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func TestReopenKeepsLogsAndStable(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	s, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	logs := []*raft.Log{
		{Index: 1, Term: 1, Type: raft.LogConfiguration, Data: []byte("conf")},
		{Index: 2, Term: 1, Type: raft.LogCommand, Data: []byte("a")},
		{Index: 3, Term: 2, Type: raft.LogCommand, Data: []byte("b")},
	}
	if err := s.Log.StoreLogs(logs); err != nil {
		t.Fatalf("store logs: %v", err)
	}
	if err := s.Stable.SetUint64([]byte("CurrentTerm"), 2); err != nil {
		t.Fatalf("set uint64: %v", err)
	}
	if err := s.Stable.Set([]byte("LastVoteCand"), []byte("node-1")); err != nil {
		t.Fatalf("set: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	for _, p := range []string{dir, filepath.Join(dir, WALDir), filepath.Join(dir, SnapshotDir)} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o700 {
			t.Errorf("%s mode %v, want 0700", p, fi.Mode().Perm())
		}
	}

	s, err = Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s.Close()
	first, _ := s.Log.FirstIndex()
	last, _ := s.Log.LastIndex()
	if first != 1 || last != 3 {
		t.Fatalf("indexes after reopen = %d..%d, want 1..3", first, last)
	}
	for _, want := range logs {
		var got raft.Log
		if err := s.Log.GetLog(want.Index, &got); err != nil {
			t.Fatalf("get %d: %v", want.Index, err)
		}
		if got.Term != want.Term || got.Type != want.Type || !bytes.Equal(got.Data, want.Data) {
			t.Errorf("log %d = %+v, want %+v", want.Index, got, want)
		}
	}
	if term, err := s.Stable.GetUint64([]byte("CurrentTerm")); err != nil || term != 2 {
		t.Errorf("CurrentTerm = %d, %v; want 2", term, err)
	}
	if v, err := s.Stable.Get([]byte("LastVoteCand")); err != nil || string(v) != "node-1" {
		t.Errorf("LastVoteCand = %q, %v; want node-1", v, err)
	}
	// DeleteRange through the cache must reach the disk too.
	if err := s.Log.DeleteRange(1, 2); err != nil {
		t.Fatal(err)
	}
	if first, _ := s.Log.FirstIndex(); first != 3 {
		t.Errorf("first index after delete = %d, want 3", first)
	}
}

func TestSecondOpenFailsFast(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	defer s.Close()

	start := time.Now()
	s2, err := Open(dir, Options{LockTimeout: 100 * time.Millisecond})
	if err == nil {
		s2.Close()
		t.Fatal("second open of the same directory succeeded")
	}
	if !errors.Is(err, ErrLocked) {
		t.Errorf("error %q does not wrap ErrLocked", err)
	}
	if want := filepath.Join(dir, LockFile); !bytes.Contains([]byte(err.Error()), []byte(want)) {
		t.Errorf("error %q does not name %s", err, want)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("second open took %v", d)
	}
}

func TestOpenUnwritableNamesPath(t *testing.T) {
	// A regular file where the directory should be: fails even as root.
	base := t.TempDir()
	file := filepath.Join(base, "notadir")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Open(filepath.Join(file, "data"), Options{})
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte(file)) {
		t.Fatalf("open under a file: error %v, want one naming %s", err, file)
	}
	if _, err := Open("", Options{}); err == nil {
		t.Error("open of empty dir succeeded")
	}
	if _, err := Open(base, Options{SnapshotRetain: -1}); err == nil {
		t.Error("negative SnapshotRetain accepted")
	}
}

func TestSnapshotRoundTrip(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{Logger: testLogger(t), SnapshotRetain: 1})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	defer s.Close()

	_, trans := raft.NewInmemTransport("127.0.0.1:1") // only encodes the old-style peer list
	defer trans.Close()
	cfg := raft.Configuration{Servers: []raft.Server{{ID: "n1", Address: "127.0.0.1:1", Suffrage: raft.Voter}}}
	write := func(index uint64, body string) {
		t.Helper()
		sink, err := s.Snapshots.Create(raft.SnapshotVersionMax, index, 3, cfg, 1, trans)
		if err != nil {
			t.Fatalf("create: %v", err)
		}
		if _, err := io.WriteString(sink, body); err != nil {
			t.Fatalf("write: %v", err)
		}
		if err := sink.Close(); err != nil {
			t.Fatalf("close sink: %v", err)
		}
	}
	write(10, "first")
	write(20, "second snapshot")

	metas, err := s.Snapshots.List()
	if err != nil {
		t.Fatalf("list: %v", err)
	}
	// Retain 1: only the newest is listed.
	if len(metas) != 1 || metas[0].Index != 20 || metas[0].Term != 3 {
		t.Fatalf("list = %+v, want one snapshot at index 20 term 3", metas)
	}
	meta, rc, err := s.Snapshots.Open(metas[0].ID)
	if err != nil {
		t.Fatalf("open snapshot: %v", err)
	}
	defer rc.Close()
	body, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	if string(body) != "second snapshot" || meta.Size != int64(len(body)) {
		t.Errorf("snapshot body %q size %d", body, meta.Size)
	}
	if len(meta.Configuration.Servers) != 1 || meta.Configuration.Servers[0].ID != "n1" {
		t.Errorf("snapshot configuration = %+v", meta.Configuration)
	}
}
