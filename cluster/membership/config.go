package membership

import (
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/hashicorp/memberlist"
)

// DefaultBindAddr is the gossip address (UDP and TCP) when Config.BindAddr
// is empty.
const DefaultBindAddr = "0.0.0.0:7946"

// DefaultEventBuffer is the capacity of the Events channel when
// Config.EventBuffer is zero.
const DefaultEventBuffer = 256

// reapAfter is how long a failed or left member stays in Members() before
// it is forgotten, unless it comes back first. Serf uses 24h for both its
// reconnect and tombstone timeouts; the Raft leader removes a dead server long
// before that.
const reapAfter = 24 * time.Hour

// Config configures a Members. The zero value of every field but Name and
// Meta.RaftAddr means its default; Validate reports problems by field name.
type Config struct {
	// Name is this member's unique name; the cluster uses it as the Raft
	// server ID.
	Name string
	// BindAddr is the ip:port gossip listens on (UDP and TCP). Port 0 picks
	// a free port (tests). Default DefaultBindAddr.
	BindAddr string
	// AdvertiseAddr is the ip:port other members reach this one at. Empty:
	// the bound address (memberlist picks a private interface address when
	// bound to 0.0.0.0). Port 0 or no port: the bound port.
	AdvertiseAddr string
	// Join lists host:port addresses of existing members; reaching any one
	// is enough. Empty: this member starts a cluster of its own.
	Join []string
	// EncryptKey, if set, is the AES key (16, 24 or 32 bytes) every member
	// encrypts gossip with; members with another key or none cannot join.
	EncryptKey []byte
	// Meta is what this member advertises to the others.
	Meta Meta
	// Logger receives this package's logs and memberlist's, bridged.
	// Default: discard.
	Logger *slog.Logger
	// EventBuffer is the capacity of the Events channel; events that do not
	// fit are dropped and counted. Default DefaultEventBuffer.
	EventBuffer int
	// Tunables are the gossip timers; zero fields take DefaultTunables'.
	Tunables Tunables
}

// Tunables are memberlist's failure-detector and gossip timers.
//
// A member that stops answering (SIGKILL, power loss, cut cable) is declared
// failed after roughly
//
//	time until some member probes it (≤ ProbeInterval on average)
//	+ one probe round (ProbeInterval: direct ping, then indirect and TCP pings)
//	+ suspicion timeout (SuspicionMult × ProbeInterval for fewer than 10 members,
//	  up to SuspicionMaxTimeoutMult times that while confirmations from other
//	  members are missing)
//
// The defaults (200ms, 100ms, 3, 3) declare a SIGKILLed member of a
// three-member cluster failed in 0.8–1.0 s (measured on loopback; up to about
// 2 s when no second member confirms the suspicion), against 5.8 s with
// memberlist's LAN profile (1s, 500ms, 4, 6). The price: a member
// that cannot answer for about a second — a long GC or VM pause, a saturated
// link, heavy packet loss — is declared failed and must refute (it does so by
// itself and rejoins within a probe round), and each member sends five small
// UDP probes a second. Lifeguard's awareness (memberlist's local health score)
// backs a struggling member's own probing off, which limits false accusations
// from a slow prober. Raft membership changes must therefore not follow a
// single failure instantly: the leader removes a server only after it has
// been failed for a configurable time (see DESIGN.md).
type Tunables struct {
	// ProbeInterval is the failure-detector period. Default 200ms
	// (memberlist LAN: 1s).
	ProbeInterval time.Duration
	// ProbeTimeout is how long a direct ping waits for its ack before
	// indirect pings are tried; about the 99th percentile RTT plus
	// processing. Default 100ms (LAN: 500ms).
	ProbeTimeout time.Duration
	// SuspicionMult scales the suspicion timeout (× ProbeInterval ×
	// max(1, log10(members))). Default 3 (LAN: 4).
	SuspicionMult int
	// SuspicionMaxTimeoutMult bounds how much longer a suspicion lasts
	// while no other member has confirmed it. Default 3 (LAN: 6).
	SuspicionMaxTimeoutMult int
	// GossipInterval is how often state changes are gossiped to
	// GossipNodes random members. Default 100ms (LAN: 200ms).
	GossipInterval time.Duration
	// PushPullInterval is the full-state TCP sync (anti-entropy) period;
	// also how long dead members still receive gossip. Default 10s (LAN: 30s).
	PushPullInterval time.Duration
	// TCPTimeout bounds a TCP exchange: a join attempt, a push/pull, a TCP
	// fallback ping. Default 2s (LAN: 10s).
	TCPTimeout time.Duration
	// DeadNodeReclaimTime is how long after a member failed another process
	// may take its name from a different address (a node restarted with a new
	// IP or port). Default 5s (memberlist: never, until the dead member is
	// forgotten after PushPullInterval).
	DeadNodeReclaimTime time.Duration
}

// DefaultTunables returns the LAN defaults documented on Tunables.
func DefaultTunables() Tunables {
	return Tunables{
		ProbeInterval:           200 * time.Millisecond,
		ProbeTimeout:            100 * time.Millisecond,
		SuspicionMult:           3,
		SuspicionMaxTimeoutMult: 3,
		GossipInterval:          100 * time.Millisecond,
		PushPullInterval:        10 * time.Second,
		TCPTimeout:              2 * time.Second,
		DeadNodeReclaimTime:     5 * time.Second,
	}
}

func orDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// withDefaults returns c with every zero field set to its default.
func (c Config) withDefaults() Config {
	orDefault(&c.BindAddr, DefaultBindAddr)
	orDefault(&c.EventBuffer, DefaultEventBuffer)
	orDefault(&c.Meta.Role, RoleVoter)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	d := DefaultTunables()
	t := &c.Tunables
	orDefault(&t.ProbeInterval, d.ProbeInterval)
	orDefault(&t.ProbeTimeout, d.ProbeTimeout)
	orDefault(&t.SuspicionMult, d.SuspicionMult)
	orDefault(&t.SuspicionMaxTimeoutMult, d.SuspicionMaxTimeoutMult)
	orDefault(&t.GossipInterval, d.GossipInterval)
	orDefault(&t.PushPullInterval, d.PushPullInterval)
	orDefault(&t.TCPTimeout, d.TCPTimeout)
	orDefault(&t.DeadNodeReclaimTime, d.DeadNodeReclaimTime)
	return c
}

// Validate reports every problem with c (after defaults), each prefixed by
// the field's name, wrapped in ErrInvalidConfig.
func (c Config) Validate() error {
	c = c.withDefaults()
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf(format, args...))
	}
	if c.Name == "" {
		bad("name: required")
	}
	if _, err := parseIPPort(c.BindAddr, false); err != nil {
		bad("bind_addr: %v", err)
	}
	if c.AdvertiseAddr != "" {
		if _, err := parseIPPort(c.AdvertiseAddr, true); err != nil {
			bad("advertise_addr: %v", err)
		}
	}
	for i, a := range c.Join {
		if _, _, err := splitHostPort(a); err != nil {
			bad("join[%d]: %v", i, err)
		}
	}
	if n := len(c.EncryptKey); n != 0 && n != 16 && n != 24 && n != 32 {
		bad("encrypt_key: must be 16, 24 or 32 bytes, got %d", n)
	}
	if err := c.Meta.validate(); err != nil {
		errs = append(errs, err)
	}
	if c.EventBuffer < 0 {
		bad("event_buffer: must not be negative, got %d", c.EventBuffer)
	}
	t := c.Tunables
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"probe_interval", t.ProbeInterval}, {"probe_timeout", t.ProbeTimeout},
		{"gossip_interval", t.GossipInterval}, {"push_pull_interval", t.PushPullInterval},
		{"tcp_timeout", t.TCPTimeout}, {"dead_node_reclaim_time", t.DeadNodeReclaimTime},
	} {
		if d.v < 0 {
			bad("tunables.%s: must not be negative, got %v", d.name, d.v)
		}
	}
	if t.ProbeTimeout >= t.ProbeInterval {
		bad("tunables.probe_timeout %v: must be less than probe_interval %v", t.ProbeTimeout, t.ProbeInterval)
	}
	if t.SuspicionMult < 1 {
		bad("tunables.suspicion_mult: must be at least 1, got %d", t.SuspicionMult)
	}
	if t.SuspicionMaxTimeoutMult < 1 {
		bad("tunables.suspicion_max_timeout_mult: must be at least 1, got %d", t.SuspicionMaxTimeoutMult)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	return nil
}

// splitHostPort splits host:port and checks the port is a number in range.
func splitHostPort(s string) (string, uint16, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", 0, fmt.Errorf("want host:port: %w", err)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return "", 0, fmt.Errorf("port %q: want a number from 0 to 65535", port)
	}
	return host, uint16(p), nil
}

// parseIPPort parses ip:port; with portOptional a bare IP means port 0.
// memberlist binds and advertises IP literals only.
func parseIPPort(s string, portOptional bool) (netip.AddrPort, error) {
	if portOptional {
		if ip, err := netip.ParseAddr(s); err == nil {
			return netip.AddrPortFrom(ip, 0), nil
		}
	}
	host, port, err := splitHostPort(s)
	if err != nil {
		return netip.AddrPort{}, err
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("host %q: want an IP address", host)
	}
	return netip.AddrPortFrom(ip, port), nil
}

// memberlistConfig translates a validated, defaulted c.
func (c Config) memberlistConfig(d *delegate, logOut io.Writer) *memberlist.Config {
	mc := memberlist.DefaultLANConfig()
	mc.Name = c.Name
	bind, _ := parseIPPort(c.BindAddr, false)
	mc.BindAddr = bind.Addr().String()
	mc.BindPort = int(bind.Port())
	// memberlist replaces AdvertisePort by the bound port only when BindPort
	// is 0; otherwise its default (7946) would be advertised.
	mc.AdvertisePort = mc.BindPort
	if c.AdvertiseAddr != "" {
		adv, _ := parseIPPort(c.AdvertiseAddr, true)
		mc.AdvertiseAddr = adv.Addr().String()
		if adv.Port() != 0 {
			mc.AdvertisePort = int(adv.Port())
		}
	}
	if len(c.EncryptKey) > 0 {
		mc.SecretKey = append([]byte(nil), c.EncryptKey...)
	}
	t := c.Tunables
	mc.ProbeInterval = t.ProbeInterval
	mc.ProbeTimeout = t.ProbeTimeout
	mc.SuspicionMult = t.SuspicionMult
	mc.SuspicionMaxTimeoutMult = t.SuspicionMaxTimeoutMult
	mc.GossipInterval = t.GossipInterval
	mc.PushPullInterval = t.PushPullInterval
	mc.GossipToTheDeadTime = t.PushPullInterval
	mc.TCPTimeout = t.TCPTimeout
	mc.DeadNodeReclaimTime = t.DeadNodeReclaimTime
	mc.Delegate = d
	mc.Events = d
	mc.Logger = log.New(logOut, "", 0)
	return mc
}
