package ikesim

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"
)

// Session is a client that connects like Client and then stays, as a VPN
// client with an established tunnel does: every Interval it sends an
// INFORMATIONAL liveness check (DPD) and an ESP-in-UDP datagram on the
// NAT-T port, and every KeepaliveEvery a 0xFF NAT keepalive. It records
// which server answered each check, so a test can see whether the client
// kept its server across a balancer failover, and how long it went without
// an answer.
type Session struct {
	Client
	Interval       time.Duration // between checks; default 100ms
	Duration       time.Duration // how long to stay after connecting; required
	KeepaliveEvery time.Duration // default 1s
}

// SessionResult is what one Session saw.
type SessionResult struct {
	Result                    // the connect: where IKE_SA_INIT and IKE_AUTH landed
	Checks      int           // liveness checks sent
	Answered    int           // ... answered by the server holding the SA
	ESPSent     int           // ESP datagrams sent
	ESPEchoed   int           // ... echoed back
	Servers     []string      // servers that answered, in order of first answer
	UnknownSA   int           // answers saying INVALID_IKE_SPI: the client reached a server without its SA
	MaxGap      time.Duration // longest time with no answer at all while running
	Start, End  time.Time
	FirstAnswer time.Time
	LastAnswer  time.Time
	// ReachedEnd: the server still answered during the last second of the
	// session (or the last 5 intervals, whichever is longer).
	ReachedEnd bool
}

// Kept reports whether the client connected, never reached another server
// than the one it connected to, and was still being answered by it when the
// session ended (the last answer within ReachedEnd's slack).
func (r SessionResult) Kept() bool {
	return r.Err == nil && !r.Split && r.UnknownSA == 0 && len(r.Servers) == 1 && r.Servers[0] == r.IKEResponder && r.ReachedEnd
}

// Run connects and then runs the session until Duration has passed or ctx
// ends.
func (s Session) Run(ctx context.Context) (res SessionResult) {
	if s.Interval <= 0 {
		s.Interval = 100 * time.Millisecond
	}
	if s.KeepaliveEvery <= 0 {
		s.KeepaliveEvery = time.Second
	}
	if s.Duration <= 0 {
		res.Err = errors.New("session needs a Duration")
		return res
	}
	ike, closeIKE, err := s.socket(s.IKEConn)
	if err != nil {
		res.Err = err
		return res
	}
	defer closeIKE()
	natt, closeNATT, err := s.socket(s.NATTConn)
	if err != nil {
		res.Err = err
		return res
	}
	defer closeNATT()
	c := s.Client
	c.IKEConn, c.NATTConn = ike, natt
	res.Result = c.Run(ctx)
	if res.Err != nil {
		return res
	}

	dst := netip.AddrPortFrom(s.VIP, s.NATTPort)
	natt.SetReadDeadline(time.Time{}) // the connect's exchanges left one set
	var (
		mu      sync.Mutex
		lastAns time.Time
		done    = make(chan struct{})
	)
	res.Start = time.Now()
	lastAns = res.Start
	answer := func(now time.Time) {
		if gap := now.Sub(lastAns); gap > res.MaxGap {
			res.MaxGap = gap
		}
		lastAns = now
		if res.FirstAnswer.IsZero() {
			res.FirstAnswer = now
		}
		res.LastAnswer = now
	}
	go func() { // reader
		defer close(done)
		buf := make([]byte, 65536)
		for {
			n, from, err := natt.ReadFromUDPAddrPort(buf)
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			if netip.AddrPortFrom(from.Addr().Unmap(), from.Port()) != dst {
				continue
			}
			b := buf[:n]
			now := time.Now()
			mu.Lock()
			switch {
			case len(b) >= 4 && [4]byte(b[:4]) == nonESPMarker:
				m, err := Parse(b[4:])
				if err != nil || m.SPIi != res.SPI || m.Exchange != ExchInformation || !m.IsResponse() {
					break
				}
				name, _ := m.ResponderName()
				if t, ok := m.NotifyType(); ok && t == NotifyInvalidIKESPI {
					res.UnknownSA++
				} else {
					res.Answered++
				}
				if !contains(res.Servers, name) {
					res.Servers = append(res.Servers, name)
				}
				answer(now)
			case len(b) >= 8:
				res.ESPEchoed++
				answer(now)
			}
			mu.Unlock()
		}
	}()

	espSPI := binary.BigEndian.Uint32(res.SPI[:4]) | 1
	tick := time.NewTicker(s.Interval)
	defer tick.Stop()
	end := time.NewTimer(s.Duration)
	defer end.Stop()
	lastKeepalive := time.Now()
	msgID := uint32(2)
	esp := make([]byte, 64)
	binary.BigEndian.PutUint32(esp, espSPI)
loop:
	for {
		dpd := Message{SPIi: res.SPI, SPIr: res.SPIr, Exchange: ExchInformation, Flags: FlagInitiator, MsgID: msgID,
			Payloads: []Payload{{Type: PayloadSK, Body: make([]byte, 16)}}}
		msgID++
		natt.WriteToUDPAddrPort(withMarker(dpd.Marshal()), dst)
		binary.BigEndian.PutUint32(esp[4:], msgID)
		natt.WriteToUDPAddrPort(esp, dst)
		mu.Lock()
		res.Checks++
		res.ESPSent++
		mu.Unlock()
		if time.Since(lastKeepalive) >= s.KeepaliveEvery {
			natt.WriteToUDPAddrPort([]byte{0xff}, dst)
			lastKeepalive = time.Now()
		}
		select {
		case <-ctx.Done():
			break loop
		case <-end.C:
			break loop
		case <-tick.C:
		}
	}
	// Late answers to the last checks.
	natt.SetReadDeadline(time.Now().Add(s.Timeout))
	<-done
	mu.Lock()
	defer mu.Unlock()
	res.End = time.Now().Add(-s.Timeout)
	if gap := res.End.Sub(lastAns); gap > res.MaxGap {
		res.MaxGap = gap
	}
	res.ReachedEnd = !res.LastAnswer.IsZero() && res.End.Sub(res.LastAnswer) <= max(time.Second, 5*s.Interval)
	return res
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// RunSessions runs opts.Clients sessions at once (all concurrently, each
// from its own source address as in Run) for d, checking every interval.
func RunSessions(ctx context.Context, opts Options, interval, d time.Duration) ([]SessionResult, error) {
	if !opts.SourceBase.IsValid() {
		opts.SourceBase = netip.MustParseAddr("127.1.0.0")
	}
	if !opts.SourceBase.Is4() || !opts.VIP.IsValid() || opts.IKEPort == 0 || opts.NATTPort == 0 || opts.Clients < 0 {
		return nil, fmt.Errorf("sessions need an IPv4 SourceBase, VIP, IKEPort, NATTPort and Clients >= 0")
	}
	out := make([]SessionResult, opts.Clients)
	var wg sync.WaitGroup
	src := opts.SourceBase
	for i := range opts.Clients {
		if !opts.SharedSource {
			src = nextHost(src)
		}
		s := Session{Client: Client{
			Local: src, VIP: opts.VIP, IKEPort: opts.IKEPort, NATTPort: opts.NATTPort,
			Fragments: opts.Fragments, AuthSize: opts.AuthSize, ESP: opts.ESP, Keepalives: opts.Keepalives,
			Timeout: opts.Timeout, Retries: opts.Retries,
		}, Interval: interval, Duration: d}
		wg.Go(func() { out[i] = s.Run(ctx) })
	}
	wg.Wait()
	return out, nil
}
