package cluster

import (
	"net/netip"
	"time"
)

// The leader loop feeds a HealthChecker with the backends of the committed
// services and commits the transitions it reports as HealthBatch entries.
// These types keep the leader loop independent of how probes are done;
// package cluster/health provides the implementation, adapted in
// health_adapter.go.

// HealthCheckType values are ikelb.v1.HealthCheckType's.
type HealthCheckType uint32

const (
	HealthCheckNone  HealthCheckType = 1
	HealthCheckICMP  HealthCheckType = 2
	HealthCheckIKEv2 HealthCheckType = 3
)

// HealthTarget is one backend to probe.
type HealthTarget struct {
	Service  uint32
	Backend  uint32
	Addr     netip.Addr
	Type     HealthCheckType
	Interval time.Duration
	Timeout  time.Duration
	Rise     uint32
	Fall     uint32
	Port     uint16 // IKEv2 probe port
}

// HealthTransition is a backend going up or down after rise/fall probes.
type HealthTransition struct {
	Service uint32
	Backend uint32
	Up      bool
	At      time.Time
	Err     string // the last probe's error, if any
}

// HealthChecker probes targets and reports transitions.
type HealthChecker interface {
	// Update replaces the set of targets; targets kept keep their state.
	Update([]HealthTarget)
	// Close stops every probe and waits for them.
	Close()
}

// NewHealthChecker starts a checker that calls report on each transition.
// report never blocks.
type NewHealthChecker func(report func(HealthTransition)) HealthChecker
