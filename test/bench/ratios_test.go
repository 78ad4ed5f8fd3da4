package bench

import (
	"strings"
	"testing"
)

// The ratio of a round compares runs of the same round: a machine that
// drifts from fast to slow over the rounds moves both sides, not the ratio.
func TestFillRatiosPerRound(t *testing.T) {
	runs := func(pps ...float64) []Run {
		var rs []Run
		for _, p := range pps {
			rs = append(rs, Run{RxPPS: p, BalancerNsPerPkt: 1e9 / p})
		}
		return rs
	}
	rs := []Result{
		{Target: NFTables{}.Name(), Size: 64, Available: true, Runs: runs(500, 400, 300)},
		{Target: (&Nginx{}).Name(), Size: 64, Available: true, Runs: runs(50, 40, 30)},
		{Target: "ikelb nat", Size: 64, Available: true, Runs: runs(300, 480, 330)},
		{Target: "ikelb nat", Size: 1400, Available: true, Runs: runs(1, 2, 3)}, // no nftables at 1400
	}
	for i := range rs {
		summarize(&rs[i])
	}
	fillRatios(rs)
	k := rs[2]
	// Rounds: 0.6, 1.2, 1.1 → median 1.1, where the ratio of the two
	// medians would say 330/400 = 0.825.
	if !near(k.VsNFT, 1.1) || len(k.VsNFTRounds) != 3 || !near(k.VsNFTRounds[0], 0.6) {
		t.Errorf("VsNFT = %v, rounds %v; want 1.1, [0.6 1.2 1.1]", k.VsNFT, k.VsNFTRounds)
	}
	if !near(k.VsNginx, 11) {
		t.Errorf("VsNginx = %v, want 11", k.VsNginx)
	}
	if !near(k.CapacityVsNFT, 1.1) {
		t.Errorf("CapacityVsNFT = %v, want 1.1", k.CapacityVsNFT)
	}
	if k.RxPPS != 330 {
		t.Errorf("RxPPS = %v, want the median run's 330", k.RxPPS)
	}
	// Latency: medians over the rounds, added = median of the rounds'
	// differences, p99 ×nft of each round's pair.
	lat := func(p99s ...float64) []Latency {
		var ls []Latency
		for _, p := range p99s {
			ls = append(ls, Latency{Probes: 10, Echoed: 10, P50us: p / 10, P99us: p, NetN: 10, NetP99us: p / 100})
		}
		return ls
	}
	r := Result{Available: true, LatencyRounds: lat(1000, 3000, 2000), BaselineRounds: lat(500, 2600, 1200)}
	summarizeLatency(&r)
	if r.Latency.P99us != 2000 || r.Baseline.P99us != 1200 || r.Latency.Echoed != 30 {
		t.Errorf("latency %+v, baseline %+v; want p99 medians 2000 and 1200, 30 echoed", r.Latency, r.Baseline)
	}
	if !near(r.AddedP99us, 500) { // differences 500, 400, 800
		t.Errorf("AddedP99us = %v, want 500", r.AddedP99us)
	}
	nft := Result{Target: NFTables{}.Name(), Size: 64, Available: true, RxPPS: 1, LatencyRounds: lat(2000, 1000, 4000)}
	r.Target, r.Size, r.RxPPS = "ikelb nat", 64, 1
	both := []Result{nft, r}
	fillRatios(both)
	if !near(both[1].P99VsNFT, 0.5) { // rounds 0.5, 3, 0.5
		t.Errorf("P99VsNFT = %v, want 0.5", both[1].P99VsNFT)
	}
	if !near(both[1].NetP99VsNFT, 0.5) || r.Latency.NetN != 30 || !near(r.Latency.NetP99us, 20) {
		t.Errorf("NetP99VsNFT = %v, net n %d p99 %v; want 0.5, 30, 20", both[1].NetP99VsNFT, r.Latency.NetN, r.Latency.NetP99us)
	}
	// A round without the sinks' timestamps has no network round trip:
	// it is left out of the ratio, not counted as zero.
	both[1].LatencyRounds[1].NetN = 0
	fillRatios(both)
	if !near(both[1].NetP99VsNFT, 0.5) { // rounds 0.5, -, 0.5
		t.Errorf("NetP99VsNFT with a round unstamped = %v, want 0.5", both[1].NetP99VsNFT)
	}

	if got := median([]float64{1.3, 0.9}); !near(got, 1.1) {
		t.Errorf("median of two = %v, want their mean 1.1", got)
	}
	if rs[3].VsNFT != 0 || rs[3].VsNFTRounds != nil {
		t.Errorf("1400 B without an nftables row: VsNFT %v, rounds %v", rs[3].VsNFT, rs[3].VsNFTRounds)
	}
}

func near(a, b float64) bool { return a > b-1e-9 && a < b+1e-9 }

func TestParseUDPSnmp(t *testing.T) {
	snmp := `Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 100
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 25701 51 379916 12 379916 0 0 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 7 0 0 0 0 0 0 0 0
`
	got, err := parseUDPSnmp(snmp)
	if err != nil || got != 25701+379916 {
		t.Errorf("parseUDPSnmp = %d, %v; want %d", got, err, 25701+379916)
	}
	if _, err := parseUDPSnmp("Ip: Forwarding\nIp: 1\n"); err == nil || !strings.Contains(err.Error(), "no Udp") {
		t.Errorf("no Udp lines: err = %v", err)
	}
	if _, err := parseUDPSnmp("Udp: InDatagrams InErrors\nUdp: x 1\n"); err == nil {
		t.Error("a non-number was read as a count")
	}
}
