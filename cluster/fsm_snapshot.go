package cluster

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"github.com/hashicorp/raft"
	"github.com/ikelb/ikelb/dataplane"
	raftlogv1 "github.com/ikelb/ikelb/proto/raftlog/v1"
	"google.golang.org/protobuf/encoding/protodelim"
	"google.golang.org/protobuf/proto"
)

const (
	// snapshotFormat is written in the SnapshotHeader; Restore rejects others.
	snapshotFormat = 1
	// affinityChunk is how many affinities one AffinityChunk record holds.
	affinityChunk = 4096
	// maxSnapshotRecord bounds one length-delimited record when restoring.
	maxSnapshotRecord = 64 << 20
)

type affinity struct {
	key   dataplane.ClientKey
	entry dataplane.Entry
}

// fsmSnapshot is a copy of the FSM state taken by FSM.Snapshot. Service
// records are shared with the FSM, which never mutates them.
type fsmSnapshot struct {
	nextServiceID uint32
	services      []*raftlogv1.ServiceRecord
	affinities    []affinity
}

var _ raft.FSMSnapshot = (*fsmSnapshot)(nil)

// Persist writes the snapshot as length-delimited records: a SnapshotHeader,
// one ServiceRecord per service, then AffinityChunks.
func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := s.write(sink); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s *fsmSnapshot) write(w io.Writer) error {
	bw := bufio.NewWriterSize(w, 256<<10)
	put := func(m proto.Message) error {
		_, err := protodelim.MarshalTo(bw, m)
		return err
	}
	err := put(&raftlogv1.SnapshotHeader{
		Format:        snapshotFormat,
		NextServiceId: s.nextServiceID,
		Services:      uint32(len(s.services)),
		Affinities:    uint64(len(s.affinities)),
	})
	if err != nil {
		return fmt.Errorf("write snapshot header: %w", err)
	}
	for _, r := range s.services {
		if err := put(r); err != nil {
			return fmt.Errorf("write snapshot service %q: %w", r.GetName(), err)
		}
	}
	recs := make([]raftlogv1.AffinityRecord, affinityChunk)
	chunk := &raftlogv1.AffinityChunk{Records: make([]*raftlogv1.AffinityRecord, 0, affinityChunk)}
	clients := make([]byte, 16*affinityChunk)
	for start := 0; start < len(s.affinities); start += affinityChunk {
		part := s.affinities[start:min(start+affinityChunk, len(s.affinities))]
		chunk.Records = chunk.Records[:0]
		for i, a := range part {
			r := &recs[i]
			c := clients[16*i : 16*i+16 : 16*i+16]
			copy(c, a.key.Client[:])
			r.ServiceId, r.Client, r.BackendId = a.key.Service, c, a.entry.Backend
			r.CreatedNs, r.LastSeenNs = a.entry.Created, a.entry.LastSeen
			chunk.Records = append(chunk.Records, r)
		}
		if err := put(chunk); err != nil {
			return fmt.Errorf("write snapshot affinities: %w", err)
		}
	}
	return bw.Flush()
}

// Release is a no-op: the copy is garbage collected.
func (s *fsmSnapshot) Release() {}

// restore replaces the state with the snapshot read from r. Services are
// decoded and checked before anything is replaced; affinities are then
// streamed into the reset table. An error while streaming leaves a partial
// table, as raft treats a failed restore as fatal for this node anyway.
func (f *FSM) restore(r io.Reader) error {
	br := bufio.NewReaderSize(r, 256<<10)
	opts := protodelim.UnmarshalOptions{MaxSize: maxSnapshotRecord}
	var h raftlogv1.SnapshotHeader
	if err := opts.UnmarshalFrom(br, &h); err != nil {
		return fmt.Errorf("read snapshot header: %w", err)
	}
	if h.GetFormat() != snapshotFormat {
		return fmt.Errorf("snapshot format %d, want %d: %w", h.GetFormat(), snapshotFormat, ErrInvalid)
	}
	byName := make(map[string]*service, h.GetServices())
	byID := make(map[uint32]*service, h.GetServices())
	for i := uint32(0); i < h.GetServices(); i++ {
		rec := &raftlogv1.ServiceRecord{}
		if err := opts.UnmarshalFrom(br, rec); err != nil {
			return fmt.Errorf("read snapshot service %d: %w", i, err)
		}
		s, err := newService(rec)
		if err != nil {
			return fmt.Errorf("read snapshot: %w", err)
		}
		byName[rec.GetName()], byID[rec.GetId()] = s, s
	}

	f.mu.Lock()
	defer f.mu.Unlock()
	f.byName, f.byID, f.nextServiceID = byName, byID, h.GetNextServiceId()
	f.table.Reset()
	var (
		n     uint64
		chunk raftlogv1.AffinityChunk
	)
	for n < h.GetAffinities() {
		chunk.Reset()
		if err := opts.UnmarshalFrom(br, &chunk); err != nil {
			return fmt.Errorf("read snapshot affinities after %d of %d: %w", n, h.GetAffinities(), err)
		}
		for _, a := range chunk.GetRecords() {
			client, ok := clientFromBytes(a.GetClient())
			if !ok {
				return fmt.Errorf("snapshot affinity client is %d bytes: %w", len(a.GetClient()), ErrInvalid)
			}
			f.table.Put(dataplane.ClientKey{Service: a.GetServiceId(), Client: client},
				dataplane.Entry{Backend: a.GetBackendId(), Created: a.GetCreatedNs(), LastSeen: a.GetLastSeenNs()})
		}
		n += uint64(len(chunk.GetRecords()))
	}
	if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("snapshot has data after %d affinities: %w", n, ErrInvalid)
	}
	f.publishLocked()
	return nil
}
