package ikesim

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// IKEv2 constants (RFC 7296, RFC 7383, RFC 3948).
const (
	HeaderLen = 28
	Version   = 0x20

	ExchIKESAInit   = 34
	ExchIKEAuth     = 35
	ExchInformation = 37

	FlagInitiator = 0x08
	FlagResponse  = 0x20

	PayloadNone     = 0
	PayloadSA       = 33
	PayloadKE       = 34
	PayloadIDi      = 35
	PayloadIDr      = 36
	PayloadNonce    = 40
	PayloadNotify   = 41
	PayloadVendorID = 43
	PayloadSK       = 46
	PayloadSKF      = 53

	NotifyInvalidIKESPI = 4
	NotifyInvalidSyntax = 7
)

// Errors.
var (
	// ErrMalformed means a datagram is not a well-formed IKEv2 message.
	ErrMalformed = errors.New("malformed ike message")
	// ErrTimeout means no valid answer arrived within the retries.
	ErrTimeout = errors.New("no answer")
	// ErrUnknownSA means the responder on the NAT-T port did not know the
	// client's IKE SA: the client was split across responders.
	ErrUnknownSA = errors.New("responder does not know the ike sa")
	// ErrUnexpected means a well-formed answer that is not the one expected.
	ErrUnexpected = errors.New("unexpected answer")
)

// SPI is an IKE SPI.
type SPI [8]byte

// nonESPMarker precedes IKE messages on the NAT-T port.
var nonESPMarker = [4]byte{}

// Payload is one IKE payload. For SK and SKF, which are always last, Next
// is the type of the first payload inside the encrypted data; for the others
// it is ignored and Marshal chains them.
type Payload struct {
	Type uint8
	Next uint8
	Body []byte
}

// Message is an IKE message. Marshal computes NextPayload and Length.
type Message struct {
	SPIi, SPIr SPI
	Exchange   uint8
	Flags      uint8
	MsgID      uint32
	Payloads   []Payload
}

// Marshal encodes m.
func (m *Message) Marshal() []byte {
	n := HeaderLen
	for _, p := range m.Payloads {
		n += 4 + len(p.Body)
	}
	b := make([]byte, HeaderLen, n)
	copy(b[0:], m.SPIi[:])
	copy(b[8:], m.SPIr[:])
	if len(m.Payloads) > 0 {
		b[16] = m.Payloads[0].Type
	}
	b[17] = Version
	b[18] = m.Exchange
	b[19] = m.Flags
	binary.BigEndian.PutUint32(b[20:], m.MsgID)
	binary.BigEndian.PutUint32(b[24:], uint32(n))
	for i, p := range m.Payloads {
		next := uint8(PayloadNone)
		switch {
		case p.Type == PayloadSK || p.Type == PayloadSKF:
			next = p.Next
		case i+1 < len(m.Payloads):
			next = m.Payloads[i+1].Type
		}
		b = append(b, next, 0, 0, 0)
		binary.BigEndian.PutUint16(b[len(b)-2:], uint16(4+len(p.Body)))
		b = append(b, p.Body...)
	}
	return b
}

// Parse decodes one IKE message (without the non-ESP marker), strictly:
// IKEv2 version, header length equal to len(b), every payload inside the
// datagram, the chain ending exactly at the end, SK/SKF only last, and an
// SKF body with 1 <= fragment number <= total. Payload bodies alias b.
func Parse(b []byte) (Message, error) {
	var m Message
	if len(b) < HeaderLen {
		return m, fmt.Errorf("%w: %d bytes, shorter than the header", ErrMalformed, len(b))
	}
	copy(m.SPIi[:], b[0:8])
	copy(m.SPIr[:], b[8:16])
	if b[17]>>4 != 2 {
		return m, fmt.Errorf("%w: version %#x", ErrMalformed, b[17])
	}
	m.Exchange, m.Flags = b[18], b[19]
	m.MsgID = binary.BigEndian.Uint32(b[20:])
	if l := binary.BigEndian.Uint32(b[24:]); l != uint32(len(b)) {
		return m, fmt.Errorf("%w: header length %d, datagram %d bytes", ErrMalformed, l, len(b))
	}
	if m.SPIi == (SPI{}) {
		return m, fmt.Errorf("%w: zero initiator spi", ErrMalformed)
	}
	next, off := b[16], HeaderLen
	for next != PayloadNone {
		if off+4 > len(b) {
			return m, fmt.Errorf("%w: payload %d header past the end", ErrMalformed, next)
		}
		l := int(binary.BigEndian.Uint16(b[off+2:]))
		if l < 4 || off+l > len(b) {
			return m, fmt.Errorf("%w: payload %d length %d at offset %d of %d", ErrMalformed, next, l, off, len(b))
		}
		p := Payload{Type: next, Body: b[off+4 : off+l]}
		inner := b[off]
		off += l
		if next == PayloadSK || next == PayloadSKF {
			if off != len(b) {
				return m, fmt.Errorf("%w: payload %d not last", ErrMalformed, next)
			}
			if next == PayloadSKF {
				if len(p.Body) < 4 {
					return m, fmt.Errorf("%w: short fragment payload", ErrMalformed)
				}
				num, total := binary.BigEndian.Uint16(p.Body), binary.BigEndian.Uint16(p.Body[2:])
				if num == 0 || num > total {
					return m, fmt.Errorf("%w: fragment %d of %d", ErrMalformed, num, total)
				}
			}
			p.Next = inner
			m.Payloads = append(m.Payloads, p)
			break
		}
		m.Payloads = append(m.Payloads, p)
		next = inner
	}
	if off != len(b) {
		return m, fmt.Errorf("%w: %d bytes after the last payload", ErrMalformed, len(b)-off)
	}
	return m, nil
}

// Find returns the first payload of type t.
func (m *Message) Find(t uint8) (Payload, bool) {
	for _, p := range m.Payloads {
		if p.Type == t {
			return p, true
		}
	}
	return Payload{}, false
}

// IsResponse reports whether m is a response from the original responder.
func (m *Message) IsResponse() bool {
	return m.Flags&FlagResponse != 0 && m.Flags&FlagInitiator == 0
}

// vendorPrefix starts the Vendor ID payload naming a responder.
const vendorPrefix = "ikesim-responder:"

// ResponderName returns the responder name carried in m's Vendor ID.
func (m *Message) ResponderName() (string, bool) {
	for _, p := range m.Payloads {
		if p.Type == PayloadVendorID && len(p.Body) > len(vendorPrefix) && string(p.Body[:len(vendorPrefix)]) == vendorPrefix {
			return string(p.Body[len(vendorPrefix):]), true
		}
	}
	return "", false
}

// NotifyType returns the notify message type of m's first Notify payload.
func (m *Message) NotifyType() (uint16, bool) {
	p, ok := m.Find(PayloadNotify)
	if !ok || len(p.Body) < 4 {
		return 0, false
	}
	return binary.BigEndian.Uint16(p.Body[2:]), true
}

func notifyBody(typ uint16) []byte {
	b := make([]byte, 4)
	binary.BigEndian.PutUint16(b[2:], typ) // protocol 0, SPI size 0
	return b
}

// fragmentBody builds an SKF payload body.
func fragmentBody(num, total uint16, data []byte) []byte {
	b := make([]byte, 4, 4+len(data))
	binary.BigEndian.PutUint16(b, num)
	binary.BigEndian.PutUint16(b[2:], total)
	return append(b, data...)
}

// withMarker prefixes an IKE message with the non-ESP marker.
func withMarker(msg []byte) []byte {
	return append(nonESPMarker[:], msg...)
}
