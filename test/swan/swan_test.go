package swan

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ikelb/ikelb/test/netns"
)

// natTopology is the harness topology:
//
//	c1, c2 ── clan switch 192.168.10.0/24 ── nat (masquerade, fully random ports)
//	   nat out0 198.51.100.2 ── 198.51.100.1 mid (routes; later: ikelbd)
//	   mid ── blan switch 10.0.0.0/24 ── r1 10.0.0.11 (default route via mid)
//
// A balancer test puts ikelbd in mid, gives it the VIP, and points the
// initiators at the VIP instead of r1.
type natTopology struct {
	lab     *netns.Lab
	clients []*netns.NS
	nat     *netns.NS
	mid     *netns.NS
	backend *netns.NS
}

const (
	natPublic   = "198.51.100.2"
	backendAddr = "10.0.0.11"
)

func buildNATTopology(t *testing.T, clients int) natTopology {
	t.Helper()
	lab := netns.New(t, "swn")
	tp := natTopology{lab: lab, nat: lab.AddNS("nat"), mid: lab.AddNS("mid"), backend: lab.AddNS("r1")}
	clan := lab.AddSwitch("clan")
	clan.Attach(tp.nat, "in0", "192.168.10.1/24")
	for i := range clients {
		c := lab.AddNS(fmt.Sprintf("c%d", i+1))
		clan.Attach(c, "eth0", fmt.Sprintf("192.168.10.%d/24", 10+i))
		c.DefaultRoute("192.168.10.1")
		tp.clients = append(tp.clients, c)
	}
	lab.Link(tp.nat, "out0", natPublic+"/24", tp.mid, "up0", "198.51.100.1/24")
	tp.nat.DefaultRoute("198.51.100.1")
	tp.nat.Masquerade("out0", "fully-random")
	tp.mid.Forward()
	blan := lab.AddSwitch("blan")
	blan.Attach(tp.mid, "lan0", "10.0.0.1/24")
	blan.Attach(tp.backend, "eth0", backendAddr+"/24")
	tp.backend.DefaultRoute("10.0.0.1")
	return tp
}

// TestThroughNAT proves the harness: two strongSwan initiators behind one
// NAT reach a strongSwan responder through a routing namespace; IKE moves to
// UDP 4500 from new NAT ports, IKE_AUTH is fragmented, both IKE and CHILD SAs
// come up, and pings cross the tunnel.
func TestThroughNAT(t *testing.T) {
	netns.Require(t, "nft", "swanctl", "pki", "ping")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	begin := time.Now()
	phase := func(what string, since time.Time) {
		t.Logf("timing: %s: %v", what, time.Since(since).Round(time.Millisecond))
	}

	start := time.Now()
	ca := NewCA(t)
	ca.Prepare(3)
	phase(fmt.Sprintf("CA and 3 keys, RSA %d (cached after the first test)", ca.Bits()), start)

	start = time.Now()
	tp := buildNATTopology(t, 2)
	phase("topology", start)

	start = time.Now()
	resp := StartResponder(t, tp.lab, tp.backend, Options{CA: ca, Name: "r1.ikelb.test"})
	var inits []*Charon
	for i, c := range tp.clients {
		inits = append(inits, StartInitiator(t, tp.lab, c, Options{
			CA: ca, Name: fmt.Sprintf("c%d.ikelb.test", i+1), Remote: backendAddr,
		}))
	}
	phase("3 charons started and configured", start)

	start = time.Now()
	errs := make([]error, len(inits))
	var wg sync.WaitGroup
	for i, c := range inits {
		wg.Go(func() { errs[i] = c.Initiate(ctx) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("initiator %d: %v", i+1, err)
		}
	}
	phase("2 IKE+CHILD SAs initiated concurrently", start)

	sas, err := resp.WaitSAs(ctx, 2)
	if err != nil {
		t.Fatal(err)
	}
	ports := map[uint16]bool{}
	for _, sa := range sas {
		if got := sa.Remote.Addr().String(); got != natPublic {
			t.Errorf("responder sees %s from %s, want the NAT's address %s", sa.RemoteID, sa.Remote, natPublic)
		}
		if sa.Local.Port() != 4500 || sa.Remote.Port() == 500 || sa.Remote.Port() == 4500 {
			t.Errorf("responder's SA with %s runs %s <-> %s, want local port 4500 and a NAT-chosen remote port", sa.RemoteID, sa.Local, sa.Remote)
		}
		ports[sa.Remote.Port()] = true
		if len(sa.RemoteVIPs) != 1 {
			t.Errorf("SA with %s: remote virtual IPs %v, want one", sa.RemoteID, sa.RemoteVIPs)
		}
	}
	if len(ports) != 2 {
		t.Errorf("two clients behind one NAT share a NAT port: %+v", sas)
	}

	start = time.Now()
	for _, c := range inits {
		if err := c.Ping(ctx, DefaultInnerAddr); err != nil {
			t.Fatal(err)
		}
	}
	phase("ping through both tunnels", start)
	sas, err = resp.WaitSAs(ctx, 2)
	if err != nil {
		t.Fatal(err)
	}
	for _, sa := range sas {
		ch := sa.Children[0]
		if !ch.Encap || ch.PacketsIn == 0 || ch.PacketsOut == 0 {
			t.Errorf("responder CHILD SA with %s: encap=%v packets in/out %d/%d, want ESP in UDP both ways", sa.RemoteID, ch.Encap, ch.PacketsIn, ch.PacketsOut)
		}
	}

	// IKE fragmentation, both ways, through the NAT and the router.
	if n := resp.CountLog("reassembled fragmented IKE message"); n < 2 {
		t.Errorf("responder reassembled %d fragmented IKE messages, want >= 2 (one IKE_AUTH per client)", n)
	}
	for _, c := range inits {
		if c.CountLog("splitting IKE message") < 1 || c.CountLog("reassembled fragmented IKE message") < 1 {
			t.Errorf("%s: IKE_AUTH not fragmented both ways", c.Name())
		}
	}

	start = time.Now()
	for _, c := range append(inits, resp) {
		if err := c.Stop(); err != nil {
			t.Error(err)
		}
	}
	phase("stop 3 charons", start)
	phase("whole test before cleanup", begin)
}
