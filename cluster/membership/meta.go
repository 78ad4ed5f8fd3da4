package membership

import (
	"encoding/binary"
	"fmt"

	"github.com/hashicorp/memberlist"
)

// Roles a member can have. Both are Raft voters; a witness runs no
// dataplane, so that an HA pair plus a small witness keeps quorum.
const (
	RoleVoter   = "voter"
	RoleWitness = "witness"
)

// Meta is what a member advertises about itself through gossip.
type Meta struct {
	// RaftAddr is the host:port of the member's Raft transport. Required.
	RaftAddr string
	// AdminAddr is the host:port of its gRPC admin API; optional.
	AdminAddr string
	// Role is RoleVoter (default) or RoleWitness.
	Role string
	// Version is the ikelb version the member runs; informational.
	Version string
}

// Wire format of Meta, version 1:
//
//	byte 0     format version (1)
//	byte 1     role: 0 voter, 1 witness
//	byte 2     flags: bit 0 "leaving" (see Members.Leave)
//	then       RaftAddr, AdminAddr, Version, each a uvarint length and bytes
//
// A decoder ignores unknown flag bits and bytes after the fields it knows, so
// a later version may add flags or append fields without breaking older
// members; it rejects a format version it does not know. memberlist caps the
// whole at memberlist.MetaMaxSize.
const (
	metaFormat   = 1
	flagLeaving  = 1 << 0
	metaFixedLen = 3
)

var roleCodes = []string{RoleVoter, RoleWitness}

func roleCode(role string) (byte, bool) {
	for i, r := range roleCodes {
		if r == role {
			return byte(i), true
		}
	}
	return 0, false
}

// validate checks m as this member's own meta (Role already defaulted).
func (m Meta) validate() error {
	if m.RaftAddr == "" {
		return fmt.Errorf("meta.raft_addr: required")
	}
	if _, _, err := splitHostPort(m.RaftAddr); err != nil {
		return fmt.Errorf("meta.raft_addr: %w", err)
	}
	if m.AdminAddr != "" {
		if _, _, err := splitHostPort(m.AdminAddr); err != nil {
			return fmt.Errorf("meta.admin_addr: %w", err)
		}
	}
	if _, ok := roleCode(m.Role); !ok {
		return fmt.Errorf("meta.role: must be %q or %q, got %q", RoleVoter, RoleWitness, m.Role)
	}
	if n := len(m.encode(true)); n > memberlist.MetaMaxSize {
		return fmt.Errorf("meta: %w: encoded size %d bytes exceeds memberlist's limit of %d", ErrMetaTooLarge, n, memberlist.MetaMaxSize)
	}
	return nil
}

// encode returns the wire form of m; Role must be valid. leaving marks a
// member that is about to Leave.
func (m Meta) encode(leaving bool) []byte {
	role, _ := roleCode(m.Role)
	var flags byte
	if leaving {
		flags |= flagLeaving
	}
	b := make([]byte, 0, metaFixedLen+3*binary.MaxVarintLen16+len(m.RaftAddr)+len(m.AdminAddr)+len(m.Version))
	b = append(b, metaFormat, role, flags)
	for _, s := range []string{m.RaftAddr, m.AdminAddr, m.Version} {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	return b
}

// decodeMeta parses the wire form; errors wrap ErrBadMeta.
func decodeMeta(b []byte) (m Meta, leaving bool, err error) {
	if len(b) < metaFixedLen {
		return Meta{}, false, fmt.Errorf("%w: %d bytes", ErrBadMeta, len(b))
	}
	if b[0] != metaFormat {
		return Meta{}, false, fmt.Errorf("%w: unknown format version %d", ErrBadMeta, b[0])
	}
	if int(b[1]) >= len(roleCodes) {
		return Meta{}, false, fmt.Errorf("%w: unknown role code %d", ErrBadMeta, b[1])
	}
	m.Role = roleCodes[b[1]]
	leaving = b[2]&flagLeaving != 0
	rest := b[metaFixedLen:]
	for _, f := range []*string{&m.RaftAddr, &m.AdminAddr, &m.Version} {
		n, k := binary.Uvarint(rest)
		if k <= 0 || n > uint64(len(rest)-k) {
			return Meta{}, false, fmt.Errorf("%w: truncated", ErrBadMeta)
		}
		*f = string(rest[k : k+int(n)])
		rest = rest[k+int(n):]
	}
	return m, leaving, nil
}
