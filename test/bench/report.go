package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Result is one target at one datagram size.
type Result struct {
	Target    string `json:"target"`
	Size      int    `json:"size_bytes"`
	Available bool   `json:"available"`
	Reason    string `json:"reason,omitempty"`

	// Median of the runs: datagrams/s and UDP payload Mbit/s counted at the
	// backends over the receive window; the generator's send rate; the
	// share of sent datagrams that never arrived.
	RxPPS  float64 `json:"rx_pps"`
	RxMbps float64 `json:"rx_mbit_s"`
	TxPPS  float64 `json:"tx_pps"`
	Loss   float64 `json:"loss"`
	Runs   []Run   `json:"runs,omitempty"`
	// Rate relative to nftables and nginx at the same size (0: unknown):
	// the median over the rounds of the run's rate over the reference's
	// in the same round; VsNFTRounds are those rounds' ratios.
	VsNFT       float64   `json:"vs_nftables,omitempty"`
	VsNFTRounds []float64 `json:"vs_nftables_rounds,omitempty"`
	VsNginx     float64   `json:"vs_nginx,omitempty"`

	// Round trips at LatencyRate (half of nftables' RxPPS at this size, or
	// of the target's own where lower) through the target, and
	// through routing alone at the same rate; Added* are the differences.
	// Latency and Baseline are the medians over the latency rounds
	// (LatencyRounds, BaselineRounds); Added* the medians of each round's
	// difference.
	LatencyRate    float64   `json:"latency_load_pps,omitempty"`
	Latency        Latency   `json:"latency"`
	Baseline       Latency   `json:"baseline_latency"`
	LatencyRounds  []Latency `json:"latency_rounds,omitempty"`
	BaselineRounds []Latency `json:"baseline_latency_rounds,omitempty"`
	AddedP50us     float64   `json:"added_p50_us"`
	AddedP99us     float64   `json:"added_p99_us"`
	// BalancerNsPerPkt is the balancer CPU's busy time (its process and
	// the kernel's packet work, /proc/stat) per datagram received at the
	// backends, median of the rate runs; CapacityVsNFT is nftables' cost
	// over this one: the rate one balancer core would reach relative to
	// nftables, whatever the generator managed to offer.
	BalancerNsPerPkt float64 `json:"balancer_ns_per_datagram,omitempty"`
	CapacityVsNFT    float64 `json:"capacity_vs_nftables,omitempty"`
	// P99VsNFT is the RTT p99 relative to nftables' at the same size, each
	// at the same load (the "p99 ≤ 2× nftables'"): the median
	// of the latency rounds' ratios.
	P99VsNFT float64 `json:"p99_vs_nftables,omitempty"`
	// NetP99VsNFT is the same for the network round trip's p99.
	NetP99VsNFT float64 `json:"net_rtt_p99_vs_nftables,omitempty"`
}

// Run is one rate measurement.
type Run struct {
	Sent       uint64  `json:"sent"`
	Received   uint64  `json:"received"`
	Bad        uint64  `json:"bad"`
	SendErrors uint64  `json:"send_errors"`
	TxPPS      float64 `json:"tx_pps"`
	RxPPS      float64 `json:"rx_pps"`
	RxMbps     float64 `json:"rx_mbit_s"`
	// BalancerNsPerPkt: see Result.
	BalancerNsPerPkt float64 `json:"balancer_ns_per_datagram,omitempty"`
}

// Latency summarises the probes' round trips and, from the kernel's
// receive timestamps at both ends (loadgen: the sinks' timestamps on),
// each way on its own and their sum, the network round trip: the round
// trip without the time a probe waits in the sink's socket and process
// and for the prober's reader to wake, all on the generator's busy CPU.
type Latency struct {
	Probes uint64  `json:"probes"`
	Echoed uint64  `json:"echoed"`
	P50us  float64 `json:"p50_us"`
	P90us  float64 `json:"p90_us"`
	P99us  float64 `json:"p99_us"`
	MaxUs  float64 `json:"max_us"`

	NetN       int     `json:"net_n,omitempty"`
	NetP50us   float64 `json:"net_rtt_p50_us,omitempty"`
	NetP99us   float64 `json:"net_rtt_p99_us,omitempty"`
	NetMaxUs   float64 `json:"net_rtt_max_us,omitempty"`
	RequestP50 float64 `json:"request_p50_us,omitempty"`
	RequestP99 float64 `json:"request_p99_us,omitempty"`
	ReplyP50   float64 `json:"reply_p50_us,omitempty"`
	ReplyP99   float64 `json:"reply_p99_us,omitempty"`
}

// Machine describes where the numbers came from.
type Machine struct {
	CPU         string `json:"cpu"`
	Cores       int    `json:"cores"`
	Kernel      string `json:"kernel"`
	Go          string `json:"go"`
	GenCPU      string `json:"generator_cpu"`
	BalancerCPU string `json:"balancer_cpu"`
	RPS         bool   `json:"rps"`
}

// Report is a suite's output.
type Report struct {
	Suite   string        `json:"suite"`
	Started time.Time     `json:"started"`
	Took    time.Duration `json:"took_ns"`
	Machine Machine       `json:"machine"`
	Clients int           `json:"clients"`
	Results []Result      `json:"results"`
}

// ThisMachine reads the CPU model, core count and kernel release.
func ThisMachine(env *Env) Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version(), CPU: "unknown", Kernel: "unknown"}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if env != nil {
		m.GenCPU, m.BalancerCPU, m.RPS = env.GenCPU, env.BalancerCPU, env.RPS
	}
	return m
}

// WriteJSON writes the report, indented, to path.
func (r *Report) WriteJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// WriteTable prints the results table.
func (r *Report) WriteTable(w io.Writer) error {
	m := r.Machine
	fmt.Fprintf(w, "ikelb %s benchmark, %s\n", r.Suite, r.Started.UTC().Format(time.RFC3339))
	fmt.Fprintf(w, "machine: %s, %d cores, kernel %s, %s; generator+sinks on CPU %s, balancer on CPU %s (RPS %v); %d clients\n\n",
		m.CPU, m.Cores, m.Kernel, m.Go, m.GenCPU, m.BalancerCPU, m.RPS, r.Clients)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "target\tsize\trx kpps\tMbit/s\tloss\t×nft\t×nft rounds\t×nginx\tCPU ns/dgram\tcapacity ×nft\tRTT p50 µs\tRTT p99 µs\tp99 ×nft\tadded p50 µs\tadded p99 µs\tnet RTT p50 µs\tnet RTT p99 µs\tnet p99 ×nft\t")
	var missing []string
	for _, x := range r.Results {
		if !x.Available {
			fmt.Fprintf(tw, "%s\t%d\tn/a\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\n", x.Target, x.Size)
			if m := fmt.Sprintf("%s: not available: %s", x.Target, oneLine(strings.TrimPrefix(x.Reason, ErrUnavailable.Error()+": "), 300)); !slices.Contains(missing, m) {
				missing = append(missing, m)
			}
			continue
		}
		lat, added := "-", "-"
		p50, p99 := "-", "-"
		if x.Latency.Echoed > 0 {
			p50, p99 = fmt.Sprintf("%.0f", x.Latency.P50us), fmt.Sprintf("%.0f", x.Latency.P99us)
			lat, added = fmt.Sprintf("%+.0f", x.AddedP50us), fmt.Sprintf("%+.0f", x.AddedP99us)
		}
		net50, net99 := "-", "-"
		if x.Latency.NetN > 0 {
			net50, net99 = fmt.Sprintf("%.0f", x.Latency.NetP50us), fmt.Sprintf("%.0f", x.Latency.NetP99us)
		}
		cost := "-"
		if x.BalancerNsPerPkt > 0 {
			cost = fmt.Sprintf("%.0f", x.BalancerNsPerPkt)
		}
		spread := "-"
		if len(x.VsNFTRounds) > 1 {
			spread = fmt.Sprintf("%.2f–%.2f", slices.Min(x.VsNFTRounds), slices.Max(x.VsNFTRounds))
		}
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%.0f\t%.1f%%\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n",
			x.Target, x.Size, x.RxPPS/1000, x.RxMbps, 100*x.Loss, ratio(x.VsNFT), spread, ratio(x.VsNginx), cost, ratio(x.CapacityVsNFT),
			p50, p99, ratio(x.P99VsNFT), lat, added, net50, net99, ratio(x.NetP99VsNFT))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, m := range missing {
		fmt.Fprintf(w, "\n%s", m)
	}
	if len(missing) > 0 {
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "\nrx = counted at the backends (median of runs); Mbit/s of UDP payload; loss = not received / sent at full open-loop load.\n")
	fmt.Fprintf(w, "The runs go in rounds, every target once per round: ×nft, ×nginx, capacity ×nft and p99 ×nft are the medians of each round's ratio (RTT and added: medians over the latency rounds); ×nft rounds is the range of ×nft.\n")
	fmt.Fprintf(w, "RTT = client → balancer → backend echo → balancer → client at half nftables' rate (half the target's own where lower); added = RTT − routing-only RTT at the same rate.\n")
	fmt.Fprintf(w, "net RTT = the same probes' two ways, each from the send call to the kernel's receive timestamp at the other end (SO_TIMESTAMPNS): RTT without the sink's socket queue and process and the prober's wake-up, on the generator's CPU.\n")
	fmt.Fprintf(w, "CPU ns/dgram = the balancer CPU's busy time (/proc/stat: its process and the kernel's packet work) per datagram received; capacity ×nft = nftables' ns/dgram ÷ the target's: the rate one balancer core would reach relative to nftables, whatever the generator offered.\n")
	fmt.Fprintf(w, "took %v\n", r.Took.Round(time.Second))
	return nil
}

func ratio(v float64) string {
	if v == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", v)
}

func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		s = s[:n] + "…"
	}
	return s
}
