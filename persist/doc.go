// Package persist opens the on-disk stores hashicorp/raft needs in one data
// directory:
//
//	dir/LOCK        flocked while open: one owner per directory
//	dir/wal/        raft-wal log segments and wal-meta.db (bbolt: stable store)
//	dir/snapshots/  raft's FileSnapshotStore
//
// The log store is raft-wal with a 512-entry raft.LogCache in front; the
// stable store is raft-wal's meta store. Why raft-wal rather than
// raft-boltdb was measured, not assumed: see DESIGN.md and bench_test.go.
//
// Guarantees:
//   - StoreLogs and Set are fsynced before they return.
//   - One owner at a time: a second Open of the same directory, from another
//     process or this one, fails within Options.LockTimeout with an error
//     wrapping ErrLocked that names the lock file, instead of hanging.
//   - Directories it creates are mode 0700.
package persist
