package cluster

import (
	"net/netip"
	"testing"

	"github.com/ikelb/ikelb/dataplane"
	"github.com/prometheus/client_golang/prometheus"
)

func TestCollector(t *testing.T) {
	eng := &fakeEngine{counters: []dataplane.ServiceCounters{{
		ID: 1, Name: "vpn", Packets: 10, DropsByReason: map[string]uint64{"no_backend": 2},
		Backends: []dataplane.BackendCounters{{ID: 1, Addr: netip.MustParseAddr("10.1.0.1"), Packets: 10}},
	}}, flows: 7}
	n, _ := adminNode(t, eng)
	mustCreate(t, n, apiService("vpn", "10.0.0.1", "10.1.0.1", "10.1.0.2"))
	proposeBinds(t, n, 3)
	eng.mu.Lock()
	eng.kernel = map[uint32]dataplane.KernelClients{n.fsm.Services()[0].ID: {Flows: 5, DNAT: 2}, 99: {Flows: 1}} // 99: no such service
	eng.mu.Unlock()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(n))
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			name := f.GetName()
			for _, l := range m.GetLabel() {
				name += "," + l.GetName() + "=" + l.GetValue()
			}
			got[name] = m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	for name, want := range map[string]float64{
		"ikelb_service_packets_total,service=vpn":                   10,
		"ikelb_service_drops_total,reason=no_backend,service=vpn":   2,
		"ikelb_backend_active_clients,backend=10.1.0.1,service=vpn": 3,
		"ikelb_backend_up,backend=10.1.0.2,service=vpn":             1,
		"ikelb_affinity_entries":                                    3,
		"ikelb_flows":                                               7,
		"ikelb_kernel_nat_flows,service=vpn":                        5,
		"ikelb_kernel_nat_dnat_clients,service=vpn":                 2,
		"ikelb_raft_state,state=Leader":                             1,
		"ikelb_degraded":                                            0,
		"ikelb_proposals_total":                                     3,
		"ikelb_proposals_dropped_total,reason=queue_full":           0,
		"ikelb_backend_packets_total,backend=10.1.0.1,service=vpn":  10,
	} {
		if v, ok := got[name]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", name, v, ok, want)
		}
	}
}
