package ikesim

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
)

// ResponderConfig configures a Responder. The Responder takes ownership of
// the sockets and closes them on Close.
type ResponderConfig struct {
	Name string
	// IKE sockets play UDP 500: plain IKE messages.
	IKE []*net.UDPConn
	// NATT sockets play UDP 4500: IKE behind the non-ESP marker, ESP-in-UDP,
	// 0xFF keepalives.
	NATT []*net.UDPConn
	// EchoKeepalives echoes 0xFF keepalives (real servers ignore them).
	EchoKeepalives bool
	Logger         *slog.Logger
}

// Flow is one (client address, responder socket) pair a Responder saw.
type Flow struct {
	Client netip.AddrPort
	Local  netip.AddrPort
	NATT   bool // on a NAT-T (4500-role) socket
}

// Seen is what a Responder recorded: the distinct flows per IKE initiator
// SPI (IKE messages only) and per client IP (everything).
type Seen struct {
	BySPI map[SPI][]Flow
	ByIP  map[netip.Addr][]Flow
}

// Counts are a Responder's packet counters.
type Counts struct {
	SAInit        uint64 // IKE_SA_INIT requests answered
	Auth          uint64 // IKE_AUTH requests answered (whole or reassembled)
	AuthFragments uint64 // IKE_AUTH fragments received
	UnknownSA     uint64 // IKE_AUTH or INFORMATIONAL for an SA this responder did not create
	DPD           uint64 // INFORMATIONAL liveness checks answered for a known SA
	ESP           uint64 // ESP-in-UDP datagrams echoed
	Keepalives    uint64 // 0xFF keepalives received
	Malformed     uint64 // datagrams dropped as malformed or unexpected
}

// Responder is a stand-in IKEv2 server. See the package doc.
type Responder struct {
	// Set once.
	name   string
	cfg    ResponderConfig
	logger *slog.Logger
	wg     sync.WaitGroup

	sainit, auth, authFrags, unknownSA, dpd, esp, keepalives, malformed atomic.Uint64

	mu    sync.Mutex // guards the following
	sas   map[SPI]SPI
	frags map[fragKey]*fragState
	bySPI map[SPI]map[Flow]struct{}
	byIP  map[netip.Addr]map[Flow]struct{}
}

type fragKey struct {
	spi   SPI
	msgID uint32
}

type fragState struct {
	total uint16
	got   map[uint16]bool
	done  bool
}

// NewResponder starts serving on cfg's sockets.
func NewResponder(cfg ResponderConfig) *Responder {
	r := &Responder{
		name:   cfg.Name,
		cfg:    cfg,
		logger: cfg.Logger,
		sas:    make(map[SPI]SPI),
		frags:  make(map[fragKey]*fragState),
		bySPI:  make(map[SPI]map[Flow]struct{}),
		byIP:   make(map[netip.Addr]map[Flow]struct{}),
	}
	if r.logger == nil {
		r.logger = slog.New(slog.DiscardHandler)
	}
	for _, c := range cfg.IKE {
		r.wg.Go(func() { r.serve(c, false) })
	}
	for _, c := range cfg.NATT {
		r.wg.Go(func() { r.serve(c, true) })
	}
	return r
}

// Listen opens one IKE and one NAT-T socket ("127.0.0.1:0" style addresses)
// and starts a Responder on them.
func Listen(name, ikeAddr, nattAddr string) (*Responder, error) {
	ike, err := listenUDP(ikeAddr)
	if err != nil {
		return nil, err
	}
	natt, err := listenUDP(nattAddr)
	if err != nil {
		ike.Close()
		return nil, err
	}
	return NewResponder(ResponderConfig{Name: name, IKE: []*net.UDPConn{ike}, NATT: []*net.UDPConn{natt}}), nil
}

func listenUDP(addr string) (*net.UDPConn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("listen %q: %w", addr, err)
	}
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return c, nil
}

// Name returns the responder's name.
func (r *Responder) Name() string { return r.name }

// IKEAddr and NATTAddr return the address of the first socket of each kind.
func (r *Responder) IKEAddr() netip.AddrPort  { return localAddr(r.cfg.IKE[0]) }
func (r *Responder) NATTAddr() netip.AddrPort { return localAddr(r.cfg.NATT[0]) }

func localAddr(c *net.UDPConn) netip.AddrPort {
	ap := c.LocalAddr().(*net.UDPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Counts returns the counters.
func (r *Responder) Counts() Counts {
	return Counts{
		SAInit: r.sainit.Load(), Auth: r.auth.Load(), AuthFragments: r.authFrags.Load(),
		UnknownSA: r.unknownSA.Load(), DPD: r.dpd.Load(), ESP: r.esp.Load(), Keepalives: r.keepalives.Load(),
		Malformed: r.malformed.Load(),
	}
}

// Seen returns a copy of the recorded flows.
func (r *Responder) Seen() Seen {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := Seen{BySPI: make(map[SPI][]Flow, len(r.bySPI)), ByIP: make(map[netip.Addr][]Flow, len(r.byIP))}
	for k, set := range r.bySPI {
		for f := range set {
			s.BySPI[k] = append(s.BySPI[k], f)
		}
	}
	for k, set := range r.byIP {
		for f := range set {
			s.ByIP[k] = append(s.ByIP[k], f)
		}
	}
	return s
}

// Close closes the sockets and waits for the serving goroutines.
func (r *Responder) Close() error {
	var errs []error
	for _, c := range append(append([]*net.UDPConn(nil), r.cfg.IKE...), r.cfg.NATT...) {
		errs = append(errs, c.Close())
	}
	r.wg.Wait()
	return errors.Join(errs...)
}

func (r *Responder) serve(c *net.UDPConn, natt bool) {
	local := localAddr(c)
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				r.logger.Warn("responder read failed", "responder", r.name, "local", local, "error", err)
			}
			return
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		flow := Flow{Client: from, Local: local, NATT: natt}
		if reply := r.handle(buf[:n], flow); reply != nil {
			c.WriteToUDPAddrPort(reply, from)
		}
	}
}

// handle returns the reply to one datagram, or nil.
func (r *Responder) handle(b []byte, flow Flow) []byte {
	if !flow.NATT {
		return r.handleIKE(b, flow, false)
	}
	switch {
	case len(b) == 1 && b[0] == 0xff:
		r.keepalives.Add(1)
		r.record(nil, flow)
		if r.cfg.EchoKeepalives {
			return []byte{0xff}
		}
		return nil
	case len(b) >= 4 && [4]byte(b[:4]) == nonESPMarker:
		return r.handleIKE(b[4:], flow, true)
	case len(b) >= 8: // ESP: SPI (non-zero, as the marker check shows) + sequence
		r.esp.Add(1)
		r.record(nil, flow)
		return append([]byte(nil), b...)
	}
	r.malformed.Add(1)
	return nil
}

func (r *Responder) handleIKE(b []byte, flow Flow, marker bool) []byte {
	m, err := Parse(b)
	if err != nil || m.IsResponse() || m.Flags&FlagInitiator == 0 {
		r.malformed.Add(1)
		return nil
	}
	r.record(&m.SPIi, flow)
	var resp *Message
	switch {
	case m.Exchange == ExchIKESAInit && m.MsgID == 0 && m.SPIr == (SPI{}):
		resp = r.saInit(&m)
	case m.Exchange == ExchIKEAuth && m.MsgID == 1:
		resp = r.authRequest(&m)
	case m.Exchange == ExchInformation && m.MsgID >= 2:
		resp = r.informational(&m)
	default:
		r.malformed.Add(1)
	}
	if resp == nil {
		return nil
	}
	out := resp.Marshal()
	if marker {
		out = withMarker(out)
	}
	return out
}

func (r *Responder) saInit(m *Message) *Message {
	r.mu.Lock()
	spir, ok := r.sas[m.SPIi]
	if !ok { // a retransmission gets the same SPIr
		rand.Read(spir[:])
		spir[0] |= 0x80 // never zero
		r.sas[m.SPIi] = spir
	}
	r.mu.Unlock()
	r.sainit.Add(1)

	keBody := make([]byte, 4+32)
	binary.BigEndian.PutUint16(keBody, 31) // Curve25519
	if ke, ok := m.Find(PayloadKE); ok && len(ke.Body) >= 4 {
		keBody = make([]byte, len(ke.Body)) // same group and size as offered
		copy(keBody, ke.Body[:2])
		rand.Read(keBody[4:])
	}
	nonce := make([]byte, 32)
	rand.Read(nonce)
	return &Message{
		SPIi: m.SPIi, SPIr: spir, Exchange: ExchIKESAInit, Flags: FlagResponse,
		Payloads: []Payload{
			{Type: PayloadSA, Body: chosenProposal(keBody)},
			{Type: PayloadKE, Body: keBody},
			{Type: PayloadNonce, Body: nonce},
			{Type: PayloadVendorID, Body: []byte(vendorPrefix + r.name)},
		},
	}
}

// chosenProposal is an SA body with one IKE proposal: AES-CBC-256,
// HMAC-SHA2-256 PRF and integrity, and the KE payload's group.
func chosenProposal(ke []byte) []byte {
	group := binary.BigEndian.Uint16(ke)
	t := func(last bool, typ uint8, id uint16, keyLen uint16) []byte {
		n := 8
		if keyLen != 0 {
			n = 12
		}
		b := make([]byte, n)
		if !last {
			b[0] = 3
		}
		binary.BigEndian.PutUint16(b[2:], uint16(n))
		b[4] = typ
		binary.BigEndian.PutUint16(b[6:], id)
		if keyLen != 0 {
			binary.BigEndian.PutUint16(b[8:], 0x8000|14)
			binary.BigEndian.PutUint16(b[10:], keyLen)
		}
		return b
	}
	p := []byte{0, 0, 0, 0, 1, 1, 0, 4}
	p = append(p, t(false, 1, 12, 256)...)
	p = append(p, t(false, 2, 5, 0)...)
	p = append(p, t(false, 3, 12, 0)...)
	p = append(p, t(true, 4, group, 0)...)
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	return p
}

func (r *Responder) authRequest(m *Message) *Message {
	r.mu.Lock()
	spir, known := r.sas[m.SPIi]
	known = known && spir == m.SPIr
	complete := true
	if frag, ok := m.Find(PayloadSKF); ok && known {
		r.authFrags.Add(1)
		num, total := binary.BigEndian.Uint16(frag.Body), binary.BigEndian.Uint16(frag.Body[2:])
		k := fragKey{m.SPIi, m.MsgID}
		st := r.frags[k]
		if st == nil {
			st = &fragState{total: total, got: make(map[uint16]bool)}
			r.frags[k] = st
		}
		switch {
		case st.total != total:
			complete = false // inconsistent: drop
		case st.done:
			complete = num == 1 // a retransmission: answer once per round
		default:
			st.got[num] = true
			complete = len(st.got) == int(total)
			st.done = complete
		}
	} else if !ok {
		if _, ok := m.Find(PayloadSK); !ok {
			r.mu.Unlock()
			r.malformed.Add(1)
			return nil
		}
	}
	r.mu.Unlock()

	vendor := Payload{Type: PayloadVendorID, Body: []byte(vendorPrefix + r.name)}
	if !known {
		r.unknownSA.Add(1)
		return &Message{
			SPIi: m.SPIi, SPIr: m.SPIr, Exchange: ExchIKEAuth, Flags: FlagResponse, MsgID: m.MsgID,
			Payloads: []Payload{{Type: PayloadNotify, Body: notifyBody(NotifyInvalidIKESPI)}, vendor},
		}
	}
	if !complete {
		return nil
	}
	r.auth.Add(1)
	sk := make([]byte, 16+64) // "IV" and "encrypted" IDr/AUTH/SA/TS
	rand.Read(sk)
	return &Message{
		SPIi: m.SPIi, SPIr: spir, Exchange: ExchIKEAuth, Flags: FlagResponse, MsgID: m.MsgID,
		Payloads: []Payload{vendor, {Type: PayloadSK, Next: PayloadIDr, Body: sk}},
	}
}

// informational answers a liveness check (DPD: an INFORMATIONAL request
// with an empty SK payload) for a known IKE SA with an empty response, and
// one for an SA it does not hold with INVALID_IKE_SPI — both carrying the
// responder's name, so a client can tell which server holds its SA.
func (r *Responder) informational(m *Message) *Message {
	r.mu.Lock()
	spir, known := r.sas[m.SPIi]
	r.mu.Unlock()
	vendor := Payload{Type: PayloadVendorID, Body: []byte(vendorPrefix + r.name)}
	resp := &Message{SPIi: m.SPIi, SPIr: m.SPIr, Exchange: ExchInformation, Flags: FlagResponse, MsgID: m.MsgID}
	if !known || spir != m.SPIr {
		r.unknownSA.Add(1)
		resp.Payloads = []Payload{{Type: PayloadNotify, Body: notifyBody(NotifyInvalidIKESPI)}, vendor}
		return resp
	}
	r.dpd.Add(1)
	resp.Payloads = []Payload{vendor, {Type: PayloadSK, Body: make([]byte, 16)}}
	return resp
}

func (r *Responder) record(spi *SPI, f Flow) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if spi != nil {
		set := r.bySPI[*spi]
		if set == nil {
			set = make(map[Flow]struct{})
			r.bySPI[*spi] = set
		}
		set[f] = struct{}{}
	}
	ip := f.Client.Addr()
	set := r.byIP[ip]
	if set == nil {
		set = make(map[Flow]struct{})
		r.byIP[ip] = set
	}
	set[f] = struct{}{}
}
