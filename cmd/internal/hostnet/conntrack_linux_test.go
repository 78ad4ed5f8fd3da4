package hostnet

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	mnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/ikelb/ikelb/dataplane"
	"github.com/ikelb/ikelb/test/netns"
)

// ctMessage encodes an entry as ctnetlink sends it (after the nfgenmsg).
func ctMessage(t *testing.T, src, dst, replySrc, replyDst netip.AddrPort, pkts, rpkts uint64) []byte {
	t.Helper()
	tuple := func(ae *mnl.AttributeEncoder, s, d netip.AddrPort) {
		ae.Nested(unix.NLA_F_NESTED|nl.CTA_TUPLE_IP, func(ae *mnl.AttributeEncoder) error {
			ae.Bytes(nl.CTA_IP_V4_SRC, s.Addr().AsSlice())
			ae.Bytes(nl.CTA_IP_V4_DST, d.Addr().AsSlice())
			return nil
		})
		ae.Nested(unix.NLA_F_NESTED|nl.CTA_TUPLE_PROTO, func(ae *mnl.AttributeEncoder) error {
			ae.Uint8(nl.CTA_PROTO_NUM, unix.IPPROTO_UDP)
			ae.Bytes(nl.CTA_PROTO_SRC_PORT, binary.BigEndian.AppendUint16(nil, s.Port()))
			ae.Bytes(nl.CTA_PROTO_DST_PORT, binary.BigEndian.AppendUint16(nil, d.Port()))
			return nil
		})
	}
	counters := func(ae *mnl.AttributeEncoder, p uint64) {
		ae.Bytes(nl.CTA_COUNTERS_PACKETS, binary.BigEndian.AppendUint64(nil, p))
		ae.Bytes(nl.CTA_COUNTERS_BYTES, binary.BigEndian.AppendUint64(nil, p*100))
	}
	ae := mnl.NewAttributeEncoder()
	ae.Nested(unix.NLA_F_NESTED|nl.CTA_TUPLE_ORIG, func(ae *mnl.AttributeEncoder) error { tuple(ae, src, dst); return nil })
	ae.Nested(unix.NLA_F_NESTED|nl.CTA_TUPLE_REPLY, func(ae *mnl.AttributeEncoder) error { tuple(ae, replySrc, replyDst); return nil })
	ae.Bytes(nl.CTA_STATUS, binary.BigEndian.AppendUint32(nil, 0x1a8))
	ae.Bytes(nl.CTA_ID, binary.BigEndian.AppendUint32(nil, 0xc0ffee))
	ae.Nested(unix.NLA_F_NESTED|nl.CTA_COUNTERS_ORIG, func(ae *mnl.AttributeEncoder) error { counters(ae, pkts); return nil })
	ae.Nested(unix.NLA_F_NESTED|nl.CTA_COUNTERS_REPLY, func(ae *mnl.AttributeEncoder) error { counters(ae, rpkts); return nil })
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseCTEntry(t *testing.T) {
	ap := netip.MustParseAddrPort
	b := ctMessage(t, ap("198.51.100.7:4500"), ap("203.0.113.10:4500"), ap("10.0.0.11:4500"), ap("10.0.0.1:4500"), 7, 5)
	var e ctEntry
	if !parseCTEntry(b, &e) {
		t.Fatal("not parsed")
	}
	want := ctEntry{id: 0xc0ffee, proto: unix.IPPROTO_UDP, src: ap("198.51.100.7:4500"), dst: ap("203.0.113.10:4500"),
		replySrc: netip.MustParseAddr("10.0.0.11"), counts: ctCounts{7, 700, 5, 500}}
	if e != want {
		t.Fatalf("parsed %+v, want %+v", e, want)
	}
	if parseCTEntry(b[:len(b)-3], &e) {
		t.Fatalf("a truncated entry parsed: %+v", e)
	}
	if parseCTEntry(nil, &e) {
		t.Fatal("an empty entry parsed")
	}
}

// TestDeleteConntrack deletes real conntrack entries by reply tuple in a
// namespace of its own: 300 that exist and 300 that do not, over several
// batches. Gone entries are no error, and the call returns on the
// batches' closing acknowledgement, not on the read deadline.
func TestDeleteConntrack(t *testing.T) {
	netns.Require(t, "nft")
	lab := netns.New(t, "ct")
	ns := lab.AddNS("h")
	t.Setenv("IKELB_CONNTRACK_CHILD", "1")
	out, err := ns.Run(os.Args[0], "-test.run=^TestDeleteConntrackChild$", "-test.v", "-test.count=1")
	t.Logf("child in %s:\n%s", ns.Name(), out)
	if err != nil || !strings.Contains(out, "--- PASS: TestDeleteConntrackChild") {
		t.Fatalf("child failed: %v", err)
	}
}

func TestDeleteConntrackChild(t *testing.T) {
	if os.Getenv("IKELB_CONNTRACK_CHILD") != "1" {
		t.Skip("runs inside the namespace TestDeleteConntrack makes")
	}
	runIP(t, [][]string{{"link", "set", "lo", "up"}})
	// A rule that uses conntrack turns tracking on in this namespace.
	nft := exec.Command("nft", "-f", "-")
	nft.Stdin = strings.NewReader("table ip cttest {\n chain in {\n  type filter hook input priority 0; ct state new counter\n }\n}\n")
	if out, err := nft.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v %s", err, out)
	}
	srv, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 47001})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	local := netip.MustParseAddrPort("127.0.0.1:47001")
	var flows []ctFlow
	for range 300 {
		c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(local))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		// Kept open, so that no two clients share a port (and an entry).
		defer c.Close()
		flows = append(flows, ctFlow{client: c.LocalAddr().(*net.UDPAddr).AddrPort(), local: local})
	}
	tracked := func() int {
		b, err := os.ReadFile("/proc/net/nf_conntrack")
		if err != nil {
			t.Fatal(err)
		}
		return strings.Count(string(b), "dport=47001 ")
	}
	if n := tracked(); n != 300 {
		t.Fatalf("%d entries to %v before, want 300", n, local)
	}
	for p := range 300 { // no such entries: ENOENT each
		flows = append(flows, ctFlow{client: netip.AddrPortFrom(local.Addr(), uint16(20000+p)), local: netip.MustParseAddrPort("127.0.0.1:47002")})
	}
	start := time.Now()
	if err := (&nftFast{}).handover(flows); err != nil {
		t.Fatalf("handover: %v", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("handover took %v: it waited for a deadline, not for the closing acknowledgement", took)
	}
	if n := tracked(); n != 0 {
		t.Errorf("%d entries to %v left after the handover, want 0", n, local)
	}

	// sweep: every listener entry of the service's VIP:ports whose client
	// the kernel forwards, and nothing else.
	other := netip.MustParseAddrPort("127.0.0.1:47003")
	osrv, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(other))
	if err != nil {
		t.Fatal(err)
	}
	defer osrv.Close()
	for _, dst := range []netip.AddrPort{local, other} {
		for range 100 {
			c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(dst))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
		}
	}
	count := func(port string) int {
		b, err := os.ReadFile("/proc/net/nf_conntrack")
		if err != nil {
			t.Fatal(err)
		}
		return strings.Count(string(b), "dport="+port+" ")
	}
	svcs := map[uint32]*fastService{3: {id: 3, vip: local.Addr(), ports: []uint16{local.Port()}}}
	k := &nftFast{}
	if n, err := k.sweep(svcs, func(dataplane.ClientKey) bool { return false }); n != 0 || err != nil || count("47001") != 100 {
		t.Fatalf("sweep of clients the kernel does not forward: %d, %v; %d entries left, want 100", n, err, count("47001"))
	}
	var asked []dataplane.ClientKey
	n, err := k.sweep(svcs, func(ck dataplane.ClientKey) bool { asked = append(asked, ck); return true })
	if n != 100 || err != nil {
		t.Fatalf("sweep = %d, %v; want 100 entries deleted", n, err)
	}
	if left, kept := count("47001"), count("47003"); left != 0 || kept != 100 {
		t.Errorf("after the sweep: %d entries to the service (want 0), %d to another port (want 100)", left, kept)
	}
	if asked[0] != (dataplane.ClientKey{Service: 3, Client: dataplane.AddrFrom(local.Addr())}) {
		t.Errorf("sweep asked about %+v, want service 3's client 127.0.0.1", asked[0])
	}
}
