package hostnet

import (
	"encoding/binary"
	"net/netip"
	"testing"

	mnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
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
