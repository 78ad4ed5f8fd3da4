package dataplane

import (
	"fmt"
	"log/slog"
	"time"
)

// Defaults for Config's zero fields.
const (
	DefaultBatchSize     = 32
	DefaultMaxDatagram   = 65535
	DefaultClockTick     = 100 * time.Millisecond
	DefaultSweepInterval = time.Second
	DefaultMaxFlows      = 65536
	DefaultSocketBuffer  = 4 << 20
	// MaxFlowTimeout caps the default flow idle timeout, which otherwise is
	// the service's persistence timeout (often hours).
	MaxFlowTimeout = 5 * time.Minute
	// DefaultHandoverIdle: see Config.HandoverIdle.
	DefaultHandoverIdle = 10 * time.Second
	// MaxTouchInterval caps how often a client flow refreshes its affinity.
	MaxTouchInterval = 30 * time.Second
	// bindRetry is how long a flow waits before proposing an uncommitted
	// binding again (the first proposal may have been dropped).
	bindRetry = int64(time.Second)
)

// Config configures an Engine. Zero fields take the defaults above.
type Config struct {
	Logger   *slog.Logger // required
	Table    *Table       // committed affinity, read-only here; required
	Proposer Proposer     // required

	// BatchSize is the number of datagrams per recvmmsg/sendmmsg.
	BatchSize int
	// MaxDatagram is the largest datagram forwarded whole; larger ones are
	// dropped (counted as "truncated").
	MaxDatagram int
	// Now returns the time in Unix nanoseconds. It is read by the coarse
	// clock ticker, never per packet. Default: time.Now.
	Now func() int64
	// ClockTick is the coarse clock's resolution.
	ClockTick time.Duration
	// FlowTimeout closes a NAT flow idle this long. Zero: the service's
	// persistence timeout, capped at MaxFlowTimeout.
	FlowTimeout time.Duration
	// HandoverIdle closes, sooner than FlowTimeout, a flow idle this long
	// whose client the kernel forwards now through conntrack
	// (Engine.SetKernelPath): its packets no longer reach the listener,
	// and its upstream socket would otherwise be held for the whole flow
	// timeout. Long enough for the backend's answers to requests that went
	// through the flow. A flow the kernel carries with its own addresses
	// (KernelPath.Handover returned true) keeps its socket: it closes after
	// FlowTimeout, counting the kernel's activity.
	HandoverIdle time.Duration
	// SweepInterval is how often idle flows are looked for.
	SweepInterval time.Duration
	// MaxFlows bounds the NAT flows (upstream sockets) of the engine; a new
	// flow beyond it is dropped ("flow_limit").
	MaxFlows int
	// SocketBuffer sets SO_RCVBUF/SO_SNDBUF on listeners; negative leaves
	// the kernel's default.
	SocketBuffer int

	// ReplyPort is the port of the transparent reply sockets (IPv4 and
	// IPv6) that the host's TPROXY rules divert backends' replies to; 0
	// lets the kernel choose (see Engine.ReplyPorts).
	ReplyPort uint16

	// ReusePort opens listeners with SO_REUSEPORT, so that several engines
	// (in one process or several) can listen on the same VIP:port and the
	// kernel spreads clients over them by a hash of each flow — on one host,
	// what ECMP does across nodes. `ikelbd demo` runs a three-node cluster
	// on loopback this way.
	ReusePort bool

	sockets socketOps // tests may fake the kernel
}

// Validate checks the config after defaults are applied.
func (c *Config) Validate() error {
	switch {
	case c.Logger == nil:
		return fmt.Errorf("%w: no logger", ErrInvalidConfig)
	case c.Table == nil:
		return fmt.Errorf("%w: no table", ErrInvalidConfig)
	case c.Proposer == nil:
		return fmt.Errorf("%w: no proposer", ErrInvalidConfig)
	case c.BatchSize < 1 || c.BatchSize > 1024:
		return fmt.Errorf("%w: batch size %d not in 1..1024", ErrInvalidConfig, c.BatchSize)
	case c.MaxDatagram < 1 || c.MaxDatagram > 65535:
		return fmt.Errorf("%w: max datagram %d not in 1..65535", ErrInvalidConfig, c.MaxDatagram)
	case c.ClockTick <= 0 || c.SweepInterval <= 0 || c.FlowTimeout < 0:
		return fmt.Errorf("%w: non-positive interval", ErrInvalidConfig)
	case c.MaxFlows < 1:
		return fmt.Errorf("%w: max flows %d", ErrInvalidConfig, c.MaxFlows)
	}
	return nil
}

func (c *Config) setDefaults() {
	if c.BatchSize == 0 {
		c.BatchSize = DefaultBatchSize
	}
	if c.MaxDatagram == 0 {
		c.MaxDatagram = DefaultMaxDatagram
	}
	if c.Now == nil {
		c.Now = func() int64 { return time.Now().UnixNano() }
	}
	if c.ClockTick == 0 {
		c.ClockTick = DefaultClockTick
	}
	if c.HandoverIdle == 0 {
		c.HandoverIdle = DefaultHandoverIdle
	}
	if c.SweepInterval == 0 {
		c.SweepInterval = DefaultSweepInterval
	}
	if c.MaxFlows == 0 {
		c.MaxFlows = DefaultMaxFlows
	}
	if c.SocketBuffer == 0 {
		c.SocketBuffer = DefaultSocketBuffer
	}
	if c.sockets == nil {
		c.sockets = kernelSockets{bufBytes: c.SocketBuffer, reusePort: c.ReusePort}
	}
}

// flowRoom is how many NAT flows (one upstream socket each) fit under an
// open-file limit of nofile while leaving a tenth of it, at least 1,024,
// to the rest of the process: listeners, Raft, gossip, the admin API and
// metrics. Past the limit every accept and dial of the daemon fails, not
// only new flows.
func flowRoom(nofile uint64) int {
	reserve := max(1024, nofile/10)
	if nofile <= reserve+64 {
		return 64
	}
	return int(min(nofile-reserve, 1<<30))
}
