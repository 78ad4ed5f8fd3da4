package main

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/ikelb/ikelb/cmd/internal/spec"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

func newServiceCmd(a *app) *cobra.Command {
	return group("service", "List, show, create, update and delete services",
		&cobra.Command{
			Use:   "list",
			Short: "List services",
			Args:  exactArgs(),
			RunE:  a.serviceList,
		},
		&cobra.Command{
			Use:   "get NAME",
			Short: "Show a service and its backends (-o yaml prints it for apply -f)",
			Args:  exactArgs("NAME"),
			RunE:  a.serviceGet,
		},
		newServiceCreateCmd(a),
		newServiceUpdateCmd(a),
		&cobra.Command{
			Use:   "delete NAME",
			Short: "Delete a service and its affinities",
			Args:  exactArgs("NAME"),
			RunE:  a.serviceDelete,
		},
	)
}

func (a *app) serviceList(cmd *cobra.Command, _ []string) error {
	c, err := a.client()
	if err != nil {
		return err
	}
	resp, err := call(a, cmd, c.ListServices, &ikelbv1.ListServicesRequest{})
	if err != nil {
		return err
	}
	if a.output != "table" {
		return a.printServices(resp, resp.GetServices()...)
	}
	t := newTable(a.stdout, "NAME", "VIP", "PORTS", "MODE", "PERSISTENCE", "HEALTH-CHECK", "BACKENDS-UP", "VERSION")
	for _, s := range resp.GetServices() {
		up := 0
		for _, b := range s.GetBackends() {
			if b.GetHealth() == ikelbv1.BackendHealth_BACKEND_HEALTH_UP {
				up++
			}
		}
		t.row(s.GetName(), s.GetVip(), ports(s.GetPorts()), modeText(s), duration(s.GetPersistenceTimeout()),
			checkShort(s.GetHealthCheck()), fmt.Sprintf("%d/%d", up, len(s.GetBackends())), s.GetVersion())
	}
	return t.flush()
}

func modeText(s *ikelbv1.Service) string {
	m := spec.ModeName(s.GetForwardingMode())
	if m == "" {
		m = spec.DefaultForwardingMode
	}
	if s.GetSnatAddress() != "" {
		m += " (snat " + s.GetSnatAddress() + ")"
	}
	return m
}

func checkShort(hc *ikelbv1.HealthCheck) string {
	typ := spec.HealthCheckTypeName(hc.GetType())
	if typ == "" {
		typ = spec.DefaultHealthCheckType
	}
	if typ == "none" {
		return typ
	}
	return typ + "/" + duration(hc.GetInterval())
}

func checkLong(hc *ikelbv1.HealthCheck) string {
	typ := spec.HealthCheckTypeName(hc.GetType())
	if typ == "" {
		typ = spec.DefaultHealthCheckType
	}
	if typ == "none" {
		return "none (backends are always up)"
	}
	s := fmt.Sprintf("%s every %s, timeout %s, rise %d, fall %d", typ, duration(hc.GetInterval()),
		duration(hc.GetTimeout()), hc.GetRise(), hc.GetFall())
	if typ == "ikev2" {
		s += fmt.Sprintf(", port %d", hc.GetPort())
	}
	return s
}

func (a *app) serviceGet(cmd *cobra.Command, args []string) error {
	c, err := a.client()
	if err != nil {
		return err
	}
	resp, err := call(a, cmd, c.GetService, &ikelbv1.GetServiceRequest{Name: args[0]})
	if err != nil {
		return err
	}
	s := resp.GetService()
	if a.output != "table" {
		return a.printServices(s, s)
	}
	snat := s.GetSnatAddress()
	if snat == "" && s.GetForwardingMode() != ikelbv1.ForwardingMode_FORWARDING_MODE_TRANSPARENT {
		snat = "(kernel's choice)"
	}
	key := spec.AffinityKeyName(s.GetAffinityKey())
	if key == "" {
		key = spec.DefaultAffinityKey
	}
	if err := keyValues(a.stdout,
		"Name", s.GetName(),
		"VIP", s.GetVip(),
		"Ports", ports(s.GetPorts()),
		"Persistence timeout", duration(s.GetPersistenceTimeout()),
		"Forwarding mode", modeText(s),
		"SNAT address", snat,
		"Affinity key", key,
		"Health check", checkLong(s.GetHealthCheck()),
		"Version", strconv.FormatUint(s.GetVersion(), 10),
	); err != nil {
		return err
	}
	fmt.Fprintln(a.stdout)
	return a.backendTable(s)
}

func (a *app) backendTable(s *ikelbv1.Service) error {
	t := newTable(a.stdout, "ADDRESS", "WEIGHT", "STATE", "HEALTH", "SINCE")
	for _, b := range s.GetBackends() {
		st := spec.StateName(b.GetState())
		if st == "" {
			st = spec.DefaultState
		}
		t.row(b.GetAddress(), b.GetWeight(), st, healthName(b.GetHealth()), a.age(b.GetHealthChanged()))
	}
	return t.flush()
}

func (a *app) serviceDelete(cmd *cobra.Command, args []string) error {
	c, err := a.client()
	if err != nil {
		return err
	}
	resp, err := call(a, cmd, c.DeleteService, &ikelbv1.DeleteServiceRequest{Name: args[0]})
	if err != nil {
		return err
	}
	if a.output != "table" {
		return a.printMessage(resp)
	}
	fmt.Fprintf(a.stdout, "service %s deleted\n", args[0])
	return nil
}

// serviceFlags are the settings of service create and update.
type serviceFlags struct {
	vip         string
	ports       []uint
	backends    []string
	persistence time.Duration
	mode        string
	snat        string
	health      string
	interval    time.Duration
	timeout     time.Duration
	rise, fall  uint32
	healthPort  uint16
}

func (f *serviceFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.vip, "vip", "", "virtual IP address")
	fs.UintSliceVar(&f.ports, "ports", nil, "UDP ports sharing one affinity table (default 500,4500)")
	fs.StringArrayVar(&f.backends, "backend", nil, "backend ADDR[:WEIGHT] (IPv6: [ADDR]:WEIGHT); repeat for each; on update replaces the list")
	fs.DurationVar(&f.persistence, "persistence-timeout", 0, "inactivity after which a client's affinity is forgotten (default 5m)")
	fs.StringVar(&f.mode, "mode", "", "forwarding mode: nat or transparent (default nat)")
	fs.StringVar(&f.snat, "snat", "", "nat mode: source address towards the backends (default: the kernel's choice); \"\" on update clears it")
	fs.StringVar(&f.health, "health", "", "health check: icmp, ikev2 or none (default icmp)")
	fs.DurationVar(&f.interval, "health-interval", 0, "health check interval (default 5s)")
	fs.DurationVar(&f.timeout, "health-timeout", 0, "health check timeout (default 2s)")
	fs.Uint32Var(&f.rise, "health-rise", 0, "successes before a backend is up (default 2)")
	fs.Uint32Var(&f.fall, "health-fall", 0, "failures before a backend is down (default 3)")
	fs.Uint16Var(&f.healthPort, "health-port", 0, "ikev2 probe port (default 500)")
}

// apply sets the fields whose flags were given on s.
func (f *serviceFlags) apply(fs *pflag.FlagSet, s *spec.Service) error {
	set := fs.Changed
	if set("vip") {
		s.VIP = f.vip
	}
	if set("ports") {
		s.Ports = s.Ports[:0]
		for _, p := range f.ports {
			if p == 0 || p > 65535 {
				return usagef("--ports: %d is not a port", p)
			}
			s.Ports = append(s.Ports, uint16(p))
		}
	}
	if set("backend") {
		s.Backends = nil
		for _, v := range f.backends {
			b, err := parseBackendFlag(v)
			if err != nil {
				return err
			}
			s.Backends = append(s.Backends, b)
		}
	}
	if set("persistence-timeout") {
		s.PersistenceTimeout = f.persistence
	}
	if set("mode") {
		s.ForwardingMode = f.mode
	}
	if set("snat") {
		s.SNATAddress = f.snat
	}
	if set("health") || set("health-interval") || set("health-timeout") || set("health-rise") || set("health-fall") || set("health-port") {
		if s.HealthCheck == nil {
			s.HealthCheck = &spec.HealthCheck{}
		}
		hc := s.HealthCheck
		if set("health") {
			hc.Type = f.health
		}
		if set("health-interval") {
			hc.Interval = f.interval
		}
		if set("health-timeout") {
			hc.Timeout = f.timeout
		}
		if set("health-rise") {
			hc.Rise = f.rise
		}
		if set("health-fall") {
			hc.Fall = f.fall
		}
		if set("health-port") {
			hc.Port = f.healthPort
		}
	}
	return nil
}

// parseBackendFlag parses ADDR[:WEIGHT]; an IPv6 address with a weight is
// written [ADDR]:WEIGHT.
func parseBackendFlag(v string) (spec.Backend, error) {
	if _, err := netip.ParseAddr(v); err == nil {
		return spec.Backend{Address: v}, nil
	}
	i := strings.LastIndexByte(v, ':')
	if i < 0 {
		return spec.Backend{Address: v}, nil
	}
	addr, w := strings.TrimSuffix(strings.TrimPrefix(v[:i], "["), "]"), v[i+1:]
	weight, err := strconv.ParseUint(w, 10, 32)
	if err != nil || weight == 0 || weight > spec.MaxWeight {
		return spec.Backend{}, usagef("--backend %q: weight %q is not a number in 1..%d", v, w, spec.MaxWeight)
	}
	return spec.Backend{Address: addr, Weight: uint32(weight)}, nil
}

// toProto validates a service built from flags; its problems are usage
// errors.
func toProto(s *spec.Service) (*ikelbv1.Service, error) {
	pb, err := s.Proto()
	if err != nil {
		var msgs []string
		for _, fe := range spec.FieldErrors(err) {
			msgs = append(msgs, fe.Error())
		}
		if len(msgs) == 0 {
			msgs = append(msgs, err.Error())
		}
		return nil, usagef("invalid service: %s", strings.Join(msgs, "; "))
	}
	return pb, nil
}

func newServiceCreateCmd(a *app) *cobra.Command {
	var f serviceFlags
	cmd := &cobra.Command{
		Use:   "create NAME --vip ADDR [flags]",
		Short: "Create a service",
		Example: `  ikelbctl service create vpn --vip 198.18.2.100 --persistence-timeout 8h \
    --backend 10.0.0.11 --backend 10.0.0.12:50 --health ikev2`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !cmd.Flags().Changed("vip") {
				return usagef("service create: --vip is required")
			}
			s := spec.Service{Name: args[0]}
			if err := f.apply(cmd.Flags(), &s); err != nil {
				return err
			}
			pb, err := toProto(&s)
			if err != nil {
				return err
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			resp, err := call(a, cmd, c.CreateService, &ikelbv1.CreateServiceRequest{Service: pb})
			if err != nil {
				return err
			}
			if a.output != "table" {
				return a.printServices(resp.GetService(), resp.GetService())
			}
			fmt.Fprintf(a.stdout, "service %s created (version %d)\n", resp.GetService().GetName(), resp.GetService().GetVersion())
			return nil
		},
	}
	f.register(cmd.Flags())
	return cmd
}

func newServiceUpdateCmd(a *app) *cobra.Command {
	var f serviceFlags
	cmd := &cobra.Command{
		Use:   "update NAME [flags]",
		Short: "Change a service's settings (compare-and-set against the version read)",
		Long: `Reads the service, changes the settings given as flags, and writes it back
only if nobody changed it in between (expected_version). --backend replaces the
whole backend list; use "backend add/remove/set" to change one backend.`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			cur, err := call(a, cmd, c.GetService, &ikelbv1.GetServiceRequest{Name: args[0]})
			if err != nil {
				return err
			}
			s := spec.FromProto(cur.GetService())
			if err := f.apply(cmd.Flags(), &s); err != nil {
				return err
			}
			pb, err := toProto(&s)
			if err != nil {
				return err
			}
			changes := spec.Changes(cur.GetService(), pb)
			out := cur.GetService()
			if changes != nil {
				resp, err := call(a, cmd, c.UpdateService, &ikelbv1.UpdateServiceRequest{
					Service: pb, ExpectedVersion: cur.GetService().GetVersion(),
				})
				if err != nil {
					return err
				}
				out = resp.GetService()
			}
			if a.output != "table" {
				return a.printServices(out, out)
			}
			if changes == nil {
				fmt.Fprintf(a.stdout, "service %s unchanged\n", args[0])
				return nil
			}
			fmt.Fprintf(a.stdout, "service %s updated: %s (version %d)\n", args[0], strings.Join(changes, ", "), out.GetVersion())
			return nil
		},
	}
	f.register(cmd.Flags())
	return cmd
}
