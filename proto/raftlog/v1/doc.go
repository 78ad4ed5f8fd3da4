// Package raftlogv1 is the generated Go code of the Raft log records
// (raftlog.proto). Every log entry is one type byte followed by one of these
// messages, and they are persisted forever: fields are never renumbered or
// reused. Only this doc file is hand-written; regenerate the rest with
// `go generate ./proto`.
package raftlogv1
