package swan

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// DefaultBits is the RSA key size of NewCA without Bits. With 4096-bit keys,
// IKE_AUTH with certificates is about 2 KB and fragments at the default
// FragmentSize (1280), like it does in production.
const DefaultBits = 4096

// pkiConf keeps pki from loading every plugin (the tpm plugin complains on
// every run here).
const pkiConf = `pki {
	load = random nonce openssl pem pkcs1 pkcs8 x509 pubkey gmp sha1 sha2 hmac
}
`

// CA is a throw-away certificate authority. Make it with NewCA.
type CA struct {
	// set once
	t    testing.TB
	bits int
	dir  string // ca-cert.pem, ca-key.pem, strongswan.conf for pki

	mu     sync.Mutex // guards the following
	issued int
}

// CAOption configures NewCA.
type CAOption func(*caOptions)

type caOptions struct{ bits int }

// Bits sets the RSA key size of the CA and of the keys it issues
// certificates for (2048, 3072 or 4096).
func Bits(n int) CAOption { return func(o *caOptions) { o.bits = n } }

// Identity is an IKE identity with its certificate and private key.
type Identity struct {
	// Name is the IKE identity: the certificate's CN and its DNS subjectAltName.
	Name    string
	CertPEM []byte
	KeyPEM  []byte
}

// keyCache holds, per key size, the CA's key and certificate and the keys
// handed out so far, for the life of the test binary.
var keyCache struct {
	sync.Mutex
	ca   map[int]*Identity
	keys map[int][][]byte
}

// NewCA returns a CA whose key and certificate are cached per key size for
// the life of the test binary; its files are written to a t.TempDir().
func NewCA(t testing.TB, opts ...CAOption) *CA {
	t.Helper()
	o := caOptions{bits: DefaultBits}
	for _, f := range opts {
		f(&o)
	}
	switch o.bits {
	case 2048, 3072, 4096:
	default:
		t.Fatalf("swan: unsupported RSA key size %d", o.bits)
	}
	if _, err := exec.LookPath("pki"); err != nil {
		t.Fatalf("swan: needs strongSwan's pki (strongswan-pki): %v", err)
	}
	ca := &CA{t: t, bits: o.bits, dir: t.TempDir()}
	if err := os.WriteFile(filepath.Join(ca.dir, "strongswan.conf"), []byte(pkiConf), 0o644); err != nil {
		t.Fatal(err)
	}
	keyCache.Lock()
	defer keyCache.Unlock()
	if keyCache.ca == nil {
		keyCache.ca = map[int]*Identity{}
		keyCache.keys = map[int][][]byte{}
	}
	id := keyCache.ca[o.bits]
	if id == nil {
		key, err := ca.genKey()
		if err != nil {
			t.Fatal(err)
		}
		if err := ca.write("ca-key.pem", key); err != nil {
			t.Fatal(err)
		}
		cert, err := ca.pki("--self", "--ca", "--lifetime", "3650", "--type", "priv",
			"--in", ca.path("ca-key.pem"), "--dn", "O=ikelb, CN=ikelb test CA "+strconv.Itoa(o.bits),
			"--outform", "pem")
		if err != nil {
			t.Fatal(err)
		}
		id = &Identity{Name: "ikelb test CA", CertPEM: cert, KeyPEM: key}
		keyCache.ca[o.bits] = id
	}
	for name, b := range map[string][]byte{"ca-key.pem": id.KeyPEM, "ca-cert.pem": id.CertPEM} {
		if err := ca.write(name, b); err != nil {
			t.Fatal(err)
		}
	}
	return ca
}

// Bits returns the RSA key size of the CA's keys.
func (ca *CA) Bits() int { return ca.bits }

// CertPEM returns the CA certificate.
func (ca *CA) CertPEM() []byte {
	b, err := os.ReadFile(ca.path("ca-cert.pem"))
	if err != nil {
		ca.t.Fatal(err)
	}
	return b
}

// Prepare makes sure n keys are cached (beyond those this CA already handed
// out), generating the missing ones in parallel, one per CPU. Issue generates
// keys on demand anyway; Prepare only makes that faster.
func (ca *CA) Prepare(n int) {
	ca.t.Helper()
	ca.mu.Lock()
	want := ca.issued + n
	ca.mu.Unlock()
	if err := ca.ensureKeys(want); err != nil {
		ca.t.Fatal(err)
	}
}

// ensureKeys generates keys until the cache holds at least total.
func (ca *CA) ensureKeys(total int) error {
	keyCache.Lock()
	missing := total - len(keyCache.keys[ca.bits])
	keyCache.Unlock()
	if missing <= 0 {
		return nil
	}
	keys := make([][]byte, missing)
	errs := make([]error, missing)
	var wg sync.WaitGroup
	sem := make(chan struct{}, runtime.NumCPU())
	for i := range keys {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			keys[i], errs[i] = ca.genKey()
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	keyCache.Lock()
	keyCache.keys[ca.bits] = append(keyCache.keys[ca.bits], keys...)
	keyCache.Unlock()
	return nil
}

// Issue returns a new identity name (used as CN and DNS subjectAltName),
// with a certificate signed by the CA. Each Issue of one CA uses a different
// key; keys come from the binary-wide cache.
func (ca *CA) Issue(name string) Identity {
	ca.t.Helper()
	ca.mu.Lock()
	idx := ca.issued
	ca.issued++
	ca.mu.Unlock()
	if err := ca.ensureKeys(idx + 1); err != nil {
		ca.t.Fatal(err)
	}
	keyCache.Lock()
	key := keyCache.keys[ca.bits][idx]
	keyCache.Unlock()

	keyFile := ca.path(fmt.Sprintf("key-%d.pem", idx))
	if err := ca.write(filepath.Base(keyFile), key); err != nil {
		ca.t.Fatal(err)
	}
	cert, err := ca.pki("--issue", "--cacert", ca.path("ca-cert.pem"), "--cakey", ca.path("ca-key.pem"),
		"--type", "priv", "--in", keyFile, "--dn", "O=ikelb, CN="+name, "--san", name,
		"--lifetime", "2", "--outform", "pem")
	if err != nil {
		ca.t.Fatal(err)
	}
	return Identity{Name: name, CertPEM: cert, KeyPEM: key}
}

func (ca *CA) genKey() ([]byte, error) {
	return ca.pki("--gen", "--type", "rsa", "--size", strconv.Itoa(ca.bits), "--outform", "pem")
}

func (ca *CA) pki(args ...string) ([]byte, error) {
	cmd := exec.Command("pki", args...)
	cmd.Env = append(os.Environ(), "STRONGSWAN_CONF="+ca.path("strongswan.conf"))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("swan: pki %s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return out, nil
}

func (ca *CA) path(name string) string { return filepath.Join(ca.dir, name) }

func (ca *CA) write(name string, b []byte) error {
	return os.WriteFile(ca.path(name), b, 0o600)
}
