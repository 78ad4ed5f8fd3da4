package lswan

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ikelb/ikelb/test/netns"
	"github.com/ikelb/ikelb/test/swan"
)

// statusOut is an excerpt of real `whack --status` output of pluto 4.10
// after a strongSwan initiator's IKE SA came up and its CHILD SA failed.
const statusOut = `000 Connection list:
000  
000 "lb": 10.250.0.0/16===10.9.0.2[@r.ikelb.test,MS+S=C]...%any[%fromcert,+MC+S=C]; unrouted; eroute owner: #0
000 "lb":   our idtype: ID_FQDN; our id=@r.ikelb.test; their idtype: %fromcert; their id=%fromcert
000 "lb"[2]: 10.250.0.0/16===10.9.0.2[@r.ikelb.test,MS+S=C]...10.9.0.1[O=ikelb, CN=c.ikelb.test,+MC+S=C]===10.201.0.0/32; unrouted; eroute owner: #0
000 "lb"[2]:   our idtype: ID_FQDN; our id=@r.ikelb.test; their idtype: ID_DER_ASN1_DN; their id=O=ikelb, CN=c.ikelb.test
000 "lb"[3]:   our idtype: ID_FQDN; our id=@r.ikelb.test; their idtype: ID_DER_ASN1_DN; their id=O=ikelb, CN=d.ikelb.test
000  
000 IKE SAs: total(1), half-open(0), open(0), authenticated(1), anonymous(0)
000  
000 #2: "lb"[2] 10.9.0.1:4500 STATE_V2_ESTABLISHED_IKE_SA (established IKE SA); REKEY in 28529s; REPLACE in 28799s; newest; idle;
000 #4: "lb"[3] 10.9.0.3:500 STATE_V2_PARENT_R1 (sent IKE_SA_INIT (or IKE_INTERMEDIATE) response); EVENT_v2_DISCARD in 199s; idle;
000 #5: "lb"[2] [2001:db8::1]:4500 STATE_V2_ESTABLISHED_CHILD_SA (established Child SA); LIVENESS in 10s; newest; eroute owner;
000  
`

func TestParseStatus(t *testing.T) {
	sas, err := ParseStatus(statusOut)
	if err != nil {
		t.Fatal(err)
	}
	want := []SA{
		{Serial: 2, Conn: "lb", Instance: "[2]", Remote: netip.MustParseAddrPort("10.9.0.1:4500"), State: StateEstablishedIKE, PeerID: "O=ikelb, CN=c.ikelb.test"},
		{Serial: 4, Conn: "lb", Instance: "[3]", Remote: netip.MustParseAddrPort("10.9.0.3:500"), State: "STATE_V2_PARENT_R1", PeerID: "O=ikelb, CN=d.ikelb.test"},
		{Serial: 5, Conn: "lb", Instance: "[2]", Remote: netip.MustParseAddrPort("[2001:db8::1]:4500"), State: "STATE_V2_ESTABLISHED_CHILD_SA", PeerID: "O=ikelb, CN=c.ikelb.test"},
	}
	if len(sas) != len(want) {
		t.Fatalf("got %d states %+v, want %d", len(sas), sas, len(want))
	}
	for i := range want {
		if sas[i] != want[i] {
			t.Errorf("state %d:\n got %+v\nwant %+v", i, sas[i], want[i])
		}
	}
	for id, name := range map[string]string{
		"O=ikelb, CN=c.ikelb.test": "c.ikelb.test",
		"@c.ikelb.test":            "c.ikelb.test",
		"CN=x,O=y":                 "x",
		"10.0.0.1":                 "10.0.0.1",
		"":                         "",
	} {
		if got := (SA{PeerID: id}).PeerName(); got != name {
			t.Errorf("PeerName of %q = %q, want %q", id, got, name)
		}
	}
	if !sas[0].IKE() || !sas[0].Established() || !sas[1].IKE() || sas[1].Established() || sas[2].IKE() || sas[2].Established() {
		t.Errorf("IKE()/Established() wrong: %+v", sas)
	}

	for _, out := range []string{"", "000 using kernel interface: xfrm\n"} {
		if sas, err := ParseStatus(out); err != nil || len(sas) != 0 {
			t.Errorf("ParseStatus(%q) = %v, %v; want none", out, sas, err)
		}
	}
	if _, err := ParseStatus(`000 #x: "lb"[1] 10.0.0.1:500 STATE_V2_PARENT_R1 (x)`); err != nil {
		t.Errorf("non-numeric serial is not a state line, got %v", err)
	}
	if _, err := ParseStatus(`000 #1: "lb"[1] 10.0.0.1 STATE_V2_PARENT_R1 (x)`); !errors.Is(err, ErrParse) {
		t.Errorf("remote without port: got %v, want ErrParse", err)
	}
}

// TestStrongSwanToLibreswan connects a strongSwan initiator straight to a
// pluto responder (no balancer): the IKE SA comes up on both sides with
// IKE_AUTH fragmented both ways, and the CHILD SA fails as documented in the
// package comment (no kernel ESP, no userspace ESP in libreswan).
func TestStrongSwanToLibreswan(t *testing.T) {
	Require(t)
	netns.Require(t, "swanctl", "pki")
	ca := swan.NewCA(t, swan.Bits(2048))
	lab := netns.New(t, "ls")
	a, b := lab.AddNS("a"), lab.AddNS("b")
	lab.Link(a, "eth0", "10.9.0.1/24", b, "eth0", "10.9.0.2/24")
	p := StartResponder(t, lab, b, Options{CA: ca, Name: "r.ikelb.test", Address: "10.9.0.2"})
	c := swan.StartInitiator(t, lab, a, swan.Options{CA: ca, Name: "c.ikelb.test", Remote: "10.9.0.2",
		FragmentSize: 1000, RetransmitTimeout: 2 * time.Second, RetransmitTries: 2})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	err := c.Initiate(ctx)
	if err == nil {
		t.Log("CHILD SA came up: this kernel has ESP")
	} else if !strings.Contains(err.Error(), "received TS_UNACCEPTABLE notify, no CHILD_SA built") {
		t.Fatalf("initiate: want the IKE SA with the CHILD SA refused, got %v", err)
	}
	sas, err := p.WaitIKESAs(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if got := sas[0]; got.Remote != netip.MustParseAddrPort("10.9.0.1:4500") || got.PeerName() != "c.ikelb.test" {
		t.Errorf("pluto's IKE SA: %+v, want peer c.ikelb.test at 10.9.0.1:4500", got)
	}
	isas, err := c.ListSAs()
	if err != nil {
		t.Fatal(err)
	}
	if len(isas) != 1 || isas[0].State != "ESTABLISHED" || isas[0].RemoteID != "r.ikelb.test" {
		t.Errorf("strongSwan's IKE SAs: %+v, want one ESTABLISHED with r.ikelb.test", isas)
	}
	if c.CountLog("splitting IKE message") < 1 || c.CountLog("reassembled fragmented IKE message") < 1 {
		t.Errorf("IKE_AUTH not fragmented both ways")
	}
}
