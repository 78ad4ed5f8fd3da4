package loadgen

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"path/filepath"
	"testing"
	"time"
)

// startSink runs a sink on a free loopback port until the test ends.
func startSink(t *testing.T) (*Sink, netip.AddrPort) {
	t.Helper()
	s, err := NewSink(SinkConfig{Listen: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")}, RcvBuf: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("sink: %v", err)
		}
	})
	return s, s.Addrs()[0]
}

// waitPackets polls s until it has counted want datagrams.
func waitPackets(t *testing.T, s *Sink, want uint64) SinkStats {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		st := s.Stats()
		if st.Packets >= want {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("sink counted %d datagrams, want %d", st.Packets, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Every datagram sent is received whole, also when written as UDP GSO
// sends (the kernel cuts them into datagrams of Size).
func TestSendCountsEveryDatagram(t *testing.T) {
	for _, c := range []struct {
		size int
		gso  bool
	}{{64, false}, {1400, false}, {64, true}, {1400, true}} {
		size := c.size
		s, dst := startSink(t)
		cfg := SendConfig{
			Dst: dst, ClientBase: netip.MustParseAddr("127.1.0.1"), Clients: 10,
			Size: size, Duration: 5 * time.Second, MaxPackets: 2000, Batch: 16, GSO: c.gso,
		}
		res, err := Send(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		if res.Sent != 2000 || res.SentBytes != 2000*uint64(size) {
			t.Fatalf("size %d: sent %d datagrams, %d bytes; want 2000, %d", size, res.Sent, res.SentBytes, 2000*size)
		}
		st := waitPackets(t, s, 2000)
		if st.Packets != 2000 || st.Bytes != 2000*uint64(size) || st.Bad != 0 || st.Echoed != 0 {
			t.Fatalf("size %d: sink %+v; want 2000 datagrams of %d bytes, none bad or echoed", size, st, size)
		}
		if st.First == 0 || st.Last < st.First {
			t.Fatalf("size %d: sink window %d..%d", size, st.First, st.Last)
		}
	}
}

func TestSendPaced(t *testing.T) {
	s, dst := startSink(t)
	cfg := SendConfig{
		Dst: dst, ClientBase: netip.MustParseAddr("127.1.0.1"), Clients: 4,
		Size: 64, Duration: 500 * time.Millisecond, Rate: 2000,
	}
	res, err := Send(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	// 2,000/s for 0.5 s is 1,000; pacing may lag a little but never run ahead.
	if res.Sent < 800 || res.Sent > 1001 {
		t.Fatalf("sent %d datagrams at 2000/s for 0.5s, want about 1000", res.Sent)
	}
	waitPackets(t, s, res.Sent)
}

func TestProbesEchoed(t *testing.T) {
	s, dst := startSink(t)
	cfg := SendConfig{
		Dst: dst, ClientBase: netip.MustParseAddr("127.1.0.1"), Clients: 2, Rate: 1000,
		ProbeBase: netip.MustParseAddr("127.2.0.1"), Probes: 3, ProbeRate: 400,
		Size: 100, Duration: 300 * time.Millisecond,
	}
	res, err := Send(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if res.ProbesSent < 50 || res.ProbesReceived != res.ProbesSent {
		t.Fatalf("probes sent %d, received %d; want >= 50, all received on loopback", res.ProbesSent, res.ProbesReceived)
	}
	if res.RTT.N != int(res.ProbesReceived) || res.RTT.P50 <= 0 || res.RTT.P99 < res.RTT.P50 || res.RTT.Max < res.RTT.P99 {
		t.Fatalf("rtt %+v inconsistent", res.RTT)
	}
	if st := s.Stats(); st.Echoed != res.ProbesSent {
		t.Fatalf("sink echoed %d, want %d", st.Echoed, res.ProbesSent)
	}
	if res.NetRTT.N != 0 || res.Request.N != 0 {
		t.Fatalf("one-way times %+v with the sink's timestamps off, want none", res.Request)
	}

	// With timestamps on, every echo carries the sink's times: each way is
	// positive, and the network round trip within the round trip.
	if err := s.SetTimestamps(true); err != nil {
		t.Fatal(err)
	}
	if res, err = Send(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	for _, p := range []Percentiles{res.Request, res.Reply, res.NetRTT} {
		if p.N != int(res.ProbesReceived) || p.N < 50 {
			t.Fatalf("%d times for %d echoes, want one each (>= 50)", p.N, res.ProbesReceived)
		}
		if p.P50 <= 0 || p.Max > res.RTT.Max || p.P50 > res.RTT.P50 {
			t.Fatalf("%+v not within round trips %+v", p, res.RTT)
		}
	}
	if res.NetRTT.P50 < res.Request.P50 || res.NetRTT.P50 < res.Reply.P50 {
		t.Fatalf("network round trip %+v shorter than a way: request %+v, reply %+v", res.NetRTT, res.Request, res.Reply)
	}
}

func TestWaitReady(t *testing.T) {
	_, dst := startSink(t)
	if err := WaitReady(context.Background(), dst, netip.MustParseAddr("127.3.0.1"), 2*time.Second); err != nil {
		t.Fatal(err)
	}
	// A socket that receives but never echoes.
	silent, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	if err := WaitReady(context.Background(), silent.LocalAddr().(*net.UDPAddr).AddrPort(), netip.MustParseAddr("127.3.0.1"), 100*time.Millisecond); !errors.Is(err, ErrNotReady) {
		t.Fatalf("WaitReady on a silent socket: %v, want ErrNotReady", err)
	}
}

func TestControl(t *testing.T) {
	s, dst := startSink(t)
	path := filepath.Join(t.TempDir(), "ctl")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeControl(ctx, path, s) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("control: %v", err)
		}
	})
	if _, err := Send(context.Background(), SendConfig{Dst: dst, ClientBase: netip.MustParseAddr("127.1.0.1"), Clients: 1, Size: 64, Duration: time.Second, MaxPackets: 100}); err != nil {
		t.Fatal(err)
	}
	waitPackets(t, s, 100)
	qctx, qcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer qcancel()
	var st SinkStats
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; {
		if st, err = Query(qctx, path, CmdReset); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond) // the control socket may not exist yet
	}
	if err != nil {
		t.Fatal(err)
	}
	if st.Packets != 100 || st.Bytes != 6400 {
		t.Fatalf("reset returned %+v, want 100 datagrams, 6400 bytes", st)
	}
	if st, err = Query(qctx, path, CmdStats); err != nil || st != (SinkStats{}) {
		t.Fatalf("stats after reset: %+v, %v; want zero", st, err)
	}
	if _, err = Query(qctx, path, CmdTimestamps); err != nil || !s.stamps.Load() {
		t.Fatalf("timestamps command: %v, on %v; want on", err, s.stamps.Load())
	}
}

func TestAddrSkipsNetworkAndBroadcast(t *testing.T) {
	base := netip.MustParseAddr("10.1.0.1")
	for i, want := range map[int]string{0: "10.1.0.1", 253: "10.1.0.254", 254: "10.1.1.1", 508: "10.1.2.1"} {
		if got := Addr(base, i).String(); got != want {
			t.Errorf("Addr(%v, %d) = %s, want %s", base, i, got, want)
		}
	}
}

func TestSummarize(t *testing.T) {
	d := make([]time.Duration, 100)
	for i := range d {
		d[i] = time.Duration(100-i) * time.Microsecond
	}
	p := Summarize(d)
	if p.N != 100 || p.P50 != 50*time.Microsecond || p.P99 != 99*time.Microsecond || p.Max != 100*time.Microsecond {
		t.Fatalf("Summarize = %+v", p)
	}
	if (Summarize(nil) != Percentiles{}) {
		t.Fatal("Summarize(nil) not zero")
	}
}

func TestConfigRejected(t *testing.T) {
	good := SendConfig{Dst: netip.MustParseAddrPort("127.0.0.1:4500"), ClientBase: netip.MustParseAddr("127.1.0.1"), Clients: 1, Size: 64, Duration: time.Second}
	for name, mut := range map[string]func(*SendConfig){
		"small":      func(c *SendConfig) { c.Size = HeaderLen - 1 },
		"big":        func(c *SendConfig) { c.Size = MaxSize + 1 },
		"no dst":     func(c *SendConfig) { c.Dst = netip.AddrPort{} },
		"nobody":     func(c *SendConfig) { c.Clients = 0 },
		"duration":   func(c *SendConfig) { c.Duration = 0 },
		"probe rate": func(c *SendConfig) { c.Probes, c.ProbeBase = 1, netip.MustParseAddr("127.2.0.1") },
		"gso batch":  func(c *SendConfig) { c.GSO, c.Batch = true, maxGSOSegments+1 },
	} {
		c := good
		mut(&c)
		if _, err := Send(context.Background(), c); !errors.Is(err, ErrConfig) {
			t.Errorf("%s: err %v, want ErrConfig", name, err)
		}
	}
}
