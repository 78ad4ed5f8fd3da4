package lswan

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ikelb/ikelb/test/netns"
	"github.com/ikelb/ikelb/test/swan"
)

// Sentinel errors.
var (
	// ErrNotInstalled reports that the private libreswan tree is missing or
	// incomplete (run install.sh).
	ErrNotInstalled = errors.New("lswan: libreswan not unpacked")
	// ErrNotEstablished reports that an IKE SA did not come up.
	ErrNotEstablished = errors.New("lswan: ike sa not established")
	// ErrExited reports that pluto exited (see its log).
	ErrExited = errors.New("lswan: pluto exited")
	// ErrParse reports whack output this package does not understand.
	ErrParse = errors.New("lswan: cannot parse whack output")
)

// Defaults.
const (
	// DefaultRoot is where install.sh unpacks libreswan unless
	// IKELB_LIBRESWAN_ROOT says otherwise.
	DefaultRoot = "/var/cache/ikelb-libreswan"
	// RootEnv names the environment variable that overrides DefaultRoot.
	RootEnv = "IKELB_LIBRESWAN_ROOT"

	DefaultPool     = swan.DefaultPool
	DefaultInnerNet = swan.DefaultInnerNet

	// ConnName is the name of the responder's connection.
	ConnName = "lb"
	// nickname of the responder's certificate and key in its NSS database.
	certNick = "responder"
	caNick   = "ca"

	startTimeout = 20 * time.Second
)

// Paths of the unpacked tree's programs, relative to Root()/root.
const (
	plutoRel    = "usr/libexec/ipsec/pluto"
	whackRel    = "usr/libexec/ipsec/whack"
	certutilRel = "usr/bin/certutil"
	pk12utilRel = "usr/bin/pk12util"
	libexecRel  = "usr/libexec"
	libRel      = "usr/lib/x86_64-linux-gnu"
)

// Root returns the directory install.sh unpacks into: $IKELB_LIBRESWAN_ROOT,
// or DefaultRoot.
func Root() string {
	if d := os.Getenv(RootEnv); d != "" {
		return d
	}
	return DefaultRoot
}

func tree(rel string) string { return filepath.Join(Root(), "root", rel) }

// InstallScript returns the path of install.sh in the source tree.
func InstallScript() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "install.sh")
}

// Check reports whether the unpacked tree is complete and openssl is found,
// with ErrNotInstalled when it is not.
func Check() error {
	if _, err := os.Stat(filepath.Join(Root(), ".complete")); err != nil {
		return fmt.Errorf("%w: %s: run %s", ErrNotInstalled, Root(), InstallScript())
	}
	for _, rel := range []string{plutoRel, whackRel, certutilRel, pk12utilRel} {
		if _, err := os.Stat(tree(rel)); err != nil {
			return fmt.Errorf("%w: %v: run %s", ErrNotInstalled, err, InstallScript())
		}
	}
	if openssl() == "" {
		return fmt.Errorf("%w: no openssl in PATH or %s", ErrNotInstalled, tree("usr/bin"))
	}
	return nil
}

var installOnce struct {
	sync.Once
	out []byte
	err error
}

// Require skips t unless namespaces can be made (netns.Require) and the
// private libreswan tree is there. With CI=true it fails instead of
// skipping, and it first runs install.sh (once per test binary) when the
// tree is missing.
func Require(t testing.TB) {
	t.Helper()
	netns.Require(t)
	err := Check()
	if err == nil {
		return
	}
	if os.Getenv("CI") != "true" {
		t.Skip(err)
	}
	installOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		installOnce.out, installOnce.err = exec.CommandContext(ctx, InstallScript(), Root()).CombinedOutput()
	})
	if installOnce.err != nil {
		t.Fatalf("lswan: %v; %s failed (CI=true: failing instead of skipping): %v\n%s", err, InstallScript(), installOnce.err, installOnce.out)
	}
	if err := Check(); err != nil {
		t.Fatalf("lswan: %v after running %s (CI=true: failing instead of skipping)", err, InstallScript())
	}
}

// openssl returns the path of openssl in PATH or in the tree, or "".
func openssl() string {
	if p, err := exec.LookPath("openssl"); err == nil {
		return p
	}
	if p := tree("usr/bin/openssl"); fileExists(p) {
		return p
	}
	return ""
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// Options configures a responder. The zero value of every field but CA and
// Address means its default.
type Options struct {
	// CA issues the responder's certificate and is its only trust anchor for
	// initiators. Required.
	CA *swan.CA
	// Name is the responder's IKE identity (an FQDN ID; the certificate's CN
	// and DNS subjectAltName) and the name of its log. Default "libreswan".
	Name string
	// Address is the responder's own address in its namespace (left=).
	// Required.
	Address string
	// Pool is the virtual IP pool (CIDR) answering initiators' requests.
	Pool string
	// InnerNet is the responder's side of the CHILD SA's traffic selectors
	// (leftsubnet=), the initiators' remote_ts.
	InnerNet string
	// Debug turns on pluto's full debug log (plutodebug=all).
	Debug bool
}

func (o *Options) defaults() {
	if o.Name == "" {
		o.Name = "libreswan"
	}
	if o.Pool == "" {
		o.Pool = DefaultPool
	}
	if o.InnerNet == "" {
		o.InnerNet = DefaultInnerNet
	}
}

// Pluto is a running libreswan responder in a namespace.
type Pluto struct {
	// set once
	t    testing.TB
	opts Options
	id   swan.Identity
	ns   *netns.NS
	dir  string // ipsec.conf, ipsec.secrets, nss/, run/ (pluto.ctl)
	proc *netns.Proc
}

// StartResponder starts pluto in ns as a responder and waits until its
// connection is loaded. It fails the test on error.
func StartResponder(t testing.TB, lab *netns.Lab, ns *netns.NS, opts Options) *Pluto {
	t.Helper()
	opts.defaults()
	if opts.CA == nil {
		t.Fatalf("lswan: %s: Options.CA is required", opts.Name)
	}
	if _, err := netip.ParseAddr(opts.Address); err != nil {
		t.Fatalf("lswan: %s: Address %q: %v", opts.Name, opts.Address, err)
	}
	if err := Check(); err != nil {
		t.Fatal(err)
	}
	p := &Pluto{t: t, opts: opts, ns: ns, dir: lab.MkDir("pluto-" + opts.Name)}
	p.id = opts.CA.Issue(opts.Name)
	if err := p.writeConfig(); err != nil {
		t.Fatalf("lswan: %s: %v", opts.Name, err)
	}
	if err := p.makeNSS(); err != nil {
		t.Fatalf("lswan: %s: %v", opts.Name, err)
	}
	p.proc = lab.StartSpec(ns, opts.Name, netns.Spec{
		Args: []string{tree(plutoRel), "--nofork", "--stderrlog",
			"--config", p.path("ipsec.conf"), "--secretsfile", p.path("ipsec.secrets"),
			"--ipsecdir", p.dir, "--nssdir", p.path("nss"), "--rundir", "/run"},
		Env: []string{"LD_LIBRARY_PATH=" + tree(libRel)},
		Binds: []netns.Bind{
			netns.PrivateRun(p.path("run")),
			{Src: tree(libexecRel), Dst: "/usr/libexec"},
		},
	})

	// pluto loads the connection by running addconn itself; wait for it.
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	var last string
	for {
		out, err := p.Whack(ctx, "--status")
		if err == nil && strings.Contains(out, `"`+ConnName+`":`) {
			return p
		}
		last = fmt.Sprint(out, err)
		if exited, err := p.proc.Exited(); exited {
			t.Fatalf("lswan: %s: %v (%v)", opts.Name, ErrExited, err)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("lswan: %s: connection %q not loaded within %v: %s", opts.Name, ConnName, startTimeout, last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (p *Pluto) path(name string) string { return filepath.Join(p.dir, name) }

func (p *Pluto) writeConfig() error {
	o := p.opts
	debug := "none"
	if o.Debug {
		debug = "all"
	}
	// right=%any with rightid=%fromcert: any initiator whose certificate
	// chains to the CA (rightca=%same: the CA of leftcert).
	conf := fmt.Sprintf(`config setup
	plutodebug=%s
	dnssec-enable=no
	uniqueids=no

conn %s
	ikev2=insist
	authby=rsasig
	fragmentation=yes
	left=%s
	leftid=@%s
	leftcert=%s
	leftsendcert=always
	leftsubnet=%s
	right=%%any
	rightid=%%fromcert
	rightca=%%same
	rightaddresspool=%s
	narrowing=yes
	auto=add
`, debug, ConnName, o.Address, p.id.Name, certNick, o.InnerNet, o.Pool)
	files := map[string][]byte{
		"ipsec.conf":    []byte(conf),
		"ipsec.secrets": nil, // the private key is in NSS
		"cert.pem":      p.id.CertPEM,
		"key.pem":       p.id.KeyPEM,
		"ca.pem":        o.CA.CertPEM(),
	}
	for _, d := range []string{"run/pluto", "nss"} { // run/pluto: pluto's dumpdir
		if err := os.MkdirAll(p.path(d), 0o700); err != nil {
			return err
		}
	}
	for name, b := range files {
		if err := os.WriteFile(p.path(name), b, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// makeNSS creates the NSS database with the CA trusted for peer
// certificates and the responder's certificate and key (by PKCS#12; 3DES
// and SHA-1 so NSS takes it whatever openssl's defaults).
func (p *Pluto) makeNSS() error {
	db := "sql:" + p.path("nss")
	p12 := p.path("responder.p12")
	steps := [][]string{
		{tree(certutilRel), "-N", "-d", db, "--empty-password"},
		{tree(certutilRel), "-A", "-d", db, "-n", caNick, "-t", "CT,,", "-i", p.path("ca.pem")},
		{openssl(), "pkcs12", "-export", "-in", p.path("cert.pem"), "-inkey", p.path("key.pem"),
			"-name", certNick, "-passout", "pass:", "-out", p12,
			"-keypbe", "PBE-SHA1-3DES", "-certpbe", "PBE-SHA1-3DES", "-macalg", "sha1"},
		{tree(pk12utilRel), "-i", p12, "-d", db, "-W", ""},
	}
	for _, s := range steps {
		cmd := exec.Command(s[0], s[1:]...)
		cmd.Env = append(os.Environ(), "LD_LIBRARY_PATH="+tree(libRel))
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %w: %s", strings.Join(s, " "), err, out)
		}
	}
	return nil
}

// Whack runs libreswan's whack against this pluto's control socket (the
// --ctlsocket is added) and returns its output.
func (p *Pluto) Whack(ctx context.Context, args ...string) (string, error) {
	// The socket is in pluto's private /run; reach it through pluto's own
	// mount namespace: the Lab's directory can be longer than a socket
	// address allows (108 bytes).
	full := append([]string{"--ctlsocket", fmt.Sprintf("/proc/%d/root/run/pluto.ctl", p.proc.Pid())}, args...)
	cmd := exec.CommandContext(ctx, tree(whackRel), full...)
	cmd.Env = append(os.Environ(), "LD_LIBRARY_PATH="+tree(libRel))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("lswan: %s: whack %s: %w", p.opts.Name, strings.Join(args, " "), err)
	}
	return string(out), nil
}

// Name returns the responder's IKE identity.
func (p *Pluto) Name() string { return p.id.Name }

// Options returns the options pluto runs with, defaults filled in.
func (p *Pluto) Options() Options { return p.opts }

// NS returns the namespace pluto runs in.
func (p *Pluto) NS() *netns.NS { return p.ns }

// Proc returns the pluto process.
func (p *Pluto) Proc() *netns.Proc { return p.proc }

// Log returns pluto's log so far.
func (p *Pluto) Log() string { return p.proc.Log() }

// CountLog returns how many lines of pluto's log contain substr.
func (p *Pluto) CountLog(substr string) int {
	return p.proc.CountLog(substr)
}

// Stop stops pluto: SIGTERM, then SIGKILL to its process group after 5s.
func (p *Pluto) Stop() error {
	if err := p.proc.Signal(syscall.SIGTERM); err != nil {
		if errors.Is(err, netns.ErrExited) {
			return nil
		}
		return err
	}
	select {
	case <-p.proc.Done():
		return nil
	case <-time.After(5 * time.Second):
		return p.proc.Kill()
	}
}
