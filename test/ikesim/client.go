package ikesim

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

// Client is one simulated initiator. The zero value of each optional field
// takes the default given beside it.
type Client struct {
	// Local is the source IP of both sockets (e.g. 127.1.0.7); invalid
	// means the kernel's choice. Ignored for a socket given below.
	Local netip.Addr
	// IKEConn and NATTConn, if set, are used instead of opening sockets.
	// They stay the caller's; they must be different sockets.
	IKEConn, NATTConn *net.UDPConn

	VIP      netip.Addr
	IKEPort  uint16 // required (tests cannot use 500)
	NATTPort uint16 // required (tests cannot use 4500)

	Fragments  int // IKE_AUTH split into this many RFC 7383 fragments; 0 or 1: whole
	AuthSize   int // bytes of "encrypted" IKE_AUTH data; default 512, or 2000 when fragmented
	ESP        int // ESP-in-UDP round trips after IKE_AUTH
	Keepalives int // 0xFF keepalives sent after the ESP round trips

	Timeout time.Duration // per attempt; default 500ms
	Retries int           // attempts per exchange; default 3
}

// Result is where one client landed.
type Result struct {
	SPI           SPI
	SPIr          SPI            // the responder's SPI from IKE_SA_INIT
	IKESource     netip.AddrPort // the client's address on the IKE exchange
	NATTSource    netip.AddrPort // ... and on the NAT-T port (a new port)
	IKEResponder  string         // who answered IKE_SA_INIT
	NATTResponder string         // who answered IKE_AUTH
	Split         bool           // both answered and they differ
	ESPEchoed     int            // ESP round trips completed
	Err           error
}

func (c *Client) defaults() {
	if c.Timeout == 0 {
		c.Timeout = 500 * time.Millisecond
	}
	if c.Retries == 0 {
		c.Retries = 3
	}
	if c.AuthSize == 0 {
		c.AuthSize = 512
		if c.Fragments > 1 {
			c.AuthSize = 2000
		}
	}
}

// Run performs the exchanges. It returns when done, on the first error, or
// when ctx is done; Result.Err says which.
func (c Client) Run(ctx context.Context) (res Result) {
	c.defaults()
	if !c.VIP.IsValid() || c.IKEPort == 0 || c.NATTPort == 0 {
		res.Err = errors.New("client needs VIP, IKEPort and NATTPort")
		return res
	}
	rand.Read(res.SPI[:])
	res.SPI[0] |= 0x80

	ike, closeIKE, err := c.socket(c.IKEConn)
	if err != nil {
		res.Err = err
		return res
	}
	defer closeIKE()
	res.IKESource = localAddr(ike)
	dst500 := netip.AddrPortFrom(c.VIP, c.IKEPort)

	// IKE_SA_INIT.
	req := saInitRequest(res.SPI)
	var spir SPI
	err = c.exchange(ctx, ike, dst500, [][]byte{req}, func(b []byte) error {
		m, err := Parse(b)
		if err != nil {
			return err
		}
		if err := checkResponse(&m, res.SPI, ExchIKESAInit, 0); err != nil {
			return err
		}
		if m.SPIr == (SPI{}) {
			return fmt.Errorf("%w: zero responder spi", ErrUnexpected)
		}
		name, ok := m.ResponderName()
		if !ok {
			return fmt.Errorf("%w: no responder vendor id", ErrUnexpected)
		}
		spir, res.IKEResponder = m.SPIr, name
		res.SPIr = spir
		return nil
	})
	if err != nil {
		res.Err = fmt.Errorf("ike_sa_init to %v: %w", dst500, err)
		return res
	}

	// IKE_AUTH from a new source port, behind the non-ESP marker.
	natt, closeNATT, err := c.socket(c.NATTConn)
	if err != nil {
		res.Err = err
		return res
	}
	defer closeNATT()
	res.NATTSource = localAddr(natt)
	dst4500 := netip.AddrPortFrom(c.VIP, c.NATTPort)
	err = c.exchange(ctx, natt, dst4500, c.authRequests(res.SPI, spir), func(b []byte) error {
		if len(b) < 4 || [4]byte(b[:4]) != nonESPMarker {
			return fmt.Errorf("%w: no non-esp marker", ErrUnexpected)
		}
		m, err := Parse(b[4:])
		if err != nil {
			return err
		}
		if err := checkResponse(&m, res.SPI, ExchIKEAuth, 1); err != nil {
			return err
		}
		name, ok := m.ResponderName()
		if !ok {
			return fmt.Errorf("%w: no responder vendor id", ErrUnexpected)
		}
		res.NATTResponder = name
		res.Split = name != res.IKEResponder
		if t, ok := m.NotifyType(); ok && t == NotifyInvalidIKESPI {
			return ErrUnknownSA
		}
		if m.SPIr != spir {
			return fmt.Errorf("%w: responder spi changed", ErrUnexpected)
		}
		if _, ok := m.Find(PayloadSK); !ok {
			return fmt.Errorf("%w: no encrypted payload", ErrUnexpected)
		}
		return nil
	})
	if err != nil {
		res.Err = fmt.Errorf("ike_auth to %v: %w", dst4500, err)
		return res
	}

	// ESP round trips: SPI (non-zero) + sequence number + padding.
	espSPI := binary.BigEndian.Uint32(res.SPI[:4]) | 1
	for seq := 1; seq <= c.ESP; seq++ {
		pkt := make([]byte, 64)
		binary.BigEndian.PutUint32(pkt, espSPI)
		binary.BigEndian.PutUint32(pkt[4:], uint32(seq))
		err := c.exchange(ctx, natt, dst4500, [][]byte{pkt}, func(b []byte) error {
			if string(b) != string(pkt) {
				return fmt.Errorf("%w: esp echo differs", ErrUnexpected)
			}
			return nil
		})
		if err != nil {
			res.Err = fmt.Errorf("esp %d to %v: %w", seq, dst4500, err)
			return res
		}
		res.ESPEchoed++
	}
	for range c.Keepalives {
		if _, err := natt.WriteToUDPAddrPort([]byte{0xff}, dst4500); err != nil {
			res.Err = fmt.Errorf("keepalive to %v: %w", dst4500, err)
			return res
		}
	}
	return res
}

func (c *Client) socket(given *net.UDPConn) (*net.UDPConn, func(), error) {
	if given != nil {
		return given, func() {}, nil
	}
	var laddr *net.UDPAddr
	if c.Local.IsValid() {
		laddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(c.Local, 0))
	}
	conn, err := net.ListenUDP("udp", laddr)
	if err != nil {
		return nil, nil, fmt.Errorf("client socket on %v: %w", c.Local, err)
	}
	return conn, func() { conn.Close() }, nil
}

// exchange sends reqs to dst and waits for a datagram from dst that check
// accepts, resending after each Timeout, at most Retries times. Datagrams
// from elsewhere, and ones check rejects as malformed or unexpected, are
// skipped (a late answer to an earlier attempt, for instance) but the last
// such error is returned if nothing better arrives. ErrUnknownSA from check
// ends the exchange at once.
func (c *Client) exchange(ctx context.Context, conn *net.UDPConn, dst netip.AddrPort, reqs [][]byte, check func([]byte) error) error {
	buf := make([]byte, 65536)
	var last error = ErrTimeout
	for range c.Retries {
		for _, r := range reqs {
			if _, err := conn.WriteToUDPAddrPort(r, dst); err != nil {
				return err
			}
		}
		deadline := time.Now().Add(c.Timeout)
		if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
		conn.SetReadDeadline(deadline)
		for {
			if err := ctx.Err(); err != nil {
				return err
			}
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break
			}
			if err != nil {
				return err
			}
			if netip.AddrPortFrom(from.Addr().Unmap(), from.Port()) != dst {
				continue
			}
			err = check(buf[:n])
			if err == nil || errors.Is(err, ErrUnknownSA) {
				return err
			}
			last = err
		}
	}
	return last
}

func checkResponse(m *Message, spi SPI, exch uint8, msgID uint32) error {
	switch {
	case m.SPIi != spi:
		return fmt.Errorf("%w: initiator spi %x, want %x", ErrUnexpected, m.SPIi, spi)
	case !m.IsResponse():
		return fmt.Errorf("%w: flags %#x", ErrUnexpected, m.Flags)
	case m.Exchange != exch:
		return fmt.Errorf("%w: exchange %d, want %d", ErrUnexpected, m.Exchange, exch)
	case m.MsgID != msgID:
		return fmt.Errorf("%w: message id %d, want %d", ErrUnexpected, m.MsgID, msgID)
	}
	return nil
}

// saInitRequest is an IKE_SA_INIT request: SA, KE (Curve25519), Nonce.
func saInitRequest(spi SPI) []byte {
	ke := make([]byte, 4+32)
	binary.BigEndian.PutUint16(ke, 31)
	rand.Read(ke[4:])
	nonce := make([]byte, 32)
	rand.Read(nonce)
	m := Message{SPIi: spi, Exchange: ExchIKESAInit, Flags: FlagInitiator, Payloads: []Payload{
		{Type: PayloadSA, Body: chosenProposal(ke)},
		{Type: PayloadKE, Body: ke},
		{Type: PayloadNonce, Body: nonce},
	}}
	return m.Marshal()
}

// authRequests is the IKE_AUTH request, whole (one SK payload) or as
// c.Fragments SKF fragments, each behind the non-ESP marker.
func (c *Client) authRequests(spii, spir SPI) [][]byte {
	data := make([]byte, c.AuthSize)
	rand.Read(data)
	base := Message{SPIi: spii, SPIr: spir, Exchange: ExchIKEAuth, Flags: FlagInitiator, MsgID: 1}
	if c.Fragments <= 1 {
		base.Payloads = []Payload{{Type: PayloadSK, Next: PayloadIDi, Body: data}}
		return [][]byte{withMarker(base.Marshal())}
	}
	n := c.Fragments
	out := make([][]byte, 0, n)
	size := (len(data) + n - 1) / n
	for i := range n {
		chunk := data[min(i*size, len(data)):min((i+1)*size, len(data))]
		m := base
		next := uint8(PayloadNone)
		if i == 0 {
			next = PayloadIDi
		}
		m.Payloads = []Payload{{Type: PayloadSKF, Next: next, Body: fragmentBody(uint16(i+1), uint16(n), chunk)}}
		out = append(out, withMarker(m.Marshal()))
	}
	return out
}
