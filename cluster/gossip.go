package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/ikelb/ikelb/cluster/membership"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// startGossip starts membership with this node's meta. The caller starts
// watchMembers and joinGossip.
func (n *Node) startGossip(raftAddr string, witness bool) (*membership.Members, error) {
	role := membership.RoleVoter
	if witness {
		role = membership.RoleWitness
	}
	g := n.cfg.Gossip
	m, err := membership.New(membership.Config{
		Name:          n.cfg.Name,
		BindAddr:      g.BindAddr,
		AdvertiseAddr: g.AdvertiseAddr,
		Join:          g.Join,
		EncryptKey:    g.EncryptKey,
		Meta:          membership.Meta{RaftAddr: raftAddr, AdminAddr: n.cfg.AdminAddr, Role: role, Version: n.cfg.Version},
		Logger:        n.log,
		Tunables:      g.Tunables,
	})
	if err != nil {
		return nil, fmt.Errorf("gossip: %w", err)
	}
	return m, nil
}

// watchMembers turns membership events into pokes of the leader loop. It
// runs on every node, leader or not, so that the events channel never fills
// with events nobody reads; the poke is a non-blocking send to a 1-slot
// channel, and the leader loop also reconciles on a timer.
func (n *Node) watchMembers(ctx context.Context) {
	events := n.members.Events()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-events:
			if !ok {
				return
			}
			select {
			case n.membersChanged <- struct{}{}:
			default:
			}
		}
	}
}

// joinGossip joins the configured members, retrying until one answers (the
// list may name this node: joining oneself is harmless), then keeps the list
// joined. memberlist alone does not: it stops gossiping to a failed member
// after PushPullInterval, so a node restarted without reaching anyone, or
// cut off for longer, would stay alone in gossip and the leader would remove
// it after DeadServerTimeout. So for as long as a listed address is not an
// alive member, it joins again every ReconcileInterval, backing off while
// nothing changes to DeadServerTimeout/3 (a member back within about two
// thirds of DeadServerTimeout is never removed from Raft). Each attempt is
// bounded by ReconcileInterval; it stops when ctx ends.
func (n *Node) joinGossip(ctx context.Context) {
	if len(n.cfg.Gossip.Join) == 0 {
		return
	}
	if err := n.members.Join(ctx); err != nil {
		if ctx.Err() == nil && !errors.Is(err, membership.ErrShutdown) {
			n.log.Error("join gossip", "error", err)
		}
		return
	}
	base := n.cfg.ReconcileInterval
	longest := max(base, n.cfg.DeadServerTimeout/3)
	wait := base
	var lastMissing []string
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		missing := n.missingJoins(ctx)
		switch {
		case len(missing) > 0 && slices.Equal(missing, lastMissing):
			wait = min(2*wait, longest)
		default:
			wait = base
		}
		lastMissing = missing
		if len(missing) > 0 {
			jctx, cancel := context.WithTimeout(ctx, base)
			err := n.members.Join(jctx)
			cancel()
			if errors.Is(err, membership.ErrShutdown) || ctx.Err() != nil {
				return
			}
			still := n.missingJoins(ctx)
			if back := slices.DeleteFunc(slices.Clone(missing), func(a string) bool {
				return slices.Contains(still, a)
			}); len(back) > 0 {
				n.log.Info("rejoined gossip members", "join_addrs", back)
				lastMissing = nil
				wait = base
			} else {
				n.log.Debug("join addresses still not alive members", "join_addrs", missing, "next_try", wait.String(), "error", err)
			}
		}
		t.Reset(wait)
	}
}

// missingJoins returns the join addresses that are not the gossip address of
// an alive member (this node included), resolving host names.
func (n *Node) missingJoins(ctx context.Context) []string {
	var alive []netip.AddrPort
	for _, m := range n.members.Members() {
		if m.Status == membership.StatusAlive {
			alive = append(alive, m.Addr)
		}
	}
	lookup := func(host string) []netip.Addr {
		ctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		ips, _ := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		return ips
	}
	return missingJoins(n.cfg.Gossip.Join, alive, lookup)
}

// missingJoins is the pure part of Node.missingJoins: join addresses
// (host:port) none of whose addresses is in alive. An address that does not
// parse or resolve is missing.
func missingJoins(join []string, alive []netip.AddrPort, lookup func(host string) []netip.Addr) []string {
	var out []string
	for _, j := range join {
		host, portStr, err := net.SplitHostPort(j)
		port, perr := strconv.ParseUint(portStr, 10, 16)
		if err != nil || perr != nil {
			out = append(out, j)
			continue
		}
		var ips []netip.Addr
		if ip, err := netip.ParseAddr(host); err == nil {
			ips = []netip.Addr{ip}
		} else {
			ips = lookup(host)
		}
		found := false
		for _, ip := range ips {
			if slices.Contains(alive, netip.AddrPortFrom(ip.Unmap(), uint16(port))) {
				found = true
				break
			}
		}
		if !found {
			out = append(out, j)
		}
	}
	return out
}

// GossipAddr returns the gossip address other members can join at, or ""
// without gossip.
func (n *Node) GossipAddr() string {
	if n.members == nil {
		return ""
	}
	return n.members.LocalAddr().String()
}

// Leave tells the other members that this node leaves for good, so that the
// leader removes it from the Raft configuration at once instead of after
// DeadServerTimeout. Call it before Shutdown.
func (n *Node) Leave(timeout time.Duration) error {
	if !n.running() {
		return ErrShutdown
	}
	if n.members == nil {
		return nil
	}
	return n.members.Leave(timeout)
}

// memberByName returns the gossip member of that name.
func (n *Node) memberByName(name string) (membership.Member, bool) {
	if n.members == nil {
		return membership.Member{}, false
	}
	for _, m := range n.members.Members() {
		if m.Name == name {
			return m, true
		}
	}
	return membership.Member{}, false
}

// leaderClient returns the leader's name and a ClusterService client for
// it, or ErrNotLeader (unapplied) when no leader, or no address for it, is
// known.
func (n *Node) leaderClient() (string, ikelbv1.ClusterServiceClient, error) {
	_, id := n.raft.LeaderWithID()
	if id == "" {
		return "", nil, unappliedError{fmt.Errorf("%w: no leader is known", ErrNotLeader)}
	}
	m, ok := n.memberByName(string(id))
	if !ok || m.MetaErr != nil || m.Meta.AdminAddr == "" {
		return string(id), nil, unappliedError{fmt.Errorf("%w: the leader %s has no known admin address", ErrNotLeader, id)}
	}
	c, err := n.peers.client(m.Meta.AdminAddr)
	if err != nil {
		return string(id), nil, err
	}
	return string(id), c, nil
}

// peers are gRPC connections to other nodes' ClusterService, by address,
// made on first use and closed by Shutdown.
type peers struct {
	// Set once.
	opts []grpc.DialOption

	mu sync.Mutex
	// mu guards the following.
	conns  map[string]*grpc.ClientConn
	closed bool
}

func newPeers(opts []grpc.DialOption) *peers {
	if len(opts) == 0 {
		opts = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	}
	return &peers{opts: opts, conns: map[string]*grpc.ClientConn{}}
}

func (p *peers) client(addr string) (ikelbv1.ClusterServiceClient, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, ErrShutdown
	}
	c, ok := p.conns[addr]
	if !ok {
		var err error
		// passthrough: addresses are IP:port from gossip meta; no resolver.
		c, err = grpc.NewClient("passthrough:///"+addr, p.opts...)
		if err != nil {
			return nil, fmt.Errorf("connect to %s: %w", addr, err)
		}
		p.conns[addr] = c
	}
	return ikelbv1.NewClusterServiceClient(c), nil
}

func (p *peers) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for _, c := range p.conns {
		_ = c.Close()
	}
	clear(p.conns)
}
