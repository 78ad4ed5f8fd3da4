package dataplane

import (
	"net"
	"net/netip"
	"testing"
)

func TestSNATPortsDeterministicAndInRange(t *testing.T) {
	a := netip.MustParseAddrPort("198.51.100.7:4500")
	b := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, 100, 7}), 4500) // the same client, parsed on another node
	if snatPorts(a, 4500) != snatPorts(b, 4500) {
		t.Fatal("snatPorts differs between two calls: nodes would disagree")
	}
	if snatPorts(a, 4500) == snatPorts(a, 500) {
		t.Fatal("the 500 and 4500 flows of a client got the same ports")
	}
	own := netip.MustParseAddrPort("198.51.100.7:40001")
	if p := snatPorts(own, 4500); p[0] != 40001 {
		t.Fatalf("a client port in range is not tried first: %v", p)
	}
	seen := map[uint16]int{}
	for i := range 2000 {
		c := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 4500)
		for _, p := range snatPorts(c, 4500) {
			if p < snatPortLo {
				t.Fatalf("port %d below %d", p, snatPortLo)
			}
		}
		seen[snatPorts(c, 4500)[0]]++
	}
	if len(seen) < 1900 {
		t.Fatalf("2000 clients share only %d first-choice ports", len(seen))
	}
}

// Two nodes (here: two dials after each other) source one client flow from
// the same SNAT address and port, and a taken port moves on to the next
// deterministic choice.
func TestNATUpstreamSameSNATPortOnEveryNode(t *testing.T) {
	backend, err := net.ListenPacket("udp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer backend.Close()
	bport := uint16(backend.LocalAddr().(*net.UDPAddr).Port)
	sv := &serviceView{snat: netip.MustParseAddr("127.0.0.5")}
	client := netip.MustParseAddrPort("198.51.100.7:4500")
	vip := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), bport)
	f := natForwarder{ops: kernelSockets{}}

	first, err := f.upstream(sv, client, vip, netip.MustParseAddr("127.0.0.2"))
	if err != nil {
		t.Fatal(err)
	}
	got := first.LocalAddr()
	first.Close()
	want := snatPorts(client, bport)
	if got.Addr() != sv.snat || got.Port() != want[0] {
		t.Fatalf("upstream from %v, want %v:%d", got, sv.snat, want[0])
	}
	again, err := f.upstream(sv, client, vip, netip.MustParseAddr("127.0.0.2"))
	if err != nil {
		t.Fatal(err)
	}
	if again.LocalAddr() != got {
		t.Fatalf("second node sources the flow from %v, first from %v", again.LocalAddr(), got)
	}
	// The first choice is now taken (again holds it): the next one is used.
	third, err := f.upstream(sv, client, vip, netip.MustParseAddr("127.0.0.2"))
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	again.Close()
	if third.LocalAddr().Port() != want[1] {
		t.Fatalf("with the first port taken: %v, want port %d", third.LocalAddr(), want[1])
	}
}
