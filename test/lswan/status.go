package lswan

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// StateEstablishedIKE is the state of an established IKEv2 IKE SA.
const StateEstablishedIKE = "STATE_V2_ESTABLISHED_IKE_SA"

// SA is one of pluto's states (an IKE SA or a CHILD SA) as `whack --status`
// shows it, with the identity of the peer of its connection instance.
type SA struct {
	Serial   int    // pluto's state number, #N
	Conn     string // connection name
	Instance string // connection instance, e.g. "[2]"; "" for the connection itself
	// Remote is the peer's address and port as pluto sees them: behind a NAT
	// or a source-NATing balancer, what they made of the initiator.
	Remote netip.AddrPort
	State  string // e.g. STATE_V2_ESTABLISHED_IKE_SA
	// PeerID is the peer's authenticated identity (the connection instance's
	// "their id"); with rightid=%fromcert, its certificate's subject DN.
	PeerID string
}

// PeerName returns the peer's name from PeerID: an FQDN ID without its "@",
// or the CN of a DN ID. pluto shows either form for a peer that sent an
// FQDN ID with a certificate (rightid=%fromcert), so match peers by this.
func (sa SA) PeerName() string {
	if name, ok := strings.CutPrefix(sa.PeerID, "@"); ok {
		return name
	}
	for rdn := range strings.SplitSeq(sa.PeerID, ",") {
		if cn, ok := strings.CutPrefix(strings.TrimSpace(rdn), "CN="); ok {
			return cn
		}
	}
	return sa.PeerID
}

// IKE reports whether the state is an IKE SA (not a CHILD SA).
func (sa SA) IKE() bool { return !strings.Contains(sa.State, "CHILD") }

// Established reports whether the state is an established IKE SA.
func (sa SA) Established() bool { return sa.State == StateEstablishedIKE }

var (
	// #2: "lb"[2] 10.9.0.1:4500 STATE_V2_ESTABLISHED_IKE_SA (established IKE SA); ...
	stateLine = regexp.MustCompile(`^#(\d+): "([^"]+)"(\[\d+\])? (\S+) (STATE_\S+) `)
	// "lb"[2]:   our idtype: ID_FQDN; our id=@r; their idtype: ID_DER_ASN1_DN; their id=O=ikelb, CN=c
	theirID = regexp.MustCompile(`^"([^"]+)"(\[\d+\])?:\s+our idtype: .*; their id=(.*)$`)
)

// ParseStatus parses the output of `whack --status` (or `--showstates`,
// which lacks the peer identities) into pluto's states, in order.
func ParseStatus(out string) ([]SA, error) {
	peers := map[string]string{}
	var sas []SA
	for n, line := range strings.Split(out, "\n") {
		line = strings.TrimPrefix(strings.TrimSpace(line), "000 ")
		if m := theirID.FindStringSubmatch(line); m != nil {
			peers[m[1]+m[2]] = strings.TrimSpace(m[3])
			continue
		}
		m := stateLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		serial, err := strconv.Atoi(m[1])
		if err != nil {
			return nil, fmt.Errorf("%w: line %d: %q: %v", ErrParse, n+1, line, err)
		}
		remote, err := netip.ParseAddrPort(m[4])
		if err != nil {
			return nil, fmt.Errorf("%w: line %d: %q: %v", ErrParse, n+1, line, err)
		}
		sas = append(sas, SA{Serial: serial, Conn: m[2], Instance: m[3], Remote: remote, State: m[5]})
	}
	for i := range sas {
		sas[i].PeerID = peers[sas[i].Conn+sas[i].Instance]
	}
	return sas, nil
}

// SAs returns pluto's current states.
func (p *Pluto) SAs() ([]SA, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := p.Whack(ctx, "--status")
	if err != nil {
		return nil, fmt.Errorf("%w\n%s", err, out)
	}
	return ParseStatus(out)
}

// WaitIKESAs polls SAs until at least n IKE SAs are established and returns
// those, or fails with the last listing when ctx ends.
func (p *Pluto) WaitIKESAs(ctx context.Context, n int) ([]SA, error) {
	var last []SA
	var lastErr error
	for {
		sas, err := p.SAs()
		last, lastErr = sas, err
		var up []SA
		for _, sa := range sas {
			if sa.Established() {
				up = append(up, sa)
			}
		}
		if err == nil && len(up) >= n {
			return up, nil
		}
		if exited, _ := p.proc.Exited(); exited {
			return nil, fmt.Errorf("%w: %s", ErrExited, p.opts.Name)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %s: want %d established, have %+v (%v)", ErrNotEstablished, p.opts.Name, n, last, lastErr)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
