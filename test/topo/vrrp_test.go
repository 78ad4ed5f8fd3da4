package topo

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ikelb/ikelb/test/netns"
)

// takeover waits until ping's log has a reply from node to later than t0
// and returns the traffic gap (that reply minus the reply before it) and
// the time from t0 to that reply.
func takeover(t *testing.T, ping *netns.Proc, to string, t0 time.Time, timeout time.Duration) (gap, since time.Duration) {
	t.Helper()
	waitFor(t, timeout, "traffic answered by "+to, func() error {
		rs := replies(ping)
		for _, r := range rs {
			if r.node != to || !r.at.After(t0) {
				continue
			}
			since, gap = r.at.Sub(t0), r.at.Sub(r.prev)
			if r.prev.IsZero() {
				gap = since
			}
			return nil
		}
		if len(rs) > 0 {
			return fmt.Errorf("last reply from %s", rs[len(rs)-1].node)
		}
		return errors.New("no replies")
	})
	return gap, since
}

// gatewayAnswers waits until a datagram from backend b to the gateway
// address is answered by want: the backends' default gateway has moved.
func gatewayAnswers(t *testing.T, v *VRRP, b *Backend, want *Node) {
	t.Helper()
	gw := netip.AddrPortFrom(v.Gateway, 4500).String()
	waitFor(t, 10*time.Second, "gateway answered by "+want.Name, func() error {
		if r := probe(t, b.NS, "0.0.0.0:0>"+gw)[0]; r.node != want.Name {
			return fmt.Errorf("answered by %q", r.node)
		}
		return nil
	})
}

func TestVRRPFailover(t *testing.T) {
	lab := netns.New(t, "vr")
	// The track script of each balancer fails while its fail file exists.
	dir := t.TempDir()
	failFile := func(n string) string { return filepath.Join(dir, "fail-"+n) }
	for _, n := range []string{"lb1", "lb2"} {
		script := fmt.Sprintf("#!/bin/sh\ntest ! -e %s\n", failFile(n))
		if err := os.WriteFile(filepath.Join(dir, "track-"+n), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	v := NewVRRP(lab, VRRPConfig{
		ClientSide:  ClientSide{Clients: 1, NATClients: 1},
		TrackScript: func(n *Node) string { return filepath.Join(dir, "track-"+n.Name) },
	})
	start := time.Now()
	m := v.WaitMaster(nil, 15*time.Second)
	other := v.Peer(m)
	t.Logf("%s master %v after keepalived started", m.Name, time.Since(start).Round(time.Millisecond))
	if vip, gw, err := v.Holders(); err != nil || len(vip) != 1 || len(gw) != 1 {
		t.Fatalf("holders: vip %v gw %v err %v, want exactly %s", names(vip), names(gw), err, m.Name)
	}

	// Responders on the VIP and the gateway in both balancers (freebind:
	// only the master's receive).
	listen := func(n *Node) *netns.Proc {
		return startListener(t, lab, n.NS, n.Name,
			netip.AddrPortFrom(v.VIP, 4500), netip.AddrPortFrom(v.Gateway, 4500))
	}
	listeners := map[*Node]*netns.Proc{}
	for _, n := range v.Balancers() {
		listeners[n] = listen(n)
	}
	vip := netip.AddrPortFrom(v.VIP, 4500).String()
	for _, c := range v.Clients {
		if r := probe(t, c.NS, "0.0.0.0:0>"+vip)[0]; r.node != m.Name {
			t.Fatalf("client %s: datagram to the vip answered by %q, want %s", c.Name, r.node, m.Name)
		}
	}
	gatewayAnswers(t, v, v.Backends[0], m)

	// A stream of datagrams, one every 10 ms, measures each traffic gap.
	ping := lab.StartSpec(v.Clients[0].NS, "ping", netns.Spec{Args: helperArgs(t, "ping", vip, "10ms", "60s")})
	takeover(t, ping, m.Name, time.Time{}, 10*time.Second)

	// 1. The master dies: keepalived and the responder get SIGKILL (the
	// addresses stay, as keepalived has no chance to remove them). The
	// peer takes over once three adverts are missed.
	t0 := time.Now()
	if err := listeners[m].Kill(); err != nil {
		t.Fatal(err)
	}
	v.KillKeepalived(m)
	waitFor(t, 10*time.Second, "vip and gateway on "+other.Name, func() error {
		vip, gw, err := v.Holders()
		if err != nil {
			return err
		}
		for _, hs := range [][]*Node{vip, gw} {
			if !strings.Contains(strings.Join(names(hs), ","), other.Name) {
				return fmt.Errorf("vip on %v, gateway on %v", names(vip), names(gw))
			}
		}
		return nil
	})
	moved := time.Since(t0)
	gap, since := takeover(t, ping, other.Name, t0, 10*time.Second)
	t.Logf("keepalived SIGKILL on %s: vip on %s after %v; traffic gap %v (%v after the kill)",
		m.Name, other.Name, moved.Round(time.Millisecond), gap.Round(time.Millisecond), since.Round(time.Millisecond))
	if since > 3*time.Second {
		t.Errorf("failover after SIGKILL took %v, want at most 3s", since)
	}
	gatewayAnswers(t, v, v.Backends[0], other)
	if _, err := v.Master(); !errors.Is(err, ErrSplitBrain) {
		t.Errorf("Master after SIGKILL = %v, want ErrSplitBrain (the killed node keeps its addresses)", err)
	}
	v.DropFloating(m) // what a dead host's addresses amount to
	v.WaitMaster(other, time.Second)

	// 2. The old master comes back: keepalived clears the stale addresses
	// and stays BACKUP (nopreempt), whatever its priority.
	listeners[m] = listen(m)
	v.StartKeepalived(m)
	waitFor(t, 10*time.Second, m.Name+" in BACKUP", func() error {
		if !strings.Contains(v.KeepalivedProc(m).Log(), "Entering BACKUP STATE") {
			return errors.New("not yet")
		}
		return nil
	})
	v.WaitMaster(other, 10*time.Second)
	t.Logf("keepalived restarted on %s: BACKUP, %s stays master", m.Name, other.Name)

	// 3. The track script fails on the master (ikelbd not ready): FAULT,
	// the VIP moves back after `fall` failed runs.
	t1 := time.Now()
	if err := os.WriteFile(failFile(other.Name), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	v.WaitMaster(m, 10*time.Second)
	moved = time.Since(t1)
	gap, since = takeover(t, ping, m.Name, t1, 10*time.Second)
	t.Logf("track script failing on %s: vip on %s after %v; traffic gap %v (%v after the script began failing)",
		other.Name, m.Name, moved.Round(time.Millisecond), gap.Round(time.Millisecond), since.Round(time.Millisecond))
	if since > 4*time.Second {
		t.Errorf("failover on track-script failure took %v, want at most 4s (fall 2 × 1 s + adverts)", since)
	}
	gatewayAnswers(t, v, v.Backends[0], m)
	if err := os.Remove(failFile(other.Name)); err != nil {
		t.Fatal(err)
	}

	// 4. A partition of the master from its peers (VRRP adverts too):
	// both become master; after healing, one again.
	v.Isolate(m)
	waitFor(t, 10*time.Second, "split brain while isolated", func() error {
		if _, err := v.Master(); !errors.Is(err, ErrSplitBrain) {
			return fmt.Errorf("Master = %v", err)
		}
		return nil
	})
	v.Heal(m)
	t2 := time.Now()
	one := v.WaitMaster(nil, 10*time.Second)
	t.Logf("partition of %s: split brain while cut off; healed: %s sole master after %v",
		m.Name, one.Name, time.Since(t2).Round(time.Millisecond))
	for _, c := range v.Clients {
		waitFor(t, 3*time.Second, "client "+c.Name+" answered by "+one.Name+" after heal", func() error {
			if r := probe(t, c.NS, "0.0.0.0:0>"+vip)[0]; r.node != one.Name {
				return fmt.Errorf("answered by %q", r.node)
			}
			return nil
		})
	}
	gatewayAnswers(t, v, v.Backends[0], one)
	if err := ping.Kill(); err != nil {
		t.Fatal(err)
	}
	t.Logf("traffic after heal: %v", time.Since(t2).Round(time.Millisecond))
}
