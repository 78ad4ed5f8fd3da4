package dataplane

import (
	"bytes"
	"errors"
	"testing"
)

func TestClassifyTable(t *testing.T) {
	init4500 := MinimalIKESAInit(0x1122334455667788, true)
	init500 := MinimalIKESAInit(0x1122334455667788, false)
	v1 := bytes.Clone(init500)
	v1[17] = 0x10
	badVer := bytes.Clone(init500)
	badVer[17] = 0x30
	badLen := bytes.Clone(init500)
	badLen[27] = 29
	tests := []struct {
		name string
		port uint16
		d    []byte
		want Class
	}{
		{"empty 500", 500, nil, ClassMalformed},
		{"empty 4500", 4500, nil, ClassMalformed},
		{"ike 500", 500, init500, ClassIKE},
		{"ike 4500", 4500, init4500, ClassIKE},
		{"ike without marker on 4500 looks like esp", 4500, init500, ClassESP},
		{"marker on 500 is not ike", 500, init4500, ClassMalformed},
		{"isakmp 500", 500, v1, ClassISAKMP},
		{"bad version", 500, badVer, ClassMalformed},
		{"bad length", 500, badLen, ClassMalformed},
		{"short ike", 500, init500[:27], ClassMalformed},
		{"keepalive", 4500, []byte{0xff}, ClassKeepalive},
		{"keepalive on 500", 500, []byte{0xff}, ClassMalformed},
		{"two ff", 4500, []byte{0xff, 0xff}, ClassMalformed},
		{"single zero", 4500, []byte{0}, ClassMalformed},
		{"marker only", 4500, []byte{0, 0, 0, 0}, ClassMalformed},
		{"marker short ike", 4500, init4500[:20], ClassMalformed},
		{"esp", 4500, []byte{0x58, 0x0b, 0x8b, 0x3e, 0, 0, 0, 1}, ClassESP},
		{"esp too short", 4500, []byte{0x58, 0x0b, 0x8b, 0x3e, 0, 0, 0}, ClassMalformed},
		{"custom port is natt framed", 14500, []byte{0xff}, ClassKeepalive},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Classify(tt.port, tt.d); got != tt.want {
				t.Errorf("Classify(%d, % x) = %v, want %v", tt.port, tt.d, got, tt.want)
			}
		})
	}
}

func TestParseIKEHeaderErrors(t *testing.T) {
	good := MinimalIKESAInit(7, false)
	badVer := bytes.Clone(good)
	badVer[17] = 0x00
	tests := []struct {
		name string
		d    []byte
		want error
	}{
		{"ok", good, nil},
		{"short", good[:10], ErrShortIKE},
		{"version", badVer, ErrIKEVersion},
		{"length", append(bytes.Clone(good), 0), ErrIKELength},
	}
	for _, tt := range tests {
		_, err := ParseIKEHeader(tt.d)
		if !errors.Is(err, tt.want) || (tt.want == nil) != (err == nil) {
			t.Errorf("%s: err = %v, want %v", tt.name, err, tt.want)
		}
	}
}

func TestAppendParseRoundTrip(t *testing.T) {
	h := IKEHeader{SPIi: 1<<63 | 5, SPIr: 9, NextPayload: 33, Version: 0x20,
		Exchange: ExchangeIKEAuth, Flags: FlagResponse, MessageID: 0xdeadbeef, Length: IKEHeaderLen}
	got, err := ParseIKEHeader(AppendIKEHeader(nil, h))
	if err != nil || got != h {
		t.Fatalf("round trip = %+v, %v; want %+v", got, err, h)
	}
	_, c, err := ParseNATT(MinimalIKESAInit(3, true))
	if c != ClassIKE || err != nil {
		t.Fatalf("ParseNATT(minimal) = %v, %v", c, err)
	}
	if _, c, err := ParseNATT([]byte{0xff}); c != ClassKeepalive || !errors.Is(err, ErrNotIKE) {
		t.Fatalf("ParseNATT(keepalive) = %v, %v", c, err)
	}
}

// TestClassifyCapture checks every datagram of the real strongSwan capture.
func TestClassifyCapture(t *testing.T) {
	counts := map[Class]int{}
	spis := map[uint64]bool{} // initiator SPIs seen on 500
	for i, d := range loadCapture(t) {
		port := d.Dst.Port()
		if d.Src.Port() == 500 || d.Src.Port() == 4500 {
			port = d.Src.Port() // replies: the VIP side's port
		}
		c := Classify(port, d.Payload)
		counts[c]++
		switch c {
		case ClassIKE:
			var h IKEHeader
			var err error
			if port == PortIKE {
				h, err = ParseIKEHeader(d.Payload)
				spis[h.SPIi] = true
			} else {
				h, _, err = ParseNATT(d.Payload)
				if !spis[h.SPIi] {
					t.Errorf("datagram %d: spi %x on 4500 never seen on 500", i, h.SPIi)
				}
			}
			if err != nil || h.Version != 0x20 {
				t.Errorf("datagram %d: header %+v err %v", i, h, err)
			}
		case ClassMalformed, ClassISAKMP:
			t.Errorf("datagram %d (%v -> %v): class %v", i, d.Src, d.Dst, c)
		}
	}
	// 6 IKE_SA_INIT, 12 IKE_AUTH fragments, 4 CREATE_CHILD_SA, 6 INFORMATIONAL;
	// 22 ESP (pings) and 6 keepalives: the same numbers tcpdump shows.
	want := map[Class]int{ClassIKE: 28, ClassESP: 22, ClassKeepalive: 6}
	for c, n := range want {
		if counts[c] != n {
			t.Errorf("%v: %d datagrams, want %d (all: %v)", c, counts[c], n, counts)
		}
	}
}

func FuzzClassify(f *testing.F) {
	for _, d := range loadCapture(f) {
		f.Add(d.Dst.Port(), d.Payload)
		f.Add(d.Src.Port(), d.Payload)
	}
	f.Add(uint16(4500), []byte{0xff})
	f.Add(uint16(500), []byte{})
	f.Fuzz(func(t *testing.T, port uint16, d []byte) {
		orig := bytes.Clone(d)
		c := Classify(port, d)
		if c >= numClasses {
			t.Fatalf("class %d out of range", c)
		}
		h, err := ParseIKEHeader(d)
		if err == nil && (int(h.Length) != len(d) || (h.Major() != 1 && h.Major() != 2)) {
			t.Fatalf("accepted inconsistent header %+v for %d bytes", h, len(d))
		}
		if err == nil && port == PortIKE && c != ClassIKE && c != ClassISAKMP {
			t.Fatalf("valid header classified %v", c)
		}
		_, nc, _ := ParseNATT(d)
		if port != PortIKE && nc != c {
			t.Fatalf("ParseNATT class %v != Classify %v", nc, c)
		}
		if !bytes.Equal(orig, d) {
			t.Fatal("input modified")
		}
	})
}
