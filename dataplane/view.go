package dataplane

import (
	"fmt"
	"net/netip"
	"slices"
	"time"
)

// serviceView is the packet path's immutable, precomputed form of one
// committed Service. SetServices builds a new one for every service and
// swaps it in with one atomic store per listener; nothing in it changes
// afterwards.
type serviceView struct {
	svc        Service
	backends   []Backend          // svc.Backends with addresses unmapped
	byID       map[uint32]int     // backend ID → index in backends
	counters   []*backendCounters // parallel to backends
	touchEvery int64              // ns between touches of one client flow
	flowIdle   int64              // ns before an idle flow is closed
	snat       netip.Addr         // source for upstream sockets; invalid = kernel's choice
	mtu        []int              // transparent: route MTU to each backend, parallel to backends

	svcCounters *serviceCounters
}

func (sv *serviceView) backendIndex(id uint32) (int, bool) {
	i, ok := sv.byID[id]
	return i, ok
}

// validateService checks what the dataplane relies on.
func validateService(s *Service) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: service %d (%s): %s", ErrInvalidService, s.ID, s.Name, fmt.Sprintf(format, args...))
	}
	if !s.VIP.IsValid() || s.VIP.IsUnspecified() {
		return bad("vip %v", s.VIP)
	}
	if len(s.Ports) == 0 {
		return bad("no ports")
	}
	for _, p := range s.Ports {
		if p == 0 {
			return bad("port 0")
		}
	}
	switch s.Mode {
	case ModeNAT:
	case ModeTransparent:
		if !transparentSupported {
			return fmt.Errorf("%w: service %d (%s): %w: needs linux", ErrInvalidService, s.ID, s.Name, ErrTransparent)
		}
		if s.SNAT.IsValid() {
			return bad("snat %v in transparent mode", s.SNAT)
		}
	default:
		return bad("mode %v not implemented", s.Mode)
	}
	if s.Key != 0 && s.Key != KeySourceIP {
		return bad("key kind %d", s.Key)
	}
	if s.Timeout < 0 {
		return bad("negative timeout")
	}
	seen := map[uint32]bool{}
	for _, b := range s.Backends {
		if seen[b.ID] {
			return bad("backend id %d twice", b.ID)
		}
		seen[b.ID] = true
		a := b.Addr.Unmap()
		if !a.IsValid() || a.IsUnspecified() {
			return bad("backend %d address %v", b.ID, b.Addr)
		}
		if s.Mode == ModeTransparent && s.VIP.Unmap().Is4() != a.Is4() {
			// The backend gets the client's own address as source, and
			// a client of the VIP has the VIP's family.
			return bad("transparent mode: vip %v and backend %v differ in family", s.VIP, b.Addr)
		}
		if s.SNAT.IsValid() && s.SNAT.Unmap().Is4() != a.Is4() {
			return bad("snat %v and backend %v differ in family", s.SNAT, b.Addr)
		}
	}
	return nil
}

// newServiceView builds the view; sc holds the service's counters, which
// outlive views. It is called with Engine.mu held (it adds to sc.backends).
func newServiceView(s Service, sc *serviceCounters, flowTimeout time.Duration) *serviceView {
	s.VIP = s.VIP.Unmap()
	s.Ports = slices.Clone(s.Ports)
	sv := &serviceView{
		backends:    make([]Backend, len(s.Backends)),
		byID:        make(map[uint32]int, len(s.Backends)),
		counters:    make([]*backendCounters, len(s.Backends)),
		svcCounters: sc,
	}
	live := make(map[uint32]*backendCounters, len(s.Backends))
	for i, b := range s.Backends {
		b.Addr = b.Addr.Unmap()
		sv.backends[i] = b
		sv.byID[b.ID] = i
		bc := sc.backends[b.ID]
		if bc == nil {
			bc = &backendCounters{}
		}
		live[b.ID] = bc
		sv.counters[i] = bc
	}
	sc.backends = live // removed backends' counters go
	s.Backends = sv.backends
	sv.svc = s
	if s.SNAT.IsValid() {
		sv.snat = s.SNAT.Unmap()
	}

	touch := MaxTouchInterval
	if s.Timeout > 0 {
		touch = min(s.Timeout/4, MaxTouchInterval)
	}
	sv.touchEvery = int64(max(touch, time.Millisecond))

	idle := flowTimeout
	if idle == 0 {
		idle = MaxFlowTimeout
		if s.Timeout > 0 {
			idle = min(s.Timeout, MaxFlowTimeout)
		}
	}
	sv.flowIdle = int64(idle)
	return sv
}
