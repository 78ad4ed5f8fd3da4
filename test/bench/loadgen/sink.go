package loadgen

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

// SinkStats are a Sink's counters since its last Reset. First and Last are
// the wall-clock times (Unix ns) of the first and last batch received, so
// that counts from sinks in several processes can be put on one timeline.
type SinkStats struct {
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
	Bad     uint64 `json:"bad"`
	Echoed  uint64 `json:"echoed"`
	First   int64  `json:"first_unix_ns"`
	Last    int64  `json:"last_unix_ns"`
}

// Add merges o into s.
func (s *SinkStats) Add(o SinkStats) {
	s.Packets += o.Packets
	s.Bytes += o.Bytes
	s.Bad += o.Bad
	s.Echoed += o.Echoed
	if o.First != 0 && (s.First == 0 || o.First < s.First) {
		s.First = o.First
	}
	s.Last = max(s.Last, o.Last)
}

// Window is the time between the first and the last datagram.
func (s SinkStats) Window() time.Duration { return time.Duration(s.Last - s.First) }

// SinkConfig describes a Sink.
type SinkConfig struct {
	// Listen are the addresses to receive on (e.g. 0.0.0.0:500 and
	// 0.0.0.0:4500); port 0 picks a free port.
	Listen []netip.AddrPort
	// RcvBuf is each socket's receive buffer in bytes; 0 keeps the
	// default. As root it is forced past net.core.rmem_max.
	RcvBuf int
	// Batch is the most datagrams per recvmmsg; 0 means 64.
	Batch int
}

// Sink receives and counts datagrams and echoes probes.
type Sink struct {
	// set once
	conns []*net.UDPConn
	batch int

	packets, bytes, bad, echoed atomic.Uint64
	first, last                 atomic.Int64
	// stamps: SO_TIMESTAMPNS is on (SetTimestamps); probes are echoed
	// with their kernel receive time.
	stamps atomic.Bool
}

// NewSink opens the sink's sockets.
func NewSink(cfg SinkConfig) (*Sink, error) {
	if len(cfg.Listen) == 0 {
		return nil, fmt.Errorf("%w: sink needs a listen address", ErrConfig)
	}
	s := &Sink{batch: cfg.Batch}
	if s.batch == 0 {
		s.batch = 64
	}
	for _, a := range cfg.Listen {
		c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(a))
		if err != nil {
			closeAll(s.conns)
			return nil, fmt.Errorf("loadgen: sink: %w", err)
		}
		s.conns = append(s.conns, c)
		if cfg.RcvBuf > 0 {
			if err := setRcvBuf(c, cfg.RcvBuf); err != nil {
				closeAll(s.conns)
				return nil, err
			}
		}
	}
	return s, nil
}

func setRcvBuf(c *net.UDPConn, n int) error {
	err := setSockopt(c, unix.SO_RCVBUFFORCE, n)
	if errors.Is(err, errSockopt) { // not root: the best the limit allows
		return c.SetReadBuffer(n)
	}
	return err
}

// errSockopt marks setSockopt's refusals by the kernel.
var errSockopt = errors.New("setsockopt")

// setSockopt sets the SOL_SOCKET option opt of c to v; an error the
// kernel returned wraps errSockopt.
func setSockopt(c *net.UDPConn, opt, v int) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("loadgen: %w", err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt, v)
	}); err != nil {
		return fmt.Errorf("loadgen: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("loadgen: %w %d: %w", errSockopt, opt, serr)
	}
	return nil
}

// Addrs returns the addresses the sink receives on.
func (s *Sink) Addrs() []netip.AddrPort {
	out := make([]netip.AddrPort, len(s.conns))
	for i, c := range s.conns {
		out[i] = c.LocalAddr().(*net.UDPAddr).AddrPort()
	}
	return out
}

// Run receives until ctx ends, then closes the sockets.
func (s *Sink) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	errs := make([]error, len(s.conns))
	for i, c := range s.conns {
		wg.Go(func() { errs[i] = s.read(c) })
	}
	<-ctx.Done()
	closeAll(s.conns)
	wg.Wait()
	return errors.Join(errs...)
}

// SetTimestamps turns the kernel's receive timestamps on or off on every
// socket. Off by default: while any socket asks for them the kernel reads
// the clock for every packet it receives, on every path of the machine,
// which the throughput runs need not pay.
func (s *Sink) SetTimestamps(on bool) error {
	v := 0
	if on {
		v = 1
	}
	for _, c := range s.conns {
		if err := setTimestamps(c, v); err != nil {
			return err
		}
	}
	s.stamps.Store(on)
	return nil
}

// setTimestamps sets SO_TIMESTAMPNS_NEW on c to v.
func setTimestamps(c *net.UDPConn, v int) error { return setSockopt(c, unix.SO_TIMESTAMPNS_NEW, v) }

// rxStamp returns the SO_TIMESTAMPNS_NEW time in oob as Unix ns, or 0.
func rxStamp(oob []byte) int64 {
	cms, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return 0
	}
	for _, cm := range cms {
		if cm.Header.Level == unix.SOL_SOCKET && cm.Header.Type == unix.SO_TIMESTAMPNS_NEW && len(cm.Data) >= 16 {
			// struct timespec of 64-bit longs (SO_TIMESTAMPNS on 64-bit
			// Linux; SO_TIMESTAMPNS_NEW's layout everywhere).
			sec, nsec := binary.NativeEndian.Uint64(cm.Data[0:8]), binary.NativeEndian.Uint64(cm.Data[8:16])
			return int64(sec)*int64(time.Second) + int64(nsec)
		}
	}
	return 0
}

func (s *Sink) read(c *net.UDPConn) error {
	pc := ipv4.NewPacketConn(c)
	msgs := make([]ipv4.Message, s.batch)
	for i := range msgs {
		msgs[i].Buffers = [][]byte{make([]byte, MaxSize)}
		msgs[i].OOB = make([]byte, 64)
	}
	for {
		n, err := pc.ReadBatch(msgs, 0)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			if errors.Is(err, syscall.ECONNREFUSED) {
				continue
			}
			return fmt.Errorf("loadgen: sink: %w", err)
		}
		now := time.Now().UnixNano()
		var pkts, bytes, bad, echoed uint64
		for i := range n {
			m := &msgs[i]
			b := m.Buffers[0][:m.N]
			kind, _, ok := parseHeader(b)
			if !ok {
				bad++
				continue
			}
			pkts++
			bytes += uint64(m.N)
			if kind == KindProbe {
				if s.stamps.Load() {
					stampProbe(b, rxStamp(m.OOB[:m.NN]), time.Now().UnixNano())
				}
				if _, err := c.WriteTo(b, m.Addr); err == nil {
					echoed++
				}
			}
		}
		s.packets.Add(pkts)
		s.bytes.Add(bytes)
		s.bad.Add(bad)
		s.echoed.Add(echoed)
		if pkts > 0 {
			s.first.CompareAndSwap(0, now)
			s.last.Store(now)
		}
	}
}

// Stats returns the counters since the last Reset.
func (s *Sink) Stats() SinkStats {
	return SinkStats{
		Packets: s.packets.Load(), Bytes: s.bytes.Load(), Bad: s.bad.Load(), Echoed: s.echoed.Load(),
		First: s.first.Load(), Last: s.last.Load(),
	}
}

// Reset zeroes the counters and returns what they held.
func (s *Sink) Reset() SinkStats {
	return SinkStats{
		Packets: s.packets.Swap(0), Bytes: s.bytes.Swap(0), Bad: s.bad.Swap(0), Echoed: s.echoed.Swap(0),
		First: s.first.Swap(0), Last: s.last.Swap(0),
	}
}

// Control commands understood by ServeControl, one per connection.
const (
	CmdStats = "stats"
	CmdReset = "reset"
	// CmdTimestamps turns the sink's receive timestamps on (SetTimestamps)
	// and answers like CmdStats; the harness sends it before latency runs.
	CmdTimestamps = "timestamps"
)

// ServeControl answers CmdStats, CmdReset and CmdTimestamps (one line
// each, one per connection) on a Unix socket at path until ctx ends. The
// answer is the SinkStats as one JSON line (for reset: the counters before
// the reset); a CmdTimestamps that fails gets none.
func ServeControl(ctx context.Context, path string, s *Sink) error {
	_ = os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("loadgen: control: %w", err)
	}
	go func() {
		<-ctx.Done()
		_ = ln.Close()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("loadgen: control: %w", err)
		}
		// Commands are tiny and answered at once: serving them in turn
		// keeps the control state owned by this goroutine.
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err == nil {
			var st SinkStats
			switch line {
			case CmdStats + "\n":
				st = s.Stats()
			case CmdReset + "\n":
				st = s.Reset()
			case CmdTimestamps + "\n":
				if err := s.SetTimestamps(true); err != nil {
					_ = c.Close() // the caller's decode fails: no answer
					continue
				}
				st = s.Stats()
			}
			_ = json.NewEncoder(c).Encode(st)
		}
		_ = c.Close()
	}
}

// Query sends cmd (CmdStats or CmdReset) to the control socket at path.
func Query(ctx context.Context, path, cmd string) (SinkStats, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return SinkStats{}, fmt.Errorf("loadgen: control %s: %w", path, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if _, err := c.Write([]byte(cmd + "\n")); err != nil {
		return SinkStats{}, fmt.Errorf("loadgen: control %s: %w", path, err)
	}
	var st SinkStats
	if err := json.NewDecoder(c).Decode(&st); err != nil {
		return SinkStats{}, fmt.Errorf("loadgen: control %s: %w", path, err)
	}
	return st, nil
}
