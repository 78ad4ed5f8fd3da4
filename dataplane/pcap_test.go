package dataplane

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"testing"
)

// capturePath is real strongSwan IKEv2 NAT-T traffic (see its README.md).
const capturePath = "../test/testdata/ikev2-strongswan-natt.pcap"

// capturedDatagram is one UDP datagram from a pcap file.
type capturedDatagram struct {
	Src, Dst netip.AddrPort
	Payload  []byte
}

// readPcapUDP reads the UDP/IPv4 datagrams of an Ethernet pcap file. It is a
// tiny reader for test data: classic pcap (either byte order), link type 1.
func readPcapUDP(path string) ([]capturedDatagram, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return parsePcapUDP(data)
}

func parsePcapUDP(data []byte) ([]capturedDatagram, error) {
	const globalLen, recordLen, ethLen = 24, 16, 14
	if len(data) < globalLen {
		return nil, fmt.Errorf("pcap: short global header")
	}
	var bo binary.ByteOrder
	switch binary.LittleEndian.Uint32(data) {
	case 0xa1b2c3d4, 0xa1b23c4d:
		bo = binary.LittleEndian
	case 0xd4c3b2a1, 0x4d3cb2a1:
		bo = binary.BigEndian
	default:
		return nil, fmt.Errorf("pcap: bad magic %x", data[:4])
	}
	if lt := bo.Uint32(data[20:24]); lt != 1 {
		return nil, fmt.Errorf("pcap: link type %d, want ethernet", lt)
	}
	var out []capturedDatagram
	for off := globalLen; off < len(data); {
		if len(data)-off < recordLen {
			return nil, fmt.Errorf("pcap: short record header at %d", off)
		}
		incl := int(bo.Uint32(data[off+8:]))
		off += recordLen
		if incl > len(data)-off {
			return nil, fmt.Errorf("pcap: record past end at %d", off)
		}
		frame := data[off : off+incl]
		off += incl
		if len(frame) < ethLen+20 || binary.BigEndian.Uint16(frame[12:]) != 0x0800 {
			continue // not IPv4
		}
		ip := frame[ethLen:]
		ihl := int(ip[0]&0x0f) * 4
		if ip[0]>>4 != 4 || ihl < 20 || ip[9] != 17 || len(ip) < ihl+8 {
			continue // not UDP
		}
		udp := ip[ihl:]
		ulen := int(binary.BigEndian.Uint16(udp[4:]))
		if ulen < 8 || ulen > len(udp) {
			return nil, fmt.Errorf("pcap: bad udp length %d", ulen)
		}
		src := netip.AddrFrom4([4]byte(ip[12:16]))
		dst := netip.AddrFrom4([4]byte(ip[16:20]))
		out = append(out, capturedDatagram{
			Src:     netip.AddrPortFrom(src, binary.BigEndian.Uint16(udp[0:])),
			Dst:     netip.AddrPortFrom(dst, binary.BigEndian.Uint16(udp[2:])),
			Payload: udp[8:ulen],
		})
	}
	return out, nil
}

func loadCapture(tb testing.TB) []capturedDatagram {
	tb.Helper()
	ds, err := readPcapUDP(capturePath)
	if err != nil {
		tb.Fatalf("read capture: %v", err)
	}
	if len(ds) != 56 {
		tb.Fatalf("capture has %d udp datagrams, README says 56", len(ds))
	}
	return ds
}
