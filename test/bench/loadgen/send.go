package loadgen

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/ipv4"
)

// SendConfig describes one bounded run of Send.
type SendConfig struct {
	// Dst is where every datagram goes (a VIP:4500, or a backend directly).
	Dst netip.AddrPort
	// ClientBase is the first client source address; client i uses
	// Addr(ClientBase, i). Clients is how many clients send load.
	ClientBase netip.Addr
	Clients    int
	// Size is the UDP payload size of every datagram, HeaderLen..MaxSize.
	Size int
	// Duration bounds the run; MaxPackets (0: none) bounds the load packets.
	Duration   time.Duration
	MaxPackets uint64
	// Rate is the load in datagrams per second over all clients; 0 sends
	// open-loop as fast as the sockets take them.
	Rate float64
	// Batch is the most datagrams per sendmmsg; 0 means 64.
	Batch int
	// GSO, above 1, sends each client turn's Batch datagrams as one UDP
	// GSO write (UDP_SEGMENT) that the kernel cuts into datagrams of Size
	// (at most maxGSOSegments): far fewer system calls per datagram, so one
	// core can offer more than a kernel forwarding path takes. The client
	// interface must segment in software (gso_max_segs 1), or the balancer
	// receives the unsegmented packets.
	GSO bool
	// SrcPort is every client's source port; 0 picks ephemeral ones. A
	// fixed port (each client has its own address) makes every run reuse
	// the same flows, so balancers measure their steady state.
	SrcPort uint16

	// Probes clients starting at ProbeBase send ProbeRate timestamped
	// probes per second in total, echoed by the Sink, for round-trip times.
	ProbeBase netip.Addr
	Probes    int
	ProbeRate float64
}

// SendResult is what Send did.
type SendResult struct {
	Sent       uint64        `json:"sent"`
	SentBytes  uint64        `json:"sent_bytes"`
	SendErrors uint64        `json:"send_errors"`
	Elapsed    time.Duration `json:"elapsed_ns"`

	ProbesSent     uint64      `json:"probes_sent"`
	ProbesReceived uint64      `json:"probes_received"`
	RTT            Percentiles `json:"rtt"`
	// With the Sink's timestamps on: Request is from a probe's send call
	// to its kernel receive time at the sink, Reply from the echo's send
	// call to its kernel receive time at the prober, and NetRTT, per
	// probe, their sum (see the package doc).
	Request Percentiles `json:"request"`
	Reply   Percentiles `json:"reply"`
	NetRTT  Percentiles `json:"net_rtt"`
}

// Percentiles summarises a set of durations.
type Percentiles struct {
	N   int           `json:"n"`
	P50 time.Duration `json:"p50_ns"`
	P90 time.Duration `json:"p90_ns"`
	P99 time.Duration `json:"p99_ns"`
	Max time.Duration `json:"max_ns"`
}

// Summarize sorts d in place and returns its percentiles (nearest rank).
func Summarize(d []time.Duration) Percentiles {
	if len(d) == 0 {
		return Percentiles{}
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	at := func(q float64) time.Duration {
		i := int(q*float64(len(d))+0.5) - 1
		return d[min(max(i, 0), len(d)-1)]
	}
	return Percentiles{N: len(d), P50: at(0.50), P90: at(0.90), P99: at(0.99), Max: d[len(d)-1]}
}

// Addr returns the i-th client address after base, counting only addresses
// whose last byte is neither 0 nor 255 (so a /16 of clients never uses a
// subnet's network or broadcast address).
func Addr(base netip.Addr, i int) netip.Addr {
	b := base.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	for n := 0; ; v++ {
		if last := byte(v); last == 0 || last == 255 {
			continue
		}
		if n == i {
			break
		}
		n++
	}
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func (c *SendConfig) validate() error {
	switch {
	case !c.Dst.IsValid() || !c.Dst.Addr().Is4():
		return fmt.Errorf("%w: dst %v: want an IPv4 address and port", ErrConfig, c.Dst)
	case c.Clients > 0 && !c.ClientBase.Is4():
		return fmt.Errorf("%w: client base %v: want IPv4", ErrConfig, c.ClientBase)
	case c.Probes > 0 && !c.ProbeBase.Is4():
		return fmt.Errorf("%w: probe base %v: want IPv4", ErrConfig, c.ProbeBase)
	case c.Clients == 0 && c.Probes == 0:
		return fmt.Errorf("%w: no clients and no probes", ErrConfig)
	case c.Clients < 0 || c.Probes < 0 || c.Rate < 0 || c.ProbeRate < 0 || c.Batch < 0:
		return fmt.Errorf("%w: negative count or rate", ErrConfig)
	case c.Size < HeaderLen || c.Size > MaxSize:
		return fmt.Errorf("%w: size %d: want %d..%d", ErrConfig, c.Size, HeaderLen, MaxSize)
	case c.Duration <= 0:
		return fmt.Errorf("%w: duration must be positive", ErrConfig)
	case c.Probes > 0 && c.ProbeRate <= 0:
		return fmt.Errorf("%w: probes need a probe rate", ErrConfig)
	case c.GSO && c.Batch > maxGSOSegments:
		return fmt.Errorf("%w: batch %d: GSO takes at most %d datagrams per write", ErrConfig, c.Batch, maxGSOSegments)
	}
	return nil
}

// dial opens n UDP sockets, the i-th bound to Addr(base, i):port and connected
// to dst.
func dial(base netip.Addr, n int, port uint16, dst netip.AddrPort) ([]*net.UDPConn, error) {
	conns := make([]*net.UDPConn, 0, n)
	for i := range n {
		c, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(Addr(base, i), port)), net.UDPAddrFromAddrPort(dst))
		if err != nil {
			closeAll(conns)
			return nil, fmt.Errorf("loadgen: client %d (%v): %w", i, Addr(base, i), err)
		}
		conns = append(conns, c)
	}
	return conns, nil
}

func closeAll(conns []*net.UDPConn) {
	for _, c := range conns {
		_ = c.Close()
	}
}

// probeGrace is how long probe readers wait for echoes after the run.
const probeGrace = 500 * time.Millisecond

// Send runs one bounded load: it returns after cfg.Duration (plus up to
// probeGrace for the last probes' echoes), after cfg.MaxPackets, or when ctx
// ends, whichever comes first.
func Send(ctx context.Context, cfg SendConfig) (SendResult, error) {
	if err := cfg.validate(); err != nil {
		return SendResult{}, err
	}
	if cfg.Batch == 0 {
		cfg.Batch = 64
	}
	load, err := dial(cfg.ClientBase, cfg.Clients, cfg.SrcPort, cfg.Dst)
	if err != nil {
		return SendResult{}, err
	}
	defer closeAll(load)
	if cfg.GSO {
		for _, c := range load {
			if err := setGSO(c, cfg.Size); err != nil {
				return SendResult{}, fmt.Errorf("loadgen: UDP_SEGMENT: %w", err)
			}
		}
	}
	probes, err := dial(cfg.ProbeBase, cfg.Probes, cfg.SrcPort, cfg.Dst)
	if err != nil {
		return SendResult{}, err
	}
	defer closeAll(probes)

	start := time.Now()
	end := start.Add(cfg.Duration)
	ctx, cancel := context.WithDeadline(ctx, end)
	defer cancel()

	var res SendResult
	var wg sync.WaitGroup
	var pr *prober
	if len(probes) > 0 {
		pr = &prober{conns: probes, rate: cfg.ProbeRate, size: cfg.Size, start: start}
		wg.Go(func() { pr.readAll(end.Add(probeGrace)) })
		wg.Go(func() { pr.send(ctx) })
	}
	if len(load) > 0 {
		res.Sent, res.SendErrors = sendLoad(ctx, load, cfg, start)
		res.SentBytes = res.Sent * uint64(cfg.Size)
	} else {
		<-ctx.Done()
	}
	res.Elapsed = time.Since(start)
	if pr != nil {
		cancel() // MaxPackets may end the load before the deadline
		wg.Wait()
		res.ProbesSent = pr.sent.Load()
		res.ProbesReceived = uint64(len(pr.rtts))
		res.RTT = Summarize(pr.rtts)
		res.Request, res.Reply, res.NetRTT = Summarize(pr.requests), Summarize(pr.replies), Summarize(pr.nets)
	}
	return res, nil
}

// sendLoad writes batches round-robin over the client sockets until ctx ends
// or cfg.MaxPackets are sent, paced to cfg.Rate if it is set.
func sendLoad(ctx context.Context, conns []*net.UDPConn, cfg SendConfig, start time.Time) (sent, errs uint64) {
	batch := cfg.Batch
	if cfg.Rate > 0 {
		// Small batches when paced, so the load has no large bursts: at
		// most about 20,000 sendmmsg calls a second.
		batch = min(batch, max(1, int(cfg.Rate/20000)))
	}
	pcs := make([]*ipv4.PacketConn, len(conns))
	for i, c := range conns {
		pcs[i] = ipv4.NewPacketConn(c)
	}
	msgs := make([]ipv4.Message, batch)
	for i := range msgs {
		msgs[i].Buffers = [][]byte{make([]byte, cfg.Size)}
	}
	var gso []byte // with cfg.GSO: the turn's datagrams back to back
	if cfg.GSO {
		gso = make([]byte, batch*cfg.Size)
	}
	var seq uint64
	done := ctx.Done()
	for k := 0; ; k = (k + 1) % len(pcs) {
		select {
		case <-done:
			return sent, errs
		default:
		}
		n := uint64(batch)
		if cfg.MaxPackets > 0 {
			if sent >= cfg.MaxPackets {
				return sent, errs
			}
			n = min(n, cfg.MaxPackets-sent)
		}
		if cfg.Rate > 0 {
			// Never past Duration: the deadline's timer may fire late,
			// and a paced run sends at most Rate × Duration.
			elapsed := min(time.Since(start), cfg.Duration)
			due := int64(cfg.Rate*elapsed.Seconds()) - int64(sent)
			if due <= 0 {
				next := time.Duration(float64(sent+1) / cfg.Rate * float64(time.Second))
				sleep(ctx, max(next-elapsed, 20*time.Microsecond))
				k-- // the same client's turn again
				if k < 0 {
					k = len(pcs) - 1
				}
				continue
			}
			n = min(n, uint64(due))
		}
		spi := uint32(spiBase + k)
		if gso != nil {
			size := uint64(cfg.Size)
			for i := range n {
				putHeader(gso[i*size:(i+1)*size], spi, KindLoad, seq+i, 0)
			}
			if _, err := conns[k].Write(gso[:n*size]); err != nil {
				errs++
				continue
			}
			sent += n
			seq += n
			continue
		}
		for i := range n {
			putHeader(msgs[i].Buffers[0], spi, KindLoad, seq+i, 0)
		}
		w, err := pcs[k].WriteBatch(msgs[:n], 0)
		if w > 0 {
			sent += uint64(w)
			seq += uint64(w)
		}
		if err != nil {
			errs++
		}
	}
}

// sleep waits for d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// prober sends timestamped probes round-robin over its sockets and collects
// the round-trip times of the echoes.
type prober struct {
	// set once
	conns []*net.UDPConn
	rate  float64
	size  int
	start time.Time

	sent atomic.Uint64

	mu                sync.Mutex // guards the following
	rtts              []time.Duration
	requests, replies []time.Duration
	nets              []time.Duration
}

func (p *prober) send(ctx context.Context) {
	buf := make([]byte, p.size)
	interval := time.Duration(float64(time.Second) / p.rate)
	for i := 0; ; i++ {
		next := time.Duration(i) * interval
		if d := next - time.Since(p.start); d > 0 {
			sleep(ctx, d)
		}
		if ctx.Err() != nil {
			return
		}
		k := i % len(p.conns)
		putHeader(buf, uint32(spiBase+0x80000+k), KindProbe, uint64(i), time.Now().UnixNano())
		if _, err := p.conns[k].Write(buf); err == nil {
			p.sent.Add(1)
		}
	}
}

// readAll reads echoes on every probe socket until deadline.
func (p *prober) readAll(deadline time.Time) {
	var wg sync.WaitGroup
	for _, c := range p.conns {
		_ = c.SetReadDeadline(deadline)
		stamped := setTimestamps(c, 1) == nil // else: round trips only
		wg.Go(func() {
			buf := make([]byte, MaxSize)
			oob := make([]byte, 64)
			for {
				n, oobn, _, _, err := c.ReadMsgUDP(buf, oob)
				now := time.Now().UnixNano()
				if err != nil {
					if errors.Is(err, net.ErrClosed) || isTimeout(err) {
						return
					}
					continue // e.g. ECONNREFUSED from an earlier ICMP error
				}
				kind, ts, ok := parseHeader(buf[:n])
				if !ok || kind != KindProbe {
					continue
				}
				sinkRx, sinkTx := probeStamps(buf[:n])
				var rx int64
				if stamped && sinkRx != 0 {
					rx = rxStamp(oob[:oobn])
				}
				p.mu.Lock()
				p.rtts = append(p.rtts, time.Duration(now-ts))
				if rx != 0 {
					req, rep := time.Duration(sinkRx-ts), time.Duration(rx-sinkTx)
					p.requests, p.replies, p.nets = append(p.requests, req), append(p.replies, rep), append(p.nets, req+rep)
				}
				p.mu.Unlock()
			}
		})
	}
	wg.Wait()
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// WaitReady sends a probe from src to dst every 20 ms until one comes back
// echoed, and returns ErrNotReady if none has by timeout.
func WaitReady(ctx context.Context, dst netip.AddrPort, src netip.Addr, timeout time.Duration) error {
	conns, err := dial(src, 1, 0, dst)
	if err != nil {
		return err
	}
	defer closeAll(conns)
	c := conns[0]
	buf := make([]byte, 64)
	in := make([]byte, MaxSize)
	start := time.Now()
	for i := 0; time.Since(start) < timeout; i++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		putHeader(buf, spiBase+0xFFFFF, KindProbe, uint64(i), 0)
		_, _ = c.Write(buf)
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		for {
			n, err := c.Read(in)
			if err != nil {
				if isTimeout(err) {
					break
				}
				continue
			}
			if kind, _, ok := parseHeader(in[:n]); ok && kind == KindProbe {
				return nil
			}
		}
	}
	return fmt.Errorf("%w: no echo from %v via %v within %v", ErrNotReady, dst, src, timeout)
}
