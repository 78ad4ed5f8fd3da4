package cluster

import (
	"log/slog"

	"github.com/ikelb/ikelb/cluster/health"
	"github.com/ikelb/ikelb/dataplane"
)

// NewProbeChecker returns a NewHealthChecker backed by package health (ICMP
// and IKEv2 probes with rise/fall). Pass it as Config.HealthChecker.
func NewProbeChecker(logger *slog.Logger, opts ...health.Option) NewHealthChecker {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return func(report func(HealthTransition)) HealthChecker {
		c := health.New(logger, func(t health.Transition) {
			if t.To != dataplane.HealthUp && t.To != dataplane.HealthDown {
				return
			}
			ht := HealthTransition{Service: t.Key.Service, Backend: t.Key.Backend, Up: t.To == dataplane.HealthUp, At: t.At}
			if t.Reason != nil {
				ht.Err = t.Reason.Error()
			}
			report(ht)
		}, opts...)
		return &probeChecker{c: c, log: logger}
	}
}

type probeChecker struct {
	c   *health.Checker
	log *slog.Logger
}

func (p *probeChecker) Update(targets []HealthTarget) {
	ts := make([]health.Target, 0, len(targets))
	for _, t := range targets {
		typ := health.TypeICMP
		if t.Type == HealthCheckIKEv2 {
			typ = health.TypeIKE
		}
		ts = append(ts, health.Target{
			Key: health.Key{Service: t.Service, Backend: t.Backend}, Addr: t.Addr, Type: typ, Port: t.Port,
			Interval: t.Interval, Timeout: t.Timeout, Rise: int(t.Rise), Fall: int(t.Fall),
		})
	}
	if err := p.c.Update(ts); err != nil {
		p.log.Warn("health targets rejected", "error", err)
	}
}

func (p *probeChecker) Close() { p.c.Close() }
