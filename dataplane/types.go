package dataplane

import (
	"net/netip"
	"time"
)

// Mode is a service's forwarding mode.
type Mode uint8

const (
	// ModeNAT sends traffic to the backend from the balancer's own address
	// (or the service's SNAT address); replies come back to the balancer.
	ModeNAT Mode = 1
	// ModeTransparent sends traffic to the backend with the client's own
	// source address and port; the backend routes replies via the balancer.
	ModeTransparent Mode = 2
)

func (m Mode) String() string {
	switch m {
	case ModeNAT:
		return "nat"
	case ModeTransparent:
		return "transparent"
	}
	return "unknown"
}

// KeyKind says what identifies one client in the affinity table.
type KeyKind uint8

const (
	// KeySourceIP keys affinity by the client's source IP address: the IKE
	// 500 and 4500 halves of one client share it even when the client's NAT
	// gives them different source ports.
	KeySourceIP KeyKind = 1
)

// BackendState is the operator's intent for a backend.
type BackendState uint8

const (
	StateActive   BackendState = 1 // takes new and existing clients
	StateDrain    BackendState = 2 // keeps existing clients, takes no new ones
	StateDisabled BackendState = 3 // takes nothing; its clients are re-chosen
)

// Health is a backend's committed health.
type Health uint8

const (
	HealthUnknown Health = 0 // not checked yet: treated as up
	HealthUp      Health = 1
	HealthDown    Health = 2
)

// Addr is an IP address as a small comparable value: IPv4 is stored as an
// IPv4-mapped IPv6 address. Map keys use it instead of netip.Addr because
// netip.Addr carries a zone pointer (unique.Handle) that makes hashing and
// comparison slower and the key larger (24 bytes instead of 16).
type Addr [16]byte

// AddrFrom converts a netip.Addr, dropping any zone.
func AddrFrom(a netip.Addr) Addr { return Addr(a.As16()) }

// Netip returns the address, unmapped to IPv4 when it is IPv4-mapped.
func (a Addr) Netip() netip.Addr { return netip.AddrFrom16(a).Unmap() }

func (a Addr) String() string { return a.Netip().String() }

// ClientKey identifies one client of one service in the affinity table.
type ClientKey struct {
	Service uint32
	Client  Addr
}

// Backend is one VPN server of a service, as committed.
type Backend struct {
	ID     uint32 // unique within the service, never reused
	Addr   netip.Addr
	Weight uint32
	State  BackendState
	Health Health
}

// Usable reports whether the backend may keep serving the clients bound to it.
func (b Backend) Usable() bool { return b.State != StateDisabled && b.Health != HealthDown }

// AcceptsNew reports whether the backend may be chosen for a new client.
func (b Backend) AcceptsNew() bool {
	return b.State == StateActive && b.Health != HealthDown && b.Weight > 0
}

// Service is one VIP and its ports sharing one affinity table, as committed.
// Values handed to the dataplane are never mutated afterwards.
type Service struct {
	ID       uint32
	Name     string
	VIP      netip.Addr
	Ports    []uint16
	Backends []Backend
	Timeout  time.Duration // persistence timeout
	Mode     Mode
	Key      KeyKind
	SNAT     netip.Addr // NAT mode source address; invalid = kernel's choice
}

// Entry is a committed affinity: which backend a client is bound to, and
// when (Unix nanoseconds, as proposed, so identical on every replica).
type Entry struct {
	Backend  uint32
	Created  int64
	LastSeen int64
}

// ProposalKind says what a Proposal asks the replicated state to do.
type ProposalKind uint8

const (
	// ProposeBind asks to bind Key to Backend; the first committed binding wins.
	ProposeBind ProposalKind = 1
	// ProposeTouch asks to refresh Key's last-seen time to At.
	ProposeTouch ProposalKind = 2
)

// Proposal is what the packet path asks the replicated state to record.
type Proposal struct {
	Kind    ProposalKind
	Key     ClientKey
	Backend uint32
	At      int64 // Unix nanoseconds
}

// Proposer takes proposals from the packet path. Propose must never block:
// when its queue is full it drops the proposal, counts it and returns false.
// The cluster package implements it by batching proposals into Raft entries.
type Proposer interface {
	Propose(Proposal) bool
}
