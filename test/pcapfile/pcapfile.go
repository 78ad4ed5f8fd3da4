// Package pcapfile reads the UDP datagrams out of a classic pcap file
// (little-endian, Ethernet, IPv4) — enough for the real strongSwan IKEv2
// capture in test/testdata, which parser tests and fuzz seeds use instead of
// hand-made bytes alone. It is test support; the daemon never imports it.
package pcapfile

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
)

// ErrFormat: the file is not a little-endian microsecond pcap.
var ErrFormat = errors.New("not a little-endian microsecond pcap")

// Datagram is one UDP datagram of the capture.
type Datagram struct {
	Src, Dst netip.AddrPort
	Payload  []byte
}

// Capture is the path of the real strongSwan capture
// (test/testdata/ikev2-strongswan-natt.pcap; its README is beside it).
func Capture() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "testdata", "ikev2-strongswan-natt.pcap")
}

// Read reads the file at path and returns its UDP datagrams in order.
func Read(path string) ([]Datagram, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return Parse(b)
}

// Parse returns the UDP-over-IPv4-over-Ethernet datagrams of a pcap image;
// other frames are skipped.
func Parse(b []byte) ([]Datagram, error) {
	if len(b) < 24 || binary.LittleEndian.Uint32(b) != 0xa1b2c3d4 {
		return nil, ErrFormat
	}
	var out []Datagram
	for off := 24; off+16 <= len(b); {
		incl := int(binary.LittleEndian.Uint32(b[off+8:]))
		if off+16+incl > len(b) {
			return out, fmt.Errorf("%w: record at %d runs past the end", ErrFormat, off)
		}
		pkt := b[off+16 : off+16+incl]
		off += 16 + incl
		if len(pkt) < 14+20+8 || binary.BigEndian.Uint16(pkt[12:]) != 0x0800 {
			continue
		}
		ip := pkt[14:]
		ihl := int(ip[0]&0x0f) * 4
		if ip[9] != 17 || ihl < 20 || len(ip) < ihl+8 {
			continue
		}
		udp := ip[ihl:]
		ulen := int(binary.BigEndian.Uint16(udp[4:]))
		if ulen < 8 || ulen > len(udp) {
			continue
		}
		src := netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[12:16])), binary.BigEndian.Uint16(udp))
		dst := netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[16:20])), binary.BigEndian.Uint16(udp[2:]))
		out = append(out, Datagram{Src: src, Dst: dst, Payload: udp[8:ulen]})
	}
	return out, nil
}
