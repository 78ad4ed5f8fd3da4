package swan

import (
	"bytes"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"testing"
)

func TestCAIssue(t *testing.T) {
	ca := NewCA(t, Bits(2048))
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(ca.CertPEM()) {
		t.Fatal("CA certificate does not parse")
	}
	a, b := ca.Issue("a.ikelb.test"), ca.Issue("b.ikelb.test")
	for _, id := range []Identity{a, b} {
		blk, _ := pem.Decode(id.CertPEM)
		if blk == nil {
			t.Fatalf("%s: certificate is not PEM", id.Name)
		}
		cert, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: id.Name, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("%s: %v", id.Name, err)
		}
		if cert.Subject.CommonName != id.Name {
			t.Errorf("%s: CN %q", id.Name, cert.Subject.CommonName)
		}
		pub, ok := cert.PublicKey.(*rsa.PublicKey)
		if !ok || pub.N.BitLen() != 2048 {
			t.Errorf("%s: public key %T, want RSA 2048", id.Name, cert.PublicKey)
		}
	}
	if bytes.Equal(a.KeyPEM, b.KeyPEM) {
		t.Error("two identities of one CA share a key")
	}
	// A second CA of the same size in this binary reuses the cached CA and keys.
	ca2 := NewCA(t, Bits(2048))
	if !bytes.Equal(ca2.CertPEM(), ca.CertPEM()) {
		t.Error("CA not cached")
	}
	if a2 := ca2.Issue("a.ikelb.test"); !bytes.Equal(a2.KeyPEM, a.KeyPEM) {
		t.Error("keys not reused from the cache")
	}
}
