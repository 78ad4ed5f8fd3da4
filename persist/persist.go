package persist

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/hashicorp/raft"
	raftwal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/metadb"
)

// Errors returned by Open, wrapped with the path concerned.
var (
	// ErrLocked means another process, or another open Stores in this
	// process, holds the data directory.
	ErrLocked = errors.New("data directory in use")
)

// Layout of a data directory.
const (
	// LockFile is flocked for as long as the Stores are open.
	LockFile = "LOCK"
	// WALDir holds raft-wal's segment files and its meta store
	// (wal-meta.db, a bbolt file with the stable values).
	WALDir = "wal"
	// SnapshotDir holds snapshots; raft's FileSnapshotStore fixes its name.
	SnapshotDir = "snapshots"

	logCacheSize = 512
	dirMode      = 0o700
)

// Options configures Open. The zero value is valid.
type Options struct {
	// Logger receives the stores' log lines; nil discards them.
	Logger *slog.Logger
	// SnapshotRetain is how many snapshots to keep; 0 means 2.
	SnapshotRetain int
	// LockTimeout bounds the wait for the data directory's lock; 0 means 1s.
	LockTimeout time.Duration
}

func (o Options) withDefaults() Options {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.SnapshotRetain == 0 {
		o.SnapshotRetain = 2
	}
	if o.LockTimeout == 0 {
		o.LockTimeout = time.Second
	}
	return o
}

// Validate reports a configuration error.
func (o Options) Validate() error {
	if o.SnapshotRetain < 0 {
		return fmt.Errorf("snapshot retain %d: must be at least 1", o.SnapshotRetain)
	}
	if o.LockTimeout < 0 {
		return fmt.Errorf("lock timeout %v: must not be negative", o.LockTimeout)
	}
	return nil
}

// Stores holds raft's stores for one data directory. The exported fields
// are set by Open, must not be changed, and stay usable until Close.
type Stores struct {
	// Log is the log store: raft-wal behind a 512-entry raft.LogCache.
	Log raft.LogStore
	// Stable is the stable store (current term, last vote): raft-wal's
	// meta store.
	Stable raft.StableStore
	// Snapshots is the snapshot store under Dir()/snapshots.
	Snapshots raft.SnapshotStore

	dir  string
	wal  *raftwal.WAL
	meta *metadb.BoltMetaDB
	lock *os.File
}

// Open creates dir if needed (mode 0700), takes its lock and opens the
// stores in it.
func Open(dir string, opts Options) (_ *Stores, err error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	opts = opts.withDefaults()
	if dir == "" {
		return nil, errors.New("empty data directory")
	}
	// Created here rather than by raft-wal and raft so they get 0700.
	for _, d := range []string{dir, filepath.Join(dir, WALDir), filepath.Join(dir, SnapshotDir)} {
		if err := os.MkdirAll(d, dirMode); err != nil {
			return nil, fmt.Errorf("create data directory: %w", err)
		}
	}
	lock, err := lockFile(filepath.Join(dir, LockFile), opts.LockTimeout)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			lock.Close() // releases the flock
		}
	}()

	walDir := filepath.Join(dir, WALDir)
	// raft-wal v0.4.0's WAL.Close does not close the meta store it opened
	// itself, which keeps its bbolt file locked: own it so Close can.
	meta := &metadb.BoltMetaDB{}
	wal, err := raftwal.Open(walDir,
		raftwal.WithMetaStore(meta),
		raftwal.WithLogger(NewHCLog(opts.Logger, "raft_wal")))
	if err != nil {
		meta.Close()
		return nil, fmt.Errorf("open %s: %w", walDir, err)
	}
	cache, err := raft.NewLogCache(logCacheSize, wal)
	if err != nil {
		wal.Close()
		meta.Close()
		return nil, fmt.Errorf("log cache: %w", err)
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dir, opts.SnapshotRetain,
		NewHCLog(opts.Logger, "snapshot_store"))
	if err != nil {
		wal.Close()
		meta.Close()
		return nil, fmt.Errorf("open %s: %w", filepath.Join(dir, SnapshotDir), err)
	}
	return &Stores{Log: cache, Stable: wal, Snapshots: snaps, dir: dir, wal: wal, meta: meta, lock: lock}, nil
}

// lockFile flocks path exclusively, retrying until timeout.
func lockFile(path string, timeout time.Duration) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	deadline := time.Now().Add(timeout)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w (held by another process or open Stores; waited %v)", path, ErrLocked, timeout)
		}
		time.Sleep(10 * time.Millisecond) // polling a flock: there is no wakeup to wait on
	}
}

// Dir returns the data directory.
func (s *Stores) Dir() string { return s.dir }

// Close closes the stores and releases the directory lock. Raft must be
// shut down first. Close must be called once.
func (s *Stores) Close() error {
	err := s.wal.Close()
	if err2 := s.meta.Close(); err == nil {
		err = err2
	}
	if err2 := s.lock.Close(); err == nil {
		err = err2
	}
	if err != nil {
		return fmt.Errorf("close %s: %w", s.dir, err)
	}
	return nil
}
