package dataplane

import (
	"net"
	"net/netip"
	"testing"
	"time"
)

// startEcho runs an allocation-free UDP echo server on c until it closes.
func startEcho(tb testing.TB, c *net.UDPConn) {
	done := make(chan struct{})
	tb.Cleanup(func() { c.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			c.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
}

// roundTrips sends burst datagrams from c to dst and reads burst replies,
// rounds times.
func roundTrips(tb testing.TB, c *net.UDPConn, dst netip.AddrPort, rounds, burst int, msg, buf []byte) {
	for r := 0; r < rounds; r++ {
		for i := 0; i < burst; i++ {
			if _, err := c.WriteToUDPAddrPort(msg, dst); err != nil {
				tb.Fatal(err)
			}
		}
		for i := 0; i < burst; i++ {
			if _, _, err := c.ReadFromUDPAddrPort(buf); err != nil {
				tb.Fatal(err)
			}
		}
	}
}

// BenchmarkForwardLoopback sends ESP-sized datagrams through the engine's
// real sockets on loopback (client → VIP → backend echo → VIP → client) and
// reports the cost relative to the same exchange without the engine
// (x_direct), measured in the same run.
func BenchmarkForwardLoopback(b *testing.B) {
	for _, burst := range []int{1, 32} {
		b.Run(map[int]string{1: "rtt", 32: "burst32"}[burst], func(b *testing.B) {
			ports, conns := freePorts(b, 1, "127.0.0.1", "127.0.0.2")
			backend := conns["127.0.0.2"][0]
			startEcho(b, backend)
			tbl := NewTable()
			e, err := New(Config{Logger: discardLogger(), Table: tbl, Proposer: &countingProposer{}})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { e.Close() })
			vip := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ports[0])
			err = e.SetServices([]Service{{ID: 1, VIP: vip.Addr(), Ports: ports, Timeout: time.Hour, Mode: ModeNAT,
				Backends: []Backend{{ID: 1, Addr: netip.MustParseAddr("127.0.0.2"), Weight: 1, State: StateActive}}}})
			if err != nil {
				b.Fatal(err)
			}
			client, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 10)})
			if err != nil {
				b.Fatal(err)
			}
			defer client.Close()
			_ = client.SetReadDeadline(time.Now().Add(5 * time.Minute))
			tbl.Put(ClientKey{Service: 1, Client: AddrFrom(netip.MustParseAddr("127.0.0.10"))},
				Entry{Backend: 1, LastSeen: time.Now().Add(time.Hour).UnixNano()})
			msg := make([]byte, 120) // the capture's ESP datagrams
			msg[0] = 0x58
			buf := make([]byte, 2048)
			direct := backend.LocalAddr().(*net.UDPAddr).AddrPort()

			roundTrips(b, client, vip, 10, burst, msg, buf) // warm: flow open, pool full
			start := time.Now()
			roundTrips(b, client, direct, 1000, burst, msg, buf)
			base := time.Since(start).Seconds() / 1000 / float64(burst)

			b.ReportAllocs()
			b.ResetTimer()
			roundTrips(b, client, vip, b.N, burst, msg, buf)
			b.StopTimer()
			per := b.Elapsed().Seconds() / float64(b.N) / float64(burst)
			b.ReportMetric(per*1e9, "ns/datagram")
			b.ReportMetric(per/base, "x_direct")
		})
	}
}
