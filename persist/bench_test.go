package persist

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	raftwal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/metadb"
	"go.etcd.io/bbolt"
)

// The benchmarks below run raft-boltdb/v2 and raft-wal side by side in one
// run, with fsync on, so the choice recorded in DESIGN.md rests on numbers
// from the same machine and disk. Run them with:
//
//	go test -run '^$' -bench . -benchtime 2s ./persist/

// benchLog is a log store that can be closed, as both candidates are.
type benchLog interface {
	raft.LogStore
	Close() error
}

type candidate struct {
	name string
	open func(b *testing.B, dir string) benchLog
}

var candidates = []candidate{
	{"bolt", func(b *testing.B, dir string) benchLog {
		s, err := raftboltdb.New(raftboltdb.Options{
			Path:        filepath.Join(dir, "raft.db"),
			BoltOptions: &bbolt.Options{Timeout: time.Second},
		})
		if err != nil {
			b.Fatalf("open bolt: %v", err)
		}
		return s
	}},
	{"wal", func(b *testing.B, dir string) benchLog {
		// raft-wal v0.4.0's Close does not close its meta store, whose bbolt
		// flock then makes a second Open in the same process hang; own the
		// meta store so Close can release it.
		meta := &metadb.BoltMetaDB{}
		w, err := raftwal.Open(dir, raftwal.WithLogger(hclog.NewNullLogger()), raftwal.WithMetaStore(meta))
		if err != nil {
			b.Fatalf("open wal: %v", err)
		}
		return walCloser{w, meta}
	}},
}

type walCloser struct {
	*raftwal.WAL
	meta *metadb.BoltMetaDB
}

func (w walCloser) Close() error {
	err := w.WAL.Close()
	if err2 := w.meta.Close(); err == nil {
		err = err2
	}
	return err
}

// benchEntries returns n log entries of about 1 KiB starting at index first.
func benchEntries(first uint64, n int) []*raft.Log {
	data := make([]byte, 1024)
	for i := range data {
		data[i] = byte(i * 7)
	}
	logs := make([]*raft.Log, n)
	for i := range logs {
		logs[i] = &raft.Log{Index: first + uint64(i), Term: 1, Type: raft.LogCommand, Data: data}
	}
	return logs
}

func BenchmarkStoreLogs(b *testing.B) {
	for _, batch := range []int{1, 64} {
		for _, c := range candidates {
			b.Run(fmt.Sprintf("batch=%d/%s", batch, c.name), func(b *testing.B) {
				s := c.open(b, b.TempDir())
				defer s.Close()
				next := uint64(1)
				b.SetBytes(int64(batch) * 1024)
				b.ResetTimer()
				for b.Loop() {
					logs := benchEntries(next, batch)
					if err := s.StoreLogs(logs); err != nil {
						b.Fatalf("store: %v", err)
					}
					next += uint64(batch)
				}
				b.StopTimer()
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(int(next-1)), "ns/entry")
			})
		}
	}
}

// fill stores n entries in batches of 1000.
func fill(b *testing.B, s raft.LogStore, n int) {
	for first := 1; first <= n; first += 1000 {
		if err := s.StoreLogs(benchEntries(uint64(first), min(1000, n-first+1))); err != nil {
			b.Fatalf("fill: %v", err)
		}
	}
}

func BenchmarkGetLog(b *testing.B) {
	const n = 10_000
	for _, c := range candidates {
		b.Run(c.name, func(b *testing.B) {
			s := c.open(b, b.TempDir())
			defer s.Close()
			fill(b, s, n)
			var l raft.Log
			i := 0
			b.ResetTimer()
			for b.Loop() {
				idx := uint64(i%n) + 1
				if err := s.GetLog(idx, &l); err != nil || l.Index != idx {
					b.Fatalf("get %d: %v (got index %d)", idx, err, l.Index)
				}
				i += 7919 // a prime stride: not sequential, not cached by locality
			}
		})
	}
}

// BenchmarkReopen measures opening a store holding 100k entries of 1 KiB
// and reading its last entry: the cost paid on every daemon restart.
func BenchmarkReopen(b *testing.B) {
	const n = 100_000
	for _, c := range candidates {
		b.Run(c.name, func(b *testing.B) {
			dir := b.TempDir()
			s := c.open(b, dir)
			fill(b, s, n)
			if err := s.Close(); err != nil {
				b.Fatal(err)
			}
			var l raft.Log
			b.ResetTimer()
			for b.Loop() {
				s := c.open(b, dir)
				last, err := s.LastIndex()
				if err != nil || last != n {
					b.Fatalf("last index %d, %v", last, err)
				}
				if err := s.GetLog(last, &l); err != nil {
					b.Fatal(err)
				}
				if err := s.Close(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
