package swan

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ikelb/ikelb/test/netns"
)

// Sentinel errors.
var (
	// ErrNotEstablished reports that an IKE or CHILD SA did not come up.
	ErrNotEstablished = errors.New("swan: sa not established")
	// ErrExited reports that charon exited (see its log).
	ErrExited = errors.New("swan: charon exited")
)

// Defaults of Options.
const (
	DefaultPool         = "10.201.0.0/24"
	DefaultInnerNet     = "10.250.0.0/16"
	DefaultInnerAddr    = "10.250.0.1"
	DefaultFragmentSize = 1280
	DefaultThreads      = 16
	// charonBinary is where Debian installs charon.
	charonBinary = "/usr/lib/ipsec/charon"
	// connName is the name of the connection and its child on both sides.
	connName = "lb"
)

// Plugins is the explicit plugin list charon loads. kdf is required by 5.9.8
// in an explicit list; kernel-libipsec replaces the missing kernel ESP.
var Plugins = []string{
	"random", "nonce", "openssl", "pem", "pkcs1", "pkcs8", "x509", "revocation",
	"constraints", "pubkey", "kdf", "hmac", "gmp", "sha1", "sha2", "aes",
	"kernel-libipsec", "kernel-netlink", "socket-default", "vici",
}

// Options configures a charon. The zero value of every field means its default.
type Options struct {
	// CA issues the charon's certificate and is its only trust anchor. Required.
	CA *CA
	// Name is the charon's IKE identity (certificate CN and SAN) and the name
	// of its log. Default "responder" or "initiator".
	Name string

	// Remote is the address an initiator connects to: a responder's, or the
	// balancer VIP. Required for initiators.
	Remote string
	// Pool is the responder's virtual IP pool (CIDR).
	Pool string
	// InnerNet is the network behind the responders (CIDR): the responder's
	// local traffic selector and the initiator's remote one.
	InnerNet string
	// InnerAddr is the responder's address inside InnerNet, put on the
	// loopback of its namespace (this kernel has no dummy interfaces); a Ping
	// to it crosses the tunnel.
	InnerAddr string

	// DPD is the dead peer detection interval (dpd_delay); 0 turns DPD off.
	DPD time.Duration
	// FragmentSize is charon.fragment_size, the largest IKE datagram before
	// IKE fragmentation.
	FragmentSize int
	// Threads is charon's thread count. Keep the default 16: with fewer,
	// kernel-libipsec's jobs can starve vici.
	Threads int
	// RetransmitTimeout and RetransmitTries are charon's retransmission
	// settings (defaults: strongSwan's, 4 s and 5).
	RetransmitTimeout time.Duration
	RetransmitTries   int
	// LogLevel is charon's log level for every subsystem (-1 silent .. 4);
	// 0 means the default 1, which logs IKE fragmentation, every packet sent
	// and received with its addresses, and SA state changes.
	LogLevel int
	// ExtraConf is added verbatim inside the charon { } section of
	// strongswan.conf.
	ExtraConf string
}

// Role is a charon's role.
type Role string

// The roles.
const (
	Responder Role = "responder" // made by StartResponder
	Initiator Role = "initiator" // made by StartInitiator
)

// Charon is a running charon daemon in a namespace.
type Charon struct {
	// set once
	t    testing.TB
	role Role
	id   Identity
	opts Options
	ns   *netns.NS
	dir  string // strongswan.conf, swanctl/, run/, charon.vici
	uri  string
	proc *netns.Proc
}

// StartResponder starts a responder charon in ns and waits until its
// configuration is loaded. It accepts any initiator with a certificate from
// opts.CA, assigns virtual IPs from opts.Pool and serves opts.InnerAddr.
func StartResponder(t testing.TB, lab *netns.Lab, ns *netns.NS, opts Options) *Charon {
	t.Helper()
	opts.defaults(Responder)
	ns.AddAddr("lo", opts.InnerAddr+"/32")
	return start(t, lab, ns, Responder, opts)
}

// StartInitiator starts an initiator charon in ns and waits until its
// configuration is loaded; it connects only when Initiate is called.
func StartInitiator(t testing.TB, lab *netns.Lab, ns *netns.NS, opts Options) *Charon {
	t.Helper()
	opts.defaults(Initiator)
	if _, err := netip.ParseAddr(opts.Remote); err != nil {
		t.Fatalf("swan: initiator %s: Remote %q: %v", opts.Name, opts.Remote, err)
	}
	return start(t, lab, ns, Initiator, opts)
}

func (o *Options) defaults(role Role) {
	if o.Name == "" {
		o.Name = string(role)
	}
	if o.Pool == "" {
		o.Pool = DefaultPool
	}
	if o.InnerNet == "" {
		o.InnerNet = DefaultInnerNet
	}
	if o.InnerAddr == "" {
		o.InnerAddr = DefaultInnerAddr
	}
	if o.FragmentSize == 0 {
		o.FragmentSize = DefaultFragmentSize
	}
	if o.Threads == 0 {
		o.Threads = DefaultThreads
	}
	if o.LogLevel == 0 {
		o.LogLevel = 1
	}
}

func start(t testing.TB, lab *netns.Lab, ns *netns.NS, role Role, opts Options) *Charon {
	t.Helper()
	if opts.CA == nil {
		t.Fatalf("swan: %s %s: Options.CA is required", role, opts.Name)
	}
	if _, err := os.Stat(charonBinary); err != nil {
		t.Fatalf("swan: needs %s (strongswan-charon): %v", charonBinary, err)
	}
	c := &Charon{t: t, role: role, opts: opts, ns: ns, dir: lab.MkDir("charon-" + opts.Name)}
	c.uri = "unix://" + c.path("charon.vici")
	c.id = opts.CA.Issue(opts.Name)
	if err := c.writeConfig(); err != nil {
		t.Fatal(err)
	}
	c.proc = lab.StartSpec(ns, opts.Name, netns.Spec{
		Args:  []string{charonBinary},
		Env:   []string{"STRONGSWAN_CONF=" + c.path("strongswan.conf")},
		Binds: []netns.Bind{netns.PrivateRun(c.path("run"))},
	})
	// Wait for vici, then load connections, credentials and pools.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for {
		if _, err := c.swanctl(ctx, "--stats"); err == nil {
			break
		}
		if exited, err := c.proc.Exited(); exited {
			t.Fatalf("swan: %s: %v (%v)", opts.Name, ErrExited, err)
		}
		if ctx.Err() != nil {
			t.Fatalf("swan: %s: vici at %s not up within 20s", opts.Name, c.uri)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if out, err := c.swanctl(ctx, "--load-all", "--noprompt"); err != nil {
		t.Fatalf("swan: %s: load config: %v\n%s", opts.Name, err, out)
	}
	return c
}

func (c *Charon) path(name string) string { return filepath.Join(c.dir, name) }

func (c *Charon) writeConfig() error {
	o := c.opts
	var retransmit string
	if o.RetransmitTimeout > 0 {
		retransmit += fmt.Sprintf("\tretransmit_timeout = %g\n", o.RetransmitTimeout.Seconds())
	}
	if o.RetransmitTries > 0 {
		retransmit += fmt.Sprintf("\tretransmit_tries = %d\n", o.RetransmitTries)
	}
	conf := fmt.Sprintf(`charon {
	load = %s
	threads = %d
	fragment_size = %d
	port = 500
	port_nat_t = 4500
	install_virtual_ip = yes
%s	filelog {
		stderr {
			default = %d
			ike_name = yes
			time_format = %%H:%%M:%%S
			flush_line = yes
		}
	}
	syslog {
		daemon {
			default = -1
		}
	}
	plugins {
		vici {
			socket = %s
		}
	}
%s
}
`, strings.Join(Plugins, " "), o.Threads, o.FragmentSize, retransmit, o.LogLevel, c.uri, o.ExtraConf)

	dpd := ""
	if o.DPD > 0 {
		dpd = fmt.Sprintf("\t\tdpd_delay = %ds\n", int(o.DPD.Round(time.Second)/time.Second))
	}
	var swanctl string
	switch c.role {
	case Responder:
		swanctl = fmt.Sprintf(`connections {
	%[1]s {
		version = 2
		pools = pool
		fragmentation = yes
%[2]s		local {
			auth = pubkey
			certs = cert.pem
			id = %[3]s
		}
		remote {
			auth = pubkey
		}
		children {
			%[1]s {
				local_ts = %[4]s
				dpd_action = clear
			}
		}
	}
}
pools {
	pool {
		addrs = %[5]s
	}
}
`, connName, dpd, c.id.Name, o.InnerNet, o.Pool)
	case Initiator:
		swanctl = fmt.Sprintf(`connections {
	%[1]s {
		version = 2
		remote_addrs = %[2]s
		vips = 0.0.0.0
		fragmentation = yes
		keyingtries = 1
%[3]s		local {
			auth = pubkey
			certs = cert.pem
			id = %[4]s
		}
		remote {
			auth = pubkey
		}
		children {
			%[1]s {
				remote_ts = %[5]s
				dpd_action = clear
			}
		}
	}
}
`, connName, o.Remote, dpd, c.id.Name, o.InnerNet)
	}

	files := map[string][]byte{
		"strongswan.conf":         []byte(conf),
		"swanctl/swanctl.conf":    []byte(swanctl),
		"swanctl/x509/cert.pem":   c.id.CertPEM,
		"swanctl/x509ca/ca.pem":   o.CA.CertPEM(),
		"swanctl/private/key.pem": c.id.KeyPEM,
	}
	if err := os.MkdirAll(c.path("run"), 0o755); err != nil {
		return err
	}
	for name, b := range files {
		p := c.path(name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// swanctl runs swanctl against this charon's vici socket.
func (c *Charon) swanctl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "swanctl", append(args, "--uri", c.uri)...)
	cmd.Env = append(os.Environ(), "SWANCTL_DIR="+c.path("swanctl"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("swan: %s: swanctl %s: %w", c.opts.Name, strings.Join(args, " "), err)
	}
	return string(out), nil
}

// Swanctl runs swanctl with args against this charon (the --uri is added).
func (c *Charon) Swanctl(ctx context.Context, args ...string) (string, error) {
	return c.swanctl(ctx, args...)
}

// Name returns the charon's IKE identity.
func (c *Charon) Name() string { return c.id.Name }

// Role returns whether this is a responder or an initiator.
func (c *Charon) Role() Role { return c.role }

// NS returns the namespace the charon runs in.
func (c *Charon) NS() *netns.NS { return c.ns }

// Options returns the options the charon runs with, defaults filled in.
func (c *Charon) Options() Options { return c.opts }

// URI returns the vici URI (for swanctl --uri).
func (c *Charon) URI() string { return c.uri }

// Proc returns the charon process.
func (c *Charon) Proc() *netns.Proc { return c.proc }

// Log returns charon's log so far.
func (c *Charon) Log() string { return c.proc.Log() }

// CountLog returns how many lines of charon's log contain substr, e.g.
// "splitting IKE message" (IKE fragmentation by this charon) or
// "reassembled fragmented IKE message" (by its peer).
func (c *Charon) CountLog(substr string) int {
	return c.proc.CountLog(substr)
}

// Initiate brings up the IKE SA and its CHILD SA and returns when both are
// established, or with an error when they failed or ctx ended. Initiators only.
func (c *Charon) Initiate(ctx context.Context) error {
	if c.role != Initiator {
		return fmt.Errorf("swan: %s: initiate: not an initiator", c.opts.Name)
	}
	args := []string{"--initiate", "--child", connName}
	if dl, ok := ctx.Deadline(); ok {
		secs := int(time.Until(dl) / time.Second)
		if secs < 1 {
			secs = 1
		}
		args = append(args, "--timeout", strconv.Itoa(secs))
	}
	out, err := c.swanctl(ctx, args...)
	if err != nil {
		return fmt.Errorf("%w: %w\n%s", ErrNotEstablished, err, out)
	}
	return nil
}

// Terminate deletes the IKE SA (and its CHILD SAs) of an initiator.
func (c *Charon) Terminate(ctx context.Context) error {
	out, err := c.swanctl(ctx, "--terminate", "--ike", connName, "--force", "--timeout", "5")
	if err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	return nil
}

// VirtualIP returns the initiator's virtual IP from its established IKE SA.
func (c *Charon) VirtualIP() (netip.Addr, error) {
	sas, err := c.ListSAs()
	if err != nil {
		return netip.Addr{}, err
	}
	for _, sa := range sas {
		if sa.State == "ESTABLISHED" && len(sa.LocalVIPs) > 0 {
			return sa.LocalVIPs[0], nil
		}
	}
	return netip.Addr{}, fmt.Errorf("%w: %s has no virtual ip", ErrNotEstablished, c.opts.Name)
}

// WaitSAs polls ListSAs until at least n IKE SAs are ESTABLISHED with an
// INSTALLED CHILD SA each, and returns those; or fails with the last listing
// when ctx ends.
func (c *Charon) WaitSAs(ctx context.Context, n int) ([]IKESA, error) {
	var last []IKESA
	var lastErr error
	for {
		sas, err := c.ListSAs()
		last, lastErr = sas, err
		var up []IKESA
		for _, sa := range sas {
			if sa.Up() {
				up = append(up, sa)
			}
		}
		if err == nil && len(up) >= n {
			return up, nil
		}
		if exited, _ := c.proc.Exited(); exited {
			return nil, fmt.Errorf("%w: %s", ErrExited, c.opts.Name)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %s: want %d up, have %+v (%v)", ErrNotEstablished, c.opts.Name, n, last, lastErr)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Ping sends pings from the initiator's virtual IP to dst, an address behind
// the tunnel, until one is answered or ctx ends.
func (c *Charon) Ping(ctx context.Context, dst string) error {
	vip, err := c.VirtualIP()
	if err != nil {
		return err
	}
	var out string
	for {
		out, err = c.ns.RunContext(ctx, "ping", "-n", "-c1", "-W1", "-I", vip.String(), dst)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("swan: %s: ping %s from %s through the tunnel: %w\n%s", c.opts.Name, dst, vip, err, out)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Stop stops charon: SIGTERM, then SIGKILL to its process group after 5s.
func (c *Charon) Stop() error {
	if err := c.proc.Signal(syscall.SIGTERM); err != nil {
		if errors.Is(err, netns.ErrExited) {
			return nil
		}
		return err
	}
	select {
	case <-c.proc.Done():
		return nil
	case <-time.After(5 * time.Second):
		return c.proc.Kill()
	}
}
