//go:build !linux

package dataplane

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
	"time"
)

// The portable fallback: one datagram per syscall with the allocation-free
// ReadFromUDPAddrPort and WriteToUDPAddrPort. A parked reader holds its batch
// (unlike on Linux), so each idle flow keeps one batch.

type sysBatch struct{}

func (s *sysBatch) init(*batch) {}

type udpConn struct {
	uc        *net.UDPConn
	local     netip.AddrPort
	connected bool
}

func newUDPConn(uc *net.UDPConn, connected bool) (conn, error) {
	return &udpConn{uc: uc, local: localAddrPort(uc), connected: connected}, nil
}

func (c *udpConn) LocalAddr() netip.AddrPort         { return c.local }
func (c *udpConn) Close() error                      { return c.uc.Close() }
func (c *udpConn) SetReadDeadline(t time.Time) error { return c.uc.SetReadDeadline(t) }

func (c *udpConn) ReadBatch(pool *batchPool) (*batch, int, error) {
	b := pool.get()
	p := &b.pkts[0]
	n, addr, err := c.uc.ReadFromUDPAddrPort(p.buf)
	if err != nil {
		pool.put(b)
		return nil, 0, err
	}
	p.n, p.addr, p.trunc = n, netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port()), false
	return b, 1, nil
}

func (c *udpConn) WriteBatch(b *batch, pkts []packet) (int, error) {
	var first error
	sent := 0
	for i := range pkts {
		p := &pkts[i]
		var err error
		if c.connected {
			_, err = c.uc.Write(p.buf[:p.n])
		} else {
			_, err = c.uc.WriteToUDPAddrPort(p.buf[:p.n], p.addr)
		}
		if err != nil {
			if first == nil {
				first = err
			}
			if errors.Is(err, net.ErrClosed) {
				break
			}
			continue
		}
		sent++
	}
	return sent, first
}

func isConnRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }
