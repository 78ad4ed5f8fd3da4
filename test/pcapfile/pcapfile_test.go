package pcapfile

import (
	"errors"
	"testing"
)

// The capture's README says: 56 datagrams, IKE_SA_INIT on 500 from three
// clients behind 198.18.1.2 to the VIP 198.18.2.100.
func TestReadCapture(t *testing.T) {
	ds, err := Read(Capture())
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 56 {
		t.Fatalf("%d datagrams, want 56", len(ds))
	}
	first := ds[0]
	if first.Src.Addr().String() != "198.18.1.2" || first.Dst.String() != "198.18.2.100:500" {
		t.Fatalf("first datagram %v → %v", first.Src, first.Dst)
	}
	if len(first.Payload) < 28 || first.Payload[17] != 0x20 || first.Payload[18] != 34 {
		t.Fatalf("first datagram is not an IKE_SA_INIT: % x", first.Payload[:min(28, len(first.Payload))])
	}
}

func TestParseRejectsGarbage(t *testing.T) {
	for _, b := range [][]byte{nil, make([]byte, 24), []byte("not a pcap file at all, no")} {
		if _, err := Parse(b); !errors.Is(err, ErrFormat) {
			t.Errorf("Parse(%q) = %v, want ErrFormat", b, err)
		}
	}
}
