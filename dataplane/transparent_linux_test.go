package dataplane

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// origDstCmsg builds the control message the kernel delivers with
// IP(V6)_RECVORIGDSTADDR.
func origDstCmsg(ap netip.AddrPort) []byte {
	var data []byte
	var level, typ int32
	if ap.Addr().Is4() {
		level, typ = unix.IPPROTO_IP, unix.IP_ORIGDSTADDR
		data = make([]byte, unix.SizeofSockaddrInet4)
		binary.LittleEndian.PutUint16(data[0:], unix.AF_INET)
		a := ap.Addr().As4()
		copy(data[4:], a[:])
	} else {
		level, typ = unix.IPPROTO_IPV6, unix.IPV6_ORIGDSTADDR
		data = make([]byte, unix.SizeofSockaddrInet6)
		binary.LittleEndian.PutUint16(data[0:], unix.AF_INET6)
		a := ap.Addr().As16()
		copy(data[8:], a[:])
	}
	binary.BigEndian.PutUint16(data[2:], ap.Port())
	b := make([]byte, unix.CmsgSpace(len(data)))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = level, typ
	h.SetLen(unix.CmsgLen(len(data)))
	copy(b[unix.CmsgLen(0):], data)
	return b
}

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root (CI=true: failing instead of skipping)")
		}
		t.Skip("needs root (raw and IP_TRANSPARENT sockets)")
	}
}

// TestKernelRawForward sends datagrams through a real raw socket on the
// loopback (no namespace changes): the receiving socket sees the spoofed
// client address and port and the exact payload, for a small datagram and
// for one the balancer fragments itself.
func TestKernelRawForward(t *testing.T) {
	needRoot(t)
	ks := kernelSockets{}
	raw, err := ks.raw(false)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	backend, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)})
	if err != nil {
		t.Fatal(err)
	}
	defer backend.Close()
	dst := backend.LocalAddr().(*net.UDPAddr).AddrPort()
	src := netip.MustParseAddrPort("127.0.0.77:40123") // no socket has it: only a raw sender can use it
	mtu := ks.mtu(dst.Addr())
	if mtu < 1280 {
		t.Fatalf("loopback route mtu %d", mtu)
	}
	rb := newRawBatch(64)
	var ident uint32
	small := []byte("esp-in-udp")
	big := bytes.Repeat([]byte("IKE_AUTH"), 1000) // 8000 bytes
	rb.add(small, src, dst, mtu, 0, &ident)
	rb.add(big, src, dst, 1280, 1, &ident) // forced fragmentation below the loopback mtu
	if rb.n != 8 {
		t.Fatalf("%d packets", rb.n)
	}
	if sent, err := raw.Send(rb); sent != rb.n || err != nil {
		t.Fatalf("Send = %d, %v", sent, err)
	}
	_ = backend.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 65535)
	for _, want := range [][]byte{small, big} {
		n, from, err := backend.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatal(err)
		}
		if from != src || !bytes.Equal(buf[:n], want) {
			t.Fatalf("got %d bytes from %v, want %d from %v", n, from, len(want), src)
		}
	}
}

// TestKernelFreebind: a listener binds an address this host does not have.
func TestKernelFreebind(t *testing.T) {
	for _, a := range []string{"192.0.2.77:0", "[2001:db8::77]:0"} {
		c, err := kernelSockets{}.listen(netip.MustParseAddrPort(a))
		if err != nil {
			if errors.Is(err, unix.EAFNOSUPPORT) {
				continue
			}
			t.Fatalf("listen %s: %v", a, err)
		}
		c.Close()
	}
}

// TestKernelReplySocket opens the IP_TRANSPARENT reply sockets and reads a
// datagram sent to one directly: it arrives with no original destination
// that differs from the socket (so it is not taken for a reply).
func TestKernelReplySocket(t *testing.T) {
	needRoot(t)
	rc, err := kernelSockets{}.tproxy(false, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if rc.LocalAddr().Port() == 0 {
		t.Fatal("no port")
	}
	c, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(rc.LocalAddr().Port())})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("x"))
	orig := make([]netip.AddrPort, 4)
	b, n, err := rc.ReadReplies(newBatchPool(1, 4, 100), orig)
	if err != nil || n != 1 {
		t.Fatalf("n %d err %v", n, err)
	}
	want := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), rc.LocalAddr().Port())
	if orig[0] != want || b.pkts[0].addr != c.LocalAddr().(*net.UDPAddr).AddrPort() {
		t.Fatalf("orig %v from %v", orig[0], b.pkts[0].addr)
	}
	if rc6, err := (kernelSockets{}).tproxy(true, 0); err == nil {
		rc6.Close()
	} else if !errors.Is(err, ErrTransparent) {
		t.Fatal(err)
	}
}
