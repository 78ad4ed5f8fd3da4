package health

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"
)

// IKEv2 constants (RFC 7296).
const (
	ikeHeaderLen    = 28
	ikeVersion      = 0x20
	ikeExchSAInit   = 34
	ikeFlagInit     = 0x08
	ikeFlagResponse = 0x20

	payloadNone  = 0
	payloadSA    = 33
	payloadKE    = 34
	payloadNonce = 40

	dhMODP2048 = 14
)

// ProbeIKE sends one IKEv2 IKE_SA_INIT request with a fresh initiator SPI
// from an ephemeral local port to dst and waits for a response until ctx is
// done. Any well-formed IKEv2 IKE_SA_INIT response to our SPI counts as
// alive, including one carrying only an error notify (NO_PROPOSAL_CHOSEN,
// INVALID_KE_PAYLOAD): it proves the IKE daemon answers. A malformed or
// mismatched answer fails with an error wrapping ErrBadResponse.
//
// The request offers AES-CBC-256/128, HMAC-SHA2-256/SHA1 and MODP-2048,
// which strongSwan's and Windows' defaults accept; the responder keeps a
// half-open SA until its own timeout, as for any initiator that goes away.
func ProbeIKE(ctx context.Context, dst netip.AddrPort) error {
	var spi [8]byte
	rand.Read(spi[:])
	req := ikeSAInitRequest(spi)

	var d net.Dialer
	conn, err := d.DialContext(ctx, "udp", dst.String())
	if err != nil {
		return fmt.Errorf("ike probe %v: %w", dst, err)
	}
	defer conn.Close()
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(DefaultTimeout)
	}
	conn.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Now()) })
	defer stop()

	if _, err := conn.Write(req); err != nil {
		return fmt.Errorf("ike probe %v: %w", dst, err)
	}
	buf := make([]byte, 4096)
	n, err := conn.Read(buf)
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("ike probe %v: %w", dst, ErrTimeout)
		}
		return fmt.Errorf("ike probe %v: %w", dst, err) // e.g. connection refused
	}
	if err := checkSAInitResponse(buf[:n], spi); err != nil {
		return fmt.Errorf("ike probe %v: %w", dst, err)
	}
	return nil
}

// ikeSAInitRequest builds an IKE_SA_INIT request: header, SA (one IKE
// proposal), KE (MODP-2048, random value) and Nonce (32 random bytes).
func ikeSAInitRequest(spi [8]byte) []byte {
	transform := func(last bool, typ uint8, id uint16, keyLen uint16) []byte {
		n := 8
		if keyLen != 0 {
			n += 4
		}
		t := make([]byte, n)
		if !last {
			t[0] = 3
		}
		binary.BigEndian.PutUint16(t[2:], uint16(n))
		t[4] = typ
		binary.BigEndian.PutUint16(t[6:], id)
		if keyLen != 0 {
			binary.BigEndian.PutUint16(t[8:], 0x8000|14) // TV attribute: Key Length
			binary.BigEndian.PutUint16(t[10:], keyLen)
		}
		return t
	}
	transforms := [][]byte{
		transform(false, 1, 12, 256), // ENCR_AES_CBC-256
		transform(false, 1, 12, 128), // ENCR_AES_CBC-128
		transform(false, 2, 5, 0),    // PRF_HMAC_SHA2_256
		transform(false, 2, 2, 0),    // PRF_HMAC_SHA1
		transform(false, 3, 12, 0),   // AUTH_HMAC_SHA2_256_128
		transform(false, 3, 2, 0),    // AUTH_HMAC_SHA1_96
		transform(true, 4, dhMODP2048, 0),
	}
	prop := []byte{0, 0, 0, 0, 1, 1, 0, byte(len(transforms))} // last, num 1, IKE, no SPI
	for _, t := range transforms {
		prop = append(prop, t...)
	}
	binary.BigEndian.PutUint16(prop[2:], uint16(len(prop)))

	ke := make([]byte, 4+256)
	binary.BigEndian.PutUint16(ke, dhMODP2048)
	rand.Read(ke[4:])
	ke[4] &= 0x7f // keep the value below the MODP-2048 prime
	nonce := make([]byte, 32)
	rand.Read(nonce)

	msg := make([]byte, ikeHeaderLen, 512)
	copy(msg, spi[:])
	msg[16] = payloadSA
	msg[17] = ikeVersion
	msg[18] = ikeExchSAInit
	msg[19] = ikeFlagInit
	payload := func(next uint8, body []byte) {
		msg = append(msg, next, 0, 0, 0)
		binary.BigEndian.PutUint16(msg[len(msg)-2:], uint16(4+len(body)))
		msg = append(msg, body...)
	}
	payload(payloadKE, prop)
	payload(payloadNonce, ke)
	payload(payloadNone, nonce)
	binary.BigEndian.PutUint32(msg[24:], uint32(len(msg)))
	return msg
}

// checkSAInitResponse checks that b is a well-formed IKEv2 IKE_SA_INIT
// response to the request with initiator SPI spi.
func checkSAInitResponse(b []byte, spi [8]byte) error {
	if len(b) < ikeHeaderLen {
		return fmt.Errorf("%w: %d bytes, shorter than an IKE header", ErrBadResponse, len(b))
	}
	if [8]byte(b[:8]) != spi {
		return fmt.Errorf("%w: initiator SPI %x, sent %x", ErrBadResponse, b[:8], spi)
	}
	if b[17]>>4 != 2 {
		return fmt.Errorf("%w: IKE version %#x, want major version 2", ErrBadResponse, b[17])
	}
	if b[18] != ikeExchSAInit {
		return fmt.Errorf("%w: exchange type %d, want 34 (IKE_SA_INIT)", ErrBadResponse, b[18])
	}
	if b[19]&ikeFlagResponse == 0 || b[19]&ikeFlagInit != 0 {
		return fmt.Errorf("%w: flags %#x, want response from the responder", ErrBadResponse, b[19])
	}
	if id := binary.BigEndian.Uint32(b[20:]); id != 0 {
		return fmt.Errorf("%w: message id %d, want 0", ErrBadResponse, id)
	}
	if l := binary.BigEndian.Uint32(b[24:]); l != uint32(len(b)) {
		return fmt.Errorf("%w: header length %d, datagram %d bytes", ErrBadResponse, l, len(b))
	}
	next, off := b[16], ikeHeaderLen
	if next == payloadNone {
		return fmt.Errorf("%w: no payloads", ErrBadResponse)
	}
	for next != payloadNone {
		if off+4 > len(b) {
			return fmt.Errorf("%w: payload %d header past the end at offset %d", ErrBadResponse, next, off)
		}
		l := int(binary.BigEndian.Uint16(b[off+2:]))
		if l < 4 || off+l > len(b) {
			return fmt.Errorf("%w: payload %d length %d at offset %d overruns %d bytes", ErrBadResponse, next, l, off, len(b))
		}
		next, off = b[off], off+l
	}
	if off != len(b) {
		return fmt.Errorf("%w: %d bytes after the last payload", ErrBadResponse, len(b)-off)
	}
	return nil
}
