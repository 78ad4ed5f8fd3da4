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

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

const (
	protoICMP   = 1
	protoICMPv6 = 58
)

// ProbeICMP sends one ICMP echo request to addr and waits for the matching
// reply until ctx is done. It uses an unprivileged ping socket ("udp4" or
// "udp6") when net.ipv4.ping_group_range allows it, and a raw socket
// (needs CAP_NET_RAW) otherwise. Replies are matched by source address,
// identifier, sequence number and a random payload.
func ProbeICMP(ctx context.Context, addr netip.Addr) error {
	addr = addr.Unmap()
	conn, unpriv, err := listenICMP(addr.Is6())
	if err != nil {
		return err
	}
	defer conn.Close()

	var tok [10]byte // 2 bytes id, 2 bytes seq, 6 bytes payload
	rand.Read(tok[:])
	id := int(binary.BigEndian.Uint16(tok[0:]))
	seq := int(binary.BigEndian.Uint16(tok[2:]))
	payload := append([]byte("ikelb-health"), tok[4:]...)

	var reqType, replyType icmp.Type = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply
	proto := protoICMP
	if addr.Is6() {
		reqType, replyType, proto = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply, protoICMPv6
	}
	msg := icmp.Message{Type: reqType, Body: &icmp.Echo{ID: id, Seq: seq, Data: payload}}
	wire, err := msg.Marshal(nil) // the kernel fills the ICMPv6 checksum
	if err != nil {
		return fmt.Errorf("icmp marshal: %w", err)
	}
	var dst net.Addr = &net.IPAddr{IP: addr.AsSlice()}
	if unpriv {
		dst = &net.UDPAddr{IP: addr.AsSlice()}
	}

	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(DefaultTimeout)
	}
	conn.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Now()) })
	defer stop()

	if _, err := conn.WriteTo(wire, dst); err != nil {
		return fmt.Errorf("icmp echo to %v: %w", addr, err)
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := conn.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return fmt.Errorf("icmp echo to %v: %w", addr, ErrTimeout)
			}
			return fmt.Errorf("icmp echo to %v: %w", addr, err)
		}
		if !sameIP(from, addr) {
			continue // a raw socket sees every ICMP packet on the host
		}
		reply, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil || reply.Type != replyType {
			continue // e.g. our own request, looped back
		}
		echo, ok := reply.Body.(*icmp.Echo)
		if !ok || echo.Seq != seq || string(echo.Data) != string(payload) {
			continue
		}
		// A ping socket's kernel rewrites the identifier to its own.
		if !unpriv && echo.ID != id {
			continue
		}
		return nil
	}
}

// listenICMP opens a ping socket if permitted, else a raw socket.
func listenICMP(v6 bool) (conn *icmp.PacketConn, unpriv bool, err error) {
	udpNet, rawNet, wildcard := "udp4", "ip4:icmp", "0.0.0.0"
	if v6 {
		udpNet, rawNet, wildcard = "udp6", "ip6:ipv6-icmp", "::"
	}
	if conn, err := icmp.ListenPacket(udpNet, wildcard); err == nil {
		return conn, true, nil
	}
	conn, err = icmp.ListenPacket(rawNet, wildcard)
	if err != nil {
		return nil, false, fmt.Errorf("icmp socket (ping socket not permitted by net.ipv4.ping_group_range, raw socket needs CAP_NET_RAW): %w", err)
	}
	return conn, false, nil
}

func sameIP(a net.Addr, want netip.Addr) bool {
	var ip net.IP
	switch a := a.(type) {
	case *net.IPAddr:
		ip = a.IP
	case *net.UDPAddr:
		ip = a.IP
	default:
		return false
	}
	got, ok := netip.AddrFromSlice(ip)
	return ok && got.Unmap() == want
}
