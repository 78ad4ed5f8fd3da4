package dataplane

import (
	"encoding/binary"
	"fmt"
)

// IKE and NAT-T framing (RFC 7296 §3.1, RFC 3948 §2). Everything here is a
// pure function over bytes: no allocation, no panics on any input. The
// packet path forwards every datagram whatever it holds; classification only
// feeds counters.

// Well-known IKE ports.
const (
	PortIKE  uint16 = 500
	PortNATT uint16 = 4500
)

// IKEHeaderLen is the length of the fixed IKE header.
const IKEHeaderLen = 28

// IKE exchange types (RFC 7296 §3.1).
const (
	ExchangeIKESAInit     uint8 = 34
	ExchangeIKEAuth       uint8 = 35
	ExchangeCreateChildSA uint8 = 36
	ExchangeInformational uint8 = 37
)

// IKE header flags (RFC 7296 §3.1).
const (
	FlagInitiator uint8 = 0x08
	FlagVersion   uint8 = 0x10
	FlagResponse  uint8 = 0x20
)

// IKEHeader is the fixed 28-byte IKE header.
type IKEHeader struct {
	SPIi        uint64
	SPIr        uint64
	NextPayload uint8
	Version     uint8 // major in the high nibble: 0x20 for IKEv2, 0x10 for ISAKMP
	Exchange    uint8
	Flags       uint8
	MessageID   uint32
	Length      uint32 // of the whole IKE message, header included
}

// Major returns the major protocol version.
func (h IKEHeader) Major() uint8 { return h.Version >> 4 }

// Class is what a datagram on an IKE port carries.
type Class uint8

const (
	ClassMalformed Class = iota // none of the below
	ClassIKE                    // IKEv2 message
	ClassISAKMP                 // IKEv1 message (same cookies, major version 1)
	ClassKeepalive              // NAT-T keepalive: the single byte 0xFF
	ClassESP                    // ESP in UDP: a non-zero SPI first
	numClasses
)

func (c Class) String() string {
	switch c {
	case ClassIKE:
		return "ike"
	case ClassISAKMP:
		return "isakmp"
	case ClassKeepalive:
		return "keepalive"
	case ClassESP:
		return "esp"
	}
	return "malformed"
}

// espMinLen is an ESP header's SPI and sequence number.
const espMinLen = 8

// nonESPMarkerLen is the four zero bytes before IKE on the NAT-T port.
const nonESPMarkerLen = 4

// ParseIKEHeader parses the IKE header at the start of msg, a datagram
// payload on port 500 (or the part after the non-ESP marker on 4500). It
// checks the length and the major version; the length field must equal
// len(msg).
func ParseIKEHeader(msg []byte) (IKEHeader, error) {
	if len(msg) < IKEHeaderLen {
		return IKEHeader{}, fmt.Errorf("%w: %d bytes", ErrShortIKE, len(msg))
	}
	h := decodeIKEHeader(msg)
	if m := h.Major(); m != 1 && m != 2 {
		return h, fmt.Errorf("%w: %#x", ErrIKEVersion, h.Version)
	}
	if h.Length != uint32(len(msg)) {
		return h, fmt.Errorf("%w: header says %d, datagram has %d", ErrIKELength, h.Length, len(msg))
	}
	return h, nil
}

// ParseNATT parses a datagram received on the NAT-T port (4500): IKE behind
// the non-ESP marker yields its header; a keepalive or ESP yields ErrNotIKE
// with the class set; anything else is ClassMalformed with an error.
func ParseNATT(d []byte) (IKEHeader, Class, error) {
	switch nattFraming(d) {
	case ClassKeepalive:
		return IKEHeader{}, ClassKeepalive, ErrNotIKE
	case ClassESP:
		return IKEHeader{}, ClassESP, ErrNotIKE
	case ClassIKE:
		h, err := ParseIKEHeader(d[nonESPMarkerLen:])
		if err != nil {
			return h, ClassMalformed, err
		}
		return h, classOfHeader(h), nil
	}
	return IKEHeader{}, ClassMalformed, fmt.Errorf("%w: %d-byte datagram", ErrShortIKE, len(d))
}

// Classify says what a datagram received on port carries. Port 500 carries
// bare IKE; every other port is treated as NAT-T framed (RFC 3948), which is
// what 4500 and any custom NAT-T port carry.
func Classify(port uint16, d []byte) Class {
	if port == PortIKE {
		return classifyIKE(d)
	}
	switch c := nattFraming(d); c {
	case ClassIKE:
		return classifyIKE(d[nonESPMarkerLen:])
	default:
		return c
	}
}

// nattFraming tells the RFC 3948 framing apart: ClassIKE for the non-ESP
// marker (the IKE message itself is not checked), ClassKeepalive, ClassESP or
// ClassMalformed.
func nattFraming(d []byte) Class {
	switch {
	case len(d) == 1 && d[0] == 0xFF:
		return ClassKeepalive
	case len(d) < nonESPMarkerLen:
		return ClassMalformed
	case d[0]|d[1]|d[2]|d[3] == 0:
		return ClassIKE
	case len(d) >= espMinLen:
		return ClassESP
	}
	return ClassMalformed
}

func classifyIKE(msg []byte) Class {
	h, err := ParseIKEHeader(msg)
	if err != nil {
		return ClassMalformed
	}
	return classOfHeader(h)
}

func classOfHeader(h IKEHeader) Class {
	if h.Major() == 1 {
		return ClassISAKMP
	}
	return ClassIKE
}

func decodeIKEHeader(b []byte) IKEHeader {
	_ = b[IKEHeaderLen-1]
	return IKEHeader{
		SPIi:        binary.BigEndian.Uint64(b[0:8]),
		SPIr:        binary.BigEndian.Uint64(b[8:16]),
		NextPayload: b[16],
		Version:     b[17],
		Exchange:    b[18],
		Flags:       b[19],
		MessageID:   binary.BigEndian.Uint32(b[20:24]),
		Length:      binary.BigEndian.Uint32(b[24:28]),
	}
}

// AppendIKEHeader appends h in wire format to dst. With h.Length zero it
// writes IKEHeaderLen, so the result alone is a minimal valid IKE message.
func AppendIKEHeader(dst []byte, h IKEHeader) []byte {
	if h.Length == 0 {
		h.Length = IKEHeaderLen
	}
	dst = binary.BigEndian.AppendUint64(dst, h.SPIi)
	dst = binary.BigEndian.AppendUint64(dst, h.SPIr)
	dst = append(dst, h.NextPayload, h.Version, h.Exchange, h.Flags)
	dst = binary.BigEndian.AppendUint32(dst, h.MessageID)
	return binary.BigEndian.AppendUint32(dst, h.Length)
}

// MinimalIKESAInit returns a 28-byte IKEv2 IKE_SA_INIT request header with
// the given initiator SPI and no payloads: valid framing, handy in tests. With
// natt it is prefixed by the non-ESP marker for port 4500.
func MinimalIKESAInit(spi uint64, natt bool) []byte {
	var dst []byte
	if natt {
		dst = make([]byte, nonESPMarkerLen, nonESPMarkerLen+IKEHeaderLen)
	}
	return AppendIKEHeader(dst, IKEHeader{
		SPIi:     spi,
		Version:  0x20,
		Exchange: ExchangeIKESAInit,
		Flags:    FlagInitiator,
	})
}
