package cluster

import (
	"context"
	"fmt"
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

// joinGossip joins the configured members, retrying until it succeeds or
// the node stops.
func (n *Node) joinGossip(ctx context.Context) {
	if err := n.members.Join(ctx); err != nil && ctx.Err() == nil {
		n.log.Error("join gossip", "error", err)
	}
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
// it, or ErrNotLeader when no leader, or no address for it, is known.
func (n *Node) leaderClient() (string, ikelbv1.ClusterServiceClient, error) {
	_, id := n.raft.LeaderWithID()
	if id == "" {
		return "", nil, fmt.Errorf("%w: no leader is known", ErrNotLeader)
	}
	m, ok := n.memberByName(string(id))
	if !ok || m.MetaErr != nil || m.Meta.AdminAddr == "" {
		return string(id), nil, fmt.Errorf("%w: the leader %s has no known admin address", ErrNotLeader, id)
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
