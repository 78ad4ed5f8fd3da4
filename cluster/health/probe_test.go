package health

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ikelb/ikelb/test/pcapfile"
)

func TestProbeICMPLoopback(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := ProbeICMP(ctx, netip.MustParseAddr("127.0.0.1"))
	if err != nil && os.Getenv("CI") != "true" &&
		(errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES)) {
		t.Skipf("ICMP sockets not permitted here (need ping_group_range or CAP_NET_RAW; runs in CI): %v", err)
	}
	if err != nil {
		t.Fatalf("ping 127.0.0.1: %v", err)
	}
	if addrs, _ := net.InterfaceAddrs(); hasIPv6Loopback(addrs) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := ProbeICMP(ctx, netip.MustParseAddr("::1")); err != nil {
			t.Errorf("ping ::1: %v", err)
		}
	}
}

func hasIPv6Loopback(addrs []net.Addr) bool {
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.Equal(net.IPv6loopback) {
			return true
		}
	}
	return false
}

func TestProbeICMPTimeout(t *testing.T) {
	// Tests send only to loopback, which always answers: a deadline already
	// past is how the no-answer path is reached.
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	start := time.Now()
	err := ProbeICMP(ctx, netip.MustParseAddr("127.0.0.1"))
	if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) {
		t.Skipf("ICMP sockets not permitted: %v", err)
	}
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("probe past its deadline: %v, want ErrTimeout", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("cancelled probe took %v", d)
	}
}

// responder answers each datagram it receives with answer(request).
func responder(t *testing.T, answer func(req []byte) []byte) netip.AddrPort {
	t.Helper()
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { conn.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if resp := answer(buf[:n]); resp != nil {
				conn.WriteToUDPAddrPort(resp, from)
			}
		}
	}()
	return conn.LocalAddr().(*net.UDPAddr).AddrPort()
}

// notifyResponse is what a responder sends when it rejects the proposal:
// header plus one Notify payload, NO_PROPOSAL_CHOSEN (14).
func notifyResponse(req []byte) []byte {
	b := make([]byte, 28+8)
	copy(b, req[:8])
	b[16] = 41 // Notify
	b[17] = 0x20
	b[18] = 34
	b[19] = 0x20
	binary.BigEndian.PutUint32(b[24:], uint32(len(b)))
	binary.BigEndian.PutUint16(b[28+2:], 8)
	binary.BigEndian.PutUint16(b[28+6:], 14)
	return b
}

func TestProbeIKE(t *testing.T) {
	good := responder(t, notifyResponse)
	garbage := responder(t, func([]byte) []byte { return []byte("HTTP/1.1 400 Bad Request\r\n\r\n") })
	wrongSPI := responder(t, func(req []byte) []byte {
		b := notifyResponse(req)
		b[0] ^= 0xff
		return b
	})
	badLength := responder(t, func(req []byte) []byte {
		b := notifyResponse(req)
		binary.BigEndian.PutUint32(b[24:], 100)
		return b
	})
	notResponse := responder(t, func(req []byte) []byte {
		b := notifyResponse(req)
		b[19] = 0x08
		return b
	})
	silent := responder(t, func([]byte) []byte { return nil })
	seenCh := make(chan []byte, 1)
	checkReq := responder(t, func(req []byte) []byte {
		select {
		case seenCh <- append([]byte(nil), req...):
		default:
		}
		return notifyResponse(req)
	})

	// A port nobody listens on: the kernel answers port unreachable.
	closedConn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	closed := closedConn.LocalAddr().(*net.UDPAddr).AddrPort()
	closedConn.Close()

	tests := []struct {
		name    string
		dst     netip.AddrPort
		wantErr error  // nil: success
		wantMsg string // in the error
	}{
		{"notify response", good, nil, ""},
		{"request is well-formed", checkReq, nil, ""},
		{"garbage", garbage, ErrBadResponse, "initiator SPI"},
		{"wrong spi", wrongSPI, ErrBadResponse, "initiator SPI"},
		{"bad length", badLength, ErrBadResponse, "header length 100"},
		{"not a response", notResponse, ErrBadResponse, "flags"},
		{"silent", silent, ErrTimeout, ""},
		{"closed port", closed, syscall.ECONNREFUSED, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			err := ProbeIKE(ctx, tc.dst)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatalf("probe: %v", err)
				}
				return
			}
			if !errors.Is(err, tc.wantErr) || !strings.Contains(err.Error(), tc.wantMsg) {
				t.Fatalf("probe error %v, want %v containing %q", err, tc.wantErr, tc.wantMsg)
			}
		})
	}
	// The request the responder saw must itself pass the structural checks
	// a response gets (with the direction flags swapped).
	var req []byte
	select {
	case req = <-seenCh:
	default:
		t.Fatal("no request seen")
	}
	if req[19] != 0x08 || req[17] != 0x20 || req[18] != 34 || [8]byte(req[8:16]) != ([8]byte{}) {
		t.Errorf("request header %x", req[:28])
	}
	req[19] = 0x20
	if err := checkSAInitResponse(req, [8]byte(req[:8])); err != nil {
		t.Errorf("our request is not well-formed: %v", err)
	}
}

// TestCheckSAInitResponseCapture runs the response check on the real
// strongSwan IKE_SA_INIT responses in the shared capture.
func TestCheckSAInitResponseCapture(t *testing.T) {
	capture, err := pcapfile.Read(pcapfile.Capture())
	if err != nil {
		t.Fatal(err)
	}
	var responses int
	for _, p := range capture {
		if p.Src.Port() != 500 || len(p.Payload) < 28 || p.Payload[18] != 34 || p.Payload[19]&0x20 == 0 {
			continue
		}
		responses++
		if err := checkSAInitResponse(p.Payload, [8]byte(p.Payload[:8])); err != nil {
			t.Errorf("real response %d rejected: %v", responses, err)
		}
		if err := checkSAInitResponse(p.Payload, [8]byte{1}); !errors.Is(err, ErrBadResponse) {
			t.Errorf("real response accepted for another SPI: %v", err)
		}
		for _, cut := range []int{27, 28, len(p.Payload) - 1} {
			if err := checkSAInitResponse(p.Payload[:cut], [8]byte(p.Payload[:8])); !errors.Is(err, ErrBadResponse) {
				t.Errorf("response truncated to %d accepted: %v", cut, err)
			}
		}
	}
	if responses == 0 {
		t.Fatal("no IKE_SA_INIT responses found in the capture")
	}
}
