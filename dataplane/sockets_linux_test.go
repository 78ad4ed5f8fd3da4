package dataplane

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestKernelBatchIO checks recvmmsg/sendmmsg on real sockets, IPv4 and IPv6:
// queued datagrams come back in one ReadBatch with their sources (an empty
// one included), and one WriteBatch reaches several destinations.
func TestKernelBatchIO(t *testing.T) {
	for _, ip := range []string{"127.0.0.1", "::1"} {
		t.Run(ip, func(t *testing.T) {
			ks := kernelSockets{bufBytes: 1 << 20}
			l, err := ks.listen(netip.AddrPortFrom(netip.MustParseAddr(ip), 0))
			if err != nil {
				t.Skipf("listen %s: %v", ip, err)
			}
			defer l.Close()
			var clients []*net.UDPConn
			for i := 0; i < 3; i++ {
				c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(ip), 0)))
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				clients = append(clients, c)
				if _, err := c.WriteToUDPAddrPort(bytes.Repeat([]byte{byte(i)}, i), l.LocalAddr()); err != nil {
					t.Fatal(err)
				}
			}
			pool := newBatchPool(1, 8, 100)
			got := 0
			var b *batch
			for got < 3 {
				var n int
				b, n, err = l.ReadBatch(pool)
				if err != nil {
					t.Fatal(err)
				}
				for i := 0; i < n; i++ {
					p := &b.pkts[got]
					if got != i {
						*p = b.pkts[i]
					}
					want := clients[got].LocalAddr().(*net.UDPAddr).AddrPort()
					if p.addr.Addr() != want.Addr().Unmap() || p.addr.Port() != want.Port() || p.n != got || p.trunc {
						t.Fatalf("datagram %d: %d bytes from %v trunc %v, want %d from %v", got, p.n, p.addr, p.trunc, got, want)
					}
					got++
				}
				if got < 3 {
					pool.put(b)
				}
			}
			// Reply to all three in one call.
			for i := range b.pkts[:3] {
				b.pkts[i].n = copy(b.pkts[i].buf, []byte{'r', byte(i)})
			}
			if sent, err := l.WriteBatch(b, b.pkts[:3]); sent != 3 || err != nil {
				t.Fatalf("WriteBatch = %d, %v", sent, err)
			}
			for i, c := range clients {
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				buf := make([]byte, 10)
				n, from, err := c.ReadFromUDPAddrPort(buf)
				if err != nil || !bytes.Equal(buf[:n], []byte{'r', byte(i)}) || from.Port() != l.LocalAddr().Port() {
					t.Fatalf("client %d: % x from %v, %v", i, buf[:n], from, err)
				}
			}
		})
	}
}

func TestKernelTruncation(t *testing.T) {
	l, err := kernelSockets{}.listen(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(l.LocalAddr()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(make([]byte, 200))
	b, n, err := l.ReadBatch(newBatchPool(1, 4, 100))
	if err != nil || n != 1 || !b.pkts[0].trunc {
		t.Fatalf("n %d err %v trunc %v", n, err, n == 1 && b.pkts[0].trunc)
	}
}

func TestListenReusePort(t *testing.T) {
	first, err := kernelSockets{reusePort: true}.listen(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	addr := first.LocalAddr()
	second, err := kernelSockets{reusePort: true}.listen(addr)
	if err != nil {
		t.Fatalf("second listener with SO_REUSEPORT on %v: %v", addr, err)
	}
	second.Close()
	if c, err := (kernelSockets{}).listen(addr); err == nil {
		c.Close()
		t.Fatalf("a listener without SO_REUSEPORT bound %v twice", addr)
	}
}

func TestAddrOnHost(t *testing.T) {
	for a, want := range map[string]bool{
		"127.0.0.1":   true,
		"127.0.0.3":   true,  // in lo's 127.0.0.0/8
		"192.0.2.123": false, // TEST-NET-1: on no interface of a test machine
	} {
		got, err := addrOnHost(netip.MustParseAddr(a))
		if err != nil || got != want {
			t.Errorf("addrOnHost(%s) = %v, %v; want %v", a, got, err, want)
		}
	}
}
