package cluster

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/ikelb/ikelb/dataplane"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	raftlogv1 "github.com/ikelb/ikelb/proto/raftlog/v1"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// The raftlog records store ikelb.v1 enum values as uint32, and the dataplane
// enums use the same numbers; the functions below still map them explicitly
// so that a renumbering on either side is caught by the tests.

func modeToDataplane(m uint32) dataplane.Mode {
	if ikelbv1.ForwardingMode(m) == ikelbv1.ForwardingMode_FORWARDING_MODE_TRANSPARENT {
		return dataplane.ModeTransparent
	}
	return dataplane.ModeNAT
}

func stateToDataplane(s uint32) dataplane.BackendState {
	switch ikelbv1.BackendState(s) {
	case ikelbv1.BackendState_BACKEND_STATE_DRAIN:
		return dataplane.StateDrain
	case ikelbv1.BackendState_BACKEND_STATE_DISABLED:
		return dataplane.StateDisabled
	}
	return dataplane.StateActive
}

func healthToDataplane(h uint32) dataplane.Health {
	switch ikelbv1.BackendHealth(h) {
	case ikelbv1.BackendHealth_BACKEND_HEALTH_UP:
		return dataplane.HealthUp
	case ikelbv1.BackendHealth_BACKEND_HEALTH_DOWN:
		return dataplane.HealthDown
	}
	return dataplane.HealthUnknown
}

// addrFromBytes decodes a 4- or 16-byte address; empty is the zero Addr.
func addrFromBytes(b []byte) (netip.Addr, bool) {
	if len(b) == 0 {
		return netip.Addr{}, true
	}
	a, ok := netip.AddrFromSlice(b)
	if !ok {
		return netip.Addr{}, false
	}
	return a.Unmap(), true
}

// addrBytes encodes an address as 4 or 16 bytes; the invalid address as nil.
func addrBytes(a netip.Addr) []byte {
	if !a.IsValid() {
		return nil
	}
	return a.Unmap().AsSlice()
}

// clientKeyFrom decodes the 16-byte client of a log entry.
func clientFromBytes(b []byte) (dataplane.Addr, bool) {
	if len(b) != 16 {
		return dataplane.Addr{}, false
	}
	return dataplane.Addr(b), true
}

// toDataplane converts a committed record to the dataplane's view. It fails
// only on a record Apply should never have accepted.
func toDataplane(r *raftlogv1.ServiceRecord) (dataplane.Service, error) {
	vip, ok := addrFromBytes(r.GetVip())
	if !ok || !vip.IsValid() {
		return dataplane.Service{}, fmt.Errorf("service %q: bad vip %x: %w", r.GetName(), r.GetVip(), ErrInvalid)
	}
	snat, ok := addrFromBytes(r.GetSnatAddress())
	if !ok {
		return dataplane.Service{}, fmt.Errorf("service %q: bad snat address %x: %w", r.GetName(), r.GetSnatAddress(), ErrInvalid)
	}
	s := dataplane.Service{
		ID:       r.GetId(),
		Name:     r.GetName(),
		VIP:      vip,
		Ports:    make([]uint16, 0, len(r.GetPorts())),
		Backends: make([]dataplane.Backend, 0, len(r.GetBackends())),
		Timeout:  time.Duration(r.GetPersistenceTimeoutNs()),
		Mode:     modeToDataplane(r.GetForwardingMode()),
		Key:      dataplane.KeySourceIP,
		SNAT:     snat,
	}
	for _, p := range r.GetPorts() {
		if p == 0 || p > 65535 {
			return dataplane.Service{}, fmt.Errorf("service %q: bad port %d: %w", r.GetName(), p, ErrInvalid)
		}
		s.Ports = append(s.Ports, uint16(p))
	}
	for _, b := range r.GetBackends() {
		a, ok := addrFromBytes(b.GetAddr())
		if !ok || !a.IsValid() {
			return dataplane.Service{}, fmt.Errorf("service %q: bad backend address %x: %w", r.GetName(), b.GetAddr(), ErrInvalid)
		}
		s.Backends = append(s.Backends, dataplane.Backend{
			ID:     b.GetId(),
			Addr:   a,
			Weight: b.GetWeight(),
			State:  stateToDataplane(b.GetState()),
			Health: healthToDataplane(b.GetHealth()),
		})
	}
	return s, nil
}

func tsOrNil(ns int64) *timestamppb.Timestamp {
	if ns == 0 {
		return nil
	}
	return timestamppb.New(time.Unix(0, ns))
}

func addrString(b []byte) string {
	a, ok := addrFromBytes(b)
	if !ok || !a.IsValid() {
		return ""
	}
	return a.String()
}

// toAPI converts a committed record to the admin API's Service.
func toAPI(r *raftlogv1.ServiceRecord) *ikelbv1.Service {
	s := &ikelbv1.Service{
		Name:               r.GetName(),
		Vip:                addrString(r.GetVip()),
		Ports:              append([]uint32(nil), r.GetPorts()...),
		PersistenceTimeout: durationpb.New(time.Duration(r.GetPersistenceTimeoutNs())),
		ForwardingMode:     ikelbv1.ForwardingMode(r.GetForwardingMode()),
		AffinityKey:        ikelbv1.AffinityKey(r.GetAffinityKey()),
		SnatAddress:        addrString(r.GetSnatAddress()),
		Version:            r.GetVersion(),
	}
	if hc := r.GetHealthCheck(); hc != nil {
		s.HealthCheck = &ikelbv1.HealthCheck{
			Type:     ikelbv1.HealthCheckType(hc.GetType()),
			Interval: durationpb.New(time.Duration(hc.GetIntervalNs())),
			Timeout:  durationpb.New(time.Duration(hc.GetTimeoutNs())),
			Rise:     hc.GetRise(),
			Fall:     hc.GetFall(),
			Port:     hc.GetPort(),
		}
	}
	for _, b := range r.GetBackends() {
		s.Backends = append(s.Backends, &ikelbv1.Backend{
			Address:       addrString(b.GetAddr()),
			Weight:        b.GetWeight(),
			State:         ikelbv1.BackendState(b.GetState()),
			Health:        ikelbv1.BackendHealth(b.GetHealth()),
			HealthChanged: tsOrNil(b.GetHealthChangedNs()),
		})
	}
	return s
}
