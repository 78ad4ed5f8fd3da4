package swan

import (
	"errors"
	"net/netip"
	"reflect"
	"testing"
)

// responderSAs is real `swanctl --list-sas --pretty` output of a responder
// (strongSwan 5.9.8, kernel-libipsec) with one client behind a NAT.
const responderSAs = `list-sa event {
  lb {
    uniqueid = 1
    version = 2
    state = ESTABLISHED
    local-host = 10.0.0.2
    local-port = 4500
    local-id = resp.test
    remote-host = 198.51.100.2
    remote-port = 33012
    remote-id = ini.test
    initiator-spi = 8639f41a9d1e87a5
    responder-spi = 7b7e2819ee1c7c12
    nat-remote = yes
    nat-any = yes
    encr-alg = AES_CBC
    encr-keysize = 128
    integ-alg = HMAC_SHA2_256_128
    prf-alg = PRF_HMAC_SHA2_256
    dh-group = CURVE_25519
    established = 0
    rekey-time = 13307
    remote-vips = [
      10.201.0.1
    ]
    child-sas {
      lb-1 {
        name = lb
        uniqueid = 1
        reqid = 1
        state = INSTALLED
        mode = TUNNEL
        protocol = ESP
        encap = yes
        spi-in = fa02b4e3
        spi-out = b77210d9
        encr-alg = AES_GCM_16
        encr-keysize = 128
        bytes-in = 84
        packets-in = 1
        bytes-out = 84
        packets-out = 1
        rekey-time = 3288
        life-time = 3960
        install-time = 0
        local-ts = [
          10.250.0.0/16
        ]
        remote-ts = [
          10.201.0.1/32
        ]
      }
    }
  }
}
list-sa event {
  lb {
    uniqueid = 2
    version = 2
    state = CONNECTING
    local-host = 10.0.0.2
    local-port = 500
    local-id = resp.test
    remote-host = 198.51.100.2
    remote-port = 500
    remote-id = %any
    initiator-spi = 1111111111111111
    responder-spi = 2222222222222222
    child-sas {
    }
  }
}
list-sas reply {
}
`

func TestParseSAs(t *testing.T) {
	got, err := ParseSAs(responderSAs)
	if err != nil {
		t.Fatal(err)
	}
	want := []IKESA{{
		Name:         "lb",
		UniqueID:     1,
		State:        "ESTABLISHED",
		Local:        netip.MustParseAddrPort("10.0.0.2:4500"),
		Remote:       netip.MustParseAddrPort("198.51.100.2:33012"),
		LocalID:      "resp.test",
		RemoteID:     "ini.test",
		InitiatorSPI: "8639f41a9d1e87a5",
		ResponderSPI: "7b7e2819ee1c7c12",
		NATRemote:    true,
		NATAny:       true,
		RemoteVIPs:   []netip.Addr{netip.MustParseAddr("10.201.0.1")},
		Children: []ChildSA{{
			Name: "lb", UniqueID: 1, State: "INSTALLED", Mode: "TUNNEL", Protocol: "ESP", Encap: true,
			SPIIn: "fa02b4e3", SPIOut: "b77210d9",
			BytesIn: 84, PacketsIn: 1, BytesOut: 84, PacketsOut: 1,
			LocalTS:  []netip.Prefix{netip.MustParsePrefix("10.250.0.0/16")},
			RemoteTS: []netip.Prefix{netip.MustParsePrefix("10.201.0.1/32")},
		}},
	}, {
		Name:         "lb",
		UniqueID:     2,
		State:        "CONNECTING",
		Local:        netip.MustParseAddrPort("10.0.0.2:500"),
		Remote:       netip.MustParseAddrPort("198.51.100.2:500"),
		LocalID:      "resp.test",
		RemoteID:     "%any",
		InitiatorSPI: "1111111111111111",
		ResponderSPI: "2222222222222222",
	}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ParseSAs:\n got %+v\nwant %+v", got, want)
	}
	if !got[0].Up() || got[1].Up() {
		t.Errorf("Up() = %v, %v; want true, false", got[0].Up(), got[1].Up())
	}
}

func TestParseSAsEmptyAndBroken(t *testing.T) {
	sas, err := ParseSAs("list-sas reply {\n}\n")
	if err != nil || len(sas) != 0 {
		t.Errorf("no SAs: got %v, %v", sas, err)
	}
	for _, bad := range []string{
		"list-sa event {\n  lb {\n    state = ESTABLISHED\n", // truncated
		"}\n", // unbalanced
		"list-sa event {\n  lb {\n    garbage\n  }\n}\n",                // no " = "
		"list-sa event {\n  lb {\n    remote-host = x\n  }\n}\n",        // bad address
		"list-sa event {\n  lb {\n    uniqueid = -1\n  }\n}\n",          // bad number
		"list-sa event {\n  lb {\n    remote-vips = [\n      1.2.3.4\n", // open list
	} {
		if _, err := ParseSAs(bad); !errors.Is(err, ErrParse) {
			t.Errorf("ParseSAs(%q) = %v, want ErrParse", bad, err)
		}
	}
}
