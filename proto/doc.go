// Package proto holds ikelb's protobuf definitions and the Go code generated
// from them: the admin API in ikelb/v1 and the Raft log-entry records in
// raftlog/v1. The two are kept apart on purpose: log entries are persisted
// forever, so their field numbers are never reused or renumbered, while the
// admin API can evolve by version directory.
//
// Generated code is checked in. `go generate ./proto` regenerates it with buf
// and the pinned local plugins; TestGeneratedCodeIsCurrent fails on any diff.
package proto

//go:generate sh -c "cd .. && go tool buf generate --template proto/buf.gen.yaml"
