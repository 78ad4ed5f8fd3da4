package ikesim

import (
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/ikelb/ikelb/cluster/health"
	"github.com/ikelb/ikelb/test/pcapfile"
)

var loopback = netip.MustParseAddr("127.0.0.1")

func listen(t *testing.T, name string) *Responder {
	t.Helper()
	r, err := Listen(name, "127.0.0.1:0", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func TestParseStrict(t *testing.T) {
	good := (&Message{SPIi: SPI{1}, Exchange: ExchIKESAInit, Flags: FlagInitiator, Payloads: []Payload{
		{Type: PayloadNonce, Body: make([]byte, 16)},
		{Type: PayloadVendorID, Body: []byte("x")},
	}}).Marshal()
	m, err := Parse(good)
	if err != nil || len(m.Payloads) != 2 || m.Payloads[1].Type != PayloadVendorID || len(m.Payloads[0].Body) != 16 {
		t.Fatalf("parse of good message: %+v, %v", m, err)
	}
	frag := (&Message{SPIi: SPI{1}, SPIr: SPI{2}, Exchange: ExchIKEAuth, Flags: FlagInitiator, MsgID: 1,
		Payloads: []Payload{{Type: PayloadSKF, Next: PayloadIDi, Body: fragmentBody(2, 3, []byte("data"))}}}).Marshal()
	if m, err := Parse(frag); err != nil || m.Payloads[0].Next != PayloadIDi {
		t.Fatalf("parse of fragment: %+v, %v", m, err)
	}

	mutate := func(b []byte, f func([]byte) []byte) []byte { return f(append([]byte(nil), b...)) }
	tests := map[string][]byte{
		"short":            good[:27],
		"truncated":        good[:len(good)-1],
		"trailing byte":    mutate(good, func(b []byte) []byte { b = append(b, 0); binary.BigEndian.PutUint32(b[24:], uint32(len(b))); return b }),
		"length field":     mutate(good, func(b []byte) []byte { binary.BigEndian.PutUint32(b[24:], 1000); return b }),
		"ikev1":            mutate(good, func(b []byte) []byte { b[17] = 0x10; return b }),
		"zero spi":         mutate(good, func(b []byte) []byte { b[0] = 0; return b }),
		"payload overruns": mutate(good, func(b []byte) []byte { binary.BigEndian.PutUint16(b[30:], 200); return b }),
		"payload len < 4":  mutate(good, func(b []byte) []byte { binary.BigEndian.PutUint16(b[30:], 3); return b }),
		"fragment 0":       mutate(frag, func(b []byte) []byte { binary.BigEndian.PutUint16(b[32:], 0); return b }),
		"fragment > total": mutate(frag, func(b []byte) []byte { binary.BigEndian.PutUint16(b[32:], 4); return b }),
	}
	for name, b := range tests {
		if _, err := Parse(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: Parse = %v, want ErrMalformed", name, err)
		}
	}
}

// TestParseCapture parses every IKE message in the real strongSwan capture.
func TestParseCapture(t *testing.T) {
	capture, err := pcapfile.Read(pcapfile.Capture())
	if err != nil {
		t.Fatal(err)
	}
	var ike, frags, esp, keepalives int
	for _, p := range capture {
		b := p.Payload
		natt := p.Src.Port() == 4500 || p.Dst.Port() == 4500
		switch {
		case natt && len(b) == 1 && b[0] == 0xff:
			keepalives++
			continue
		case natt && len(b) >= 4 && [4]byte(b[:4]) != nonESPMarker:
			esp++
			continue
		case natt:
			b = b[4:]
		}
		m, err := Parse(b)
		if err != nil {
			t.Errorf("real message %d→%d rejected: %v", p.Src.Port(), p.Dst.Port(), err)
			continue
		}
		ike++
		if _, ok := m.Find(PayloadSKF); ok {
			frags++
		}
	}
	if ike == 0 || frags == 0 || esp == 0 || keepalives == 0 {
		t.Fatalf("capture: %d ike, %d fragments, %d esp, %d keepalives; want all > 0", ike, frags, esp, keepalives)
	}
}

func TestClientResponder(t *testing.T) {
	for _, frags := range []int{0, 3} {
		ike, err1 := listenUDP("127.0.0.1:0")
		natt, err2 := listenUDP("127.0.0.1:0")
		if err1 != nil || err2 != nil {
			t.Fatal(err1, err2)
		}
		r := NewResponder(ResponderConfig{Name: "backend-a", IKE: []*net.UDPConn{ike}, NATT: []*net.UDPConn{natt},
			EchoKeepalives: true, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
		c := Client{Local: netip.MustParseAddr("127.0.0.2"), VIP: loopback,
			IKEPort: r.IKEAddr().Port(), NATTPort: r.NATTAddr().Port(),
			Fragments: frags, ESP: 3, Keepalives: 2}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		res := c.Run(ctx)
		cancel()
		if res.Err != nil {
			t.Fatalf("fragments=%d: %v", frags, res.Err)
		}
		if res.IKEResponder != "backend-a" || res.NATTResponder != "backend-a" || res.Split || res.ESPEchoed != 3 {
			t.Errorf("fragments=%d: result %+v", frags, res)
		}
		if res.IKESource.Port() == res.NATTSource.Port() || res.IKESource.Addr() != c.Local {
			t.Errorf("sources %v and %v: want the same IP %v, different ports", res.IKESource, res.NATTSource, c.Local)
		}
		// Keepalives are not waited for: poll until both are counted.
		deadline := time.Now().Add(2 * time.Second)
		for r.Counts().Keepalives < 2 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		r.Close()
		want := Counts{SAInit: 1, Auth: 1, ESP: 3, Keepalives: 2}
		if frags > 1 {
			want.AuthFragments = uint64(frags)
		}
		if got := r.Counts(); got != want {
			t.Errorf("fragments=%d: counts %+v, want %+v", frags, got, want)
		}
		seen := r.Seen()
		wantFlows := map[Flow]bool{
			{Client: res.IKESource, Local: r.IKEAddr()}:               true,
			{Client: res.NATTSource, Local: r.NATTAddr(), NATT: true}: true,
		}
		if f := seen.BySPI[res.SPI]; len(f) != 2 || !wantFlows[f[0]] || !wantFlows[f[1]] {
			t.Errorf("flows for spi: %+v, want %v", f, wantFlows)
		}
		if f := seen.ByIP[c.Local]; len(f) != 2 {
			t.Errorf("flows for %v: %+v, want 2", c.Local, f)
		}
	}
}

// TestResponderWire sends hand-made requests and checks the raw responses.
func TestResponderWire(t *testing.T) {
	r := listen(t, "wire")
	conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(r.IKEAddr()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	spi := SPI{0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4}
	req := saInitRequest(spi)
	roundTrip := func(req []byte) []byte {
		t.Helper()
		if _, err := conn.Write(req); err != nil {
			t.Fatal(err)
		}
		conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 2048)
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("no response: %v", err)
		}
		return buf[:n]
	}
	b := roundTrip(req)
	if got := binary.BigEndian.Uint32(b[24:]); got != uint32(len(b)) {
		t.Fatalf("header length %d, datagram %d", got, len(b))
	}
	m, err := Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	if m.SPIi != spi || m.SPIr == (SPI{}) || m.Flags != FlagResponse || m.Exchange != ExchIKESAInit || m.MsgID != 0 {
		t.Errorf("response header %+v", m)
	}
	for _, pt := range []uint8{PayloadSA, PayloadKE, PayloadNonce, PayloadVendorID} {
		if _, ok := m.Find(pt); !ok {
			t.Errorf("response lacks payload %d", pt)
		}
	}
	if name, _ := m.ResponderName(); name != "wire" {
		t.Errorf("responder name %q", name)
	}
	// A retransmission gets the same responder SPI.
	if m2, err := Parse(roundTrip(req)); err != nil || m2.SPIr != m.SPIr {
		t.Errorf("retransmission: spir %x vs %x, %v", m2.SPIr, m.SPIr, err)
	}
	// Garbage and responses are dropped, and counted.
	conn.Write([]byte("garbage"))
	resp := append([]byte(nil), b...)
	conn.Write(resp)
	deadline := time.Now().Add(2 * time.Second)
	for r.Counts().Malformed < 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := r.Counts().Malformed; got != 2 {
		t.Errorf("malformed count %d, want 2", got)
	}
}

func TestSplitDetected(t *testing.T) {
	a, b := listen(t, "a"), listen(t, "b")
	// The IKE half reaches a, the NAT-T half b: what a per-port balancer does.
	res := Client{VIP: loopback, IKEPort: a.IKEAddr().Port(), NATTPort: b.NATTAddr().Port(), Fragments: 2}.Run(context.Background())
	if !errors.Is(res.Err, ErrUnknownSA) || !res.Split || res.IKEResponder != "a" || res.NATTResponder != "b" {
		t.Fatalf("split client: %+v", res)
	}
	if got := b.Counts().UnknownSA; got == 0 {
		t.Error("b did not count the unknown SA")
	}
}

func TestClientTimeout(t *testing.T) {
	silent, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	port := silent.LocalAddr().(*net.UDPAddr).AddrPort().Port()
	start := time.Now()
	res := Client{VIP: loopback, IKEPort: port, NATTPort: port, Timeout: 50 * time.Millisecond, Retries: 2}.Run(context.Background())
	if !errors.Is(res.Err, ErrTimeout) {
		t.Fatalf("silent server: %v, want ErrTimeout", res.Err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("two 50ms attempts took %v", d)
	}
}

func TestRunManyClients(t *testing.T) {
	r := listen(t, "only")
	const n = 1000
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	rep, err := Run(ctx, Options{Clients: n, Concurrency: 32, VIP: loopback,
		IKEPort: r.IKEAddr().Port(), NATTPort: r.NATTAddr().Port(), Fragments: 2, ESP: 1})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Failed != 0 || rep.Split != 0 || rep.ByResponder["only"] != n {
		for _, res := range rep.Results {
			if res.Err != nil {
				t.Logf("first failure: %v", res.Err)
				break
			}
		}
		t.Fatalf("report: %d failed, %d split, by responder %v", rep.Failed, rep.Split, rep.ByResponder)
	}
	t.Logf("%d clients in %v", n, rep.Elapsed)
	seen := r.Seen()
	if len(seen.ByIP) != n {
		t.Fatalf("responder saw %d client IPs, want %d", len(seen.ByIP), n)
	}
	for _, res := range rep.Results {
		flows := seen.ByIP[res.IKESource.Addr()]
		if len(flows) != 2 || flows[0].Client.Port() == flows[1].Client.Port() {
			t.Fatalf("client %v: flows %+v, want one per port from different source ports", res.IKESource, flows)
		}
	}

	// Shared source: every client on one IP, told apart by ports.
	rep, err = Run(ctx, Options{Clients: 50, VIP: loopback, SourceBase: loopback, SharedSource: true,
		IKEPort: r.IKEAddr().Port(), NATTPort: r.NATTAddr().Port()})
	if err != nil || rep.Failed != 0 {
		t.Fatalf("shared source: %v, %d failed", err, rep.Failed)
	}
	if got := len(r.Seen().ByIP[loopback]); got != 100 {
		t.Errorf("shared source: %d flows from %v, want 100", got, loopback)
	}
}

// TestHealthProbe checks the health package's IKE probe against a Responder:
// the two were written apart, so each checks the other's wire format.
func TestHealthProbe(t *testing.T) {
	r := listen(t, "probed")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := health.ProbeIKE(ctx, r.IKEAddr()); err != nil {
		t.Fatalf("health probe against responder: %v", err)
	}
	if got := r.Counts().SAInit; got != 1 {
		t.Errorf("responder answered %d IKE_SA_INIT, want 1", got)
	}
}

func TestSessionKeepsServerAndMeasuresGap(t *testing.T) {
	r, err := Listen("s1", "127.0.0.41:0", "127.0.0.41:0")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := Session{Client: Client{
		Local: netip.MustParseAddr("127.0.0.42"), VIP: netip.MustParseAddr("127.0.0.41"),
		IKEPort: r.IKEAddr().Port(), NATTPort: r.NATTAddr().Port(), Fragments: 2,
	}, Interval: 20 * time.Millisecond, Duration: 1500 * time.Millisecond}
	res := s.Run(ctx)
	if !res.Kept() {
		t.Fatalf("session did not keep its server: %+v", res)
	}
	if res.Checks < 10 || res.Answered < res.Checks-1 || res.ESPEchoed < res.ESPSent-1 {
		t.Fatalf("checks %d answered %d, esp %d echoed %d", res.Checks, res.Answered, res.ESPSent, res.ESPEchoed)
	}
	if res.MaxGap > 200*time.Millisecond || !res.ReachedEnd {
		t.Errorf("max gap %v with a server that always answers", res.MaxGap)
	}
	if c := r.Counts(); c.DPD == 0 {
		t.Errorf("responder answered no DPD: %+v", c)
	}

	// A second responder that never saw the SA answers INVALID_IKE_SPI.
	other, err := Listen("s2", "127.0.0.43:0", "127.0.0.43:0")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP("127.0.0.42")})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	dpd := Message{SPIi: res.SPI, SPIr: res.SPIr, Exchange: ExchInformation, Flags: FlagInitiator, MsgID: 9,
		Payloads: []Payload{{Type: PayloadSK, Body: make([]byte, 16)}}}
	conn.WriteToUDPAddrPort(withMarker(dpd.Marshal()), other.NATTAddr())
	conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 2048)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	m, err := Parse(buf[4:n])
	if err != nil {
		t.Fatal(err)
	}
	if typ, ok := m.NotifyType(); !ok || typ != NotifyInvalidIKESPI {
		t.Fatalf("unknown SA: got %+v", m)
	}
	if name, _ := m.ResponderName(); name != "s2" {
		t.Fatalf("name %q", name)
	}
}
