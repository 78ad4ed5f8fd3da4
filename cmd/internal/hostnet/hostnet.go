package hostnet

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"sync"

	"github.com/ikelb/ikelb/dataplane"
)

// Defaults for Config's zero fields.
const (
	DefaultMark         = 0x4b45 // "KE"
	DefaultTable        = 4500
	DefaultRulePriority = 100
	DefaultNFTTable     = "ikelb"
)

// Sentinel errors.
var (
	// ErrPermission: the process may not change the host's network setup.
	ErrPermission = errors.New("transparent mode needs CAP_NET_ADMIN")
	// ErrInvalidConfig: Config.Validate rejected the configuration.
	ErrInvalidConfig = errors.New("invalid hostnet config")
	// ErrUnsupported: the platform has no TPROXY (not Linux).
	ErrUnsupported = errors.New("transparent mode needs linux")
	// ErrSetup: installing or removing part of the setup failed (the
	// message names the part).
	ErrSetup = errors.New("host network setup failed")
)

// Config configures a Manager. Zero fields take the defaults above.
type Config struct {
	Logger *slog.Logger // required
	// Mark is the fwmark the tproxy rule sets and the ip rule matches.
	Mark uint32
	// Table is the routing table holding the local default routes.
	Table int
	// RulePriority is the ip rule's priority (before "main", 32766).
	RulePriority int
	// NFTTable is the name of the inet nftables table.
	NFTTable string
}

func (c *Config) setDefaults() {
	if c.Mark == 0 {
		c.Mark = DefaultMark
	}
	if c.Table == 0 {
		c.Table = DefaultTable
	}
	if c.RulePriority == 0 {
		c.RulePriority = DefaultRulePriority
	}
	if c.NFTTable == "" {
		c.NFTTable = DefaultNFTTable
	}
}

// Validate checks the config after defaults are applied.
func (c *Config) Validate() error {
	switch {
	case c.Logger == nil:
		return fmt.Errorf("%w: no logger", ErrInvalidConfig)
	case c.Table <= 0 || c.Table >= 252 && c.Table <= 255: // compat, default, main, local
		return fmt.Errorf("%w: routing table %d is reserved", ErrInvalidConfig, c.Table)
	case c.RulePriority <= 0 || c.RulePriority >= 32766:
		return fmt.Errorf("%w: rule priority %d not in 1..32765", ErrInvalidConfig, c.RulePriority)
	case len(c.NFTTable) > 255:
		return fmt.Errorf("%w: nft table name too long", ErrInvalidConfig)
	}
	return nil
}

// Intercept is one source of replies to divert: a backend's address and
// a service port.
type Intercept struct {
	Backend netip.Addr
	Port    uint16
}

// Spec is the wanted host setup. The zero Spec means none.
type Spec struct {
	ReplyPort4, ReplyPort6 uint16 // the dataplane's reply sockets (Engine.ReplyPorts)
	Intercepts             []Intercept
}

func (s Spec) families() (v4, v6 bool) {
	for _, ic := range s.Intercepts {
		if ic.Backend.Unmap().Is4() {
			v4 = v4 || s.ReplyPort4 != 0
		} else {
			v6 = v6 || s.ReplyPort6 != 0
		}
	}
	return v4, v6
}

// SpecFor is the setup the transparent services of set need, given the
// engine's reply ports.
func SpecFor(set []dataplane.Service, port4, port6 uint16) Spec {
	s := Spec{ReplyPort4: port4, ReplyPort6: port6}
	seen := map[Intercept]bool{}
	for _, svc := range set {
		if svc.Mode != dataplane.ModeTransparent {
			continue
		}
		for _, b := range svc.Backends {
			for _, p := range svc.Ports {
				ic := Intercept{Backend: b.Addr.Unmap(), Port: p}
				if !seen[ic] {
					seen[ic] = true
					s.Intercepts = append(s.Intercepts, ic)
				}
			}
		}
	}
	slices.SortFunc(s.Intercepts, func(a, b Intercept) int {
		if c := a.Backend.Compare(b.Backend); c != 0 {
			return c
		}
		return int(a.Port) - int(b.Port)
	})
	return s
}

// Manager owns the host setup. Its methods may be called from several
// goroutines.
type Manager struct {
	// set once
	cfg Config
	log *slog.Logger

	mu        sync.Mutex // guards the following
	installed bool       // this Manager installed something not removed since
	checked   bool       // a stale setup was looked for
	last      Spec
}

// New returns a Manager; it changes nothing until Apply.
func New(cfg Config) (*Manager, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Manager{cfg: cfg, log: cfg.Logger}, nil
}

// Config returns the configuration in use, defaults applied.
func (m *Manager) Config() Config { return m.cfg }

// Apply makes the host match s: with intercepts, the nft table, rules and
// routes; without, none of them.
func (m *Manager) Apply(s Spec) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	v4, v6 := s.families()
	if !v4 && !v6 {
		if m.installed || !m.checked {
			err := m.removeLocked()
			first := !m.checked
			m.checked = true
			if err != nil && first && !m.installed {
				// Nothing of ours was installed by this process; a stale
				// setup we may not remove is not fatal for nat mode.
				m.log.Debug("no stale transparent setup removed", "error", err)
				return nil
			}
			return err
		}
		return nil
	}
	m.checked = true
	if err := m.applyNFT(s, v4, v6); err != nil {
		return err
	}
	m.installed = true
	if err := m.applyRouting(v4, v6); err != nil {
		return err
	}
	if !specEqual(m.last, s) {
		m.log.Info("host set up for transparent services", "nft_table", "inet "+m.cfg.NFTTable,
			"intercepts", len(s.Intercepts), "reply_port_v4", s.ReplyPort4, "reply_port_v6", s.ReplyPort6,
			"fwmark", m.cfg.Mark, "route_table", m.cfg.Table)
	}
	m.last = s
	return nil
}

func specEqual(a, b Spec) bool {
	return a.ReplyPort4 == b.ReplyPort4 && a.ReplyPort6 == b.ReplyPort6 && slices.Equal(a.Intercepts, b.Intercepts)
}

// Remove deletes everything the package installs (also when another run
// of the daemon installed it).
func (m *Manager) Remove() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.removeLocked()
}

// Close removes the setup if this Manager installed it (a daemon that only
// ever had nat services needs no privilege to exit cleanly).
func (m *Manager) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.installed {
		return nil
	}
	return m.removeLocked()
}

func (m *Manager) removeLocked() error {
	var errs []error
	if err := m.removeNFT(); err != nil {
		errs = append(errs, err)
	}
	if err := m.removeRouting(); err != nil {
		errs = append(errs, err)
	}
	err := errors.Join(errs...)
	if err == nil {
		if m.installed {
			m.log.Info("host setup for transparent services removed", "nft_table", "inet "+m.cfg.NFTTable)
		}
		m.installed, m.last = false, Spec{}
	}
	return err
}

// wrap classifies a netlink error.
func wrap(what string, err error) error {
	if errors.Is(err, os.ErrPermission) {
		return fmt.Errorf("%w: %s: %w", ErrPermission, what, err)
	}
	return fmt.Errorf("%w: %s: %w", ErrSetup, what, err)
}
