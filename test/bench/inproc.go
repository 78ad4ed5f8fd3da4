package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/ikelb/ikelb/cluster"
	"github.com/ikelb/ikelb/dataplane"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
	"google.golang.org/grpc"
)

// inprocNode is one in-process cluster member: a cluster.Node with its own
// data directory (real persist stores on disk), Raft over TCP on
// 127.0.0.1 port 0, gossip on 127.0.0.1 port 0, and a gRPC server with the
// admin and cluster services (followers forward proposals to the leader's).
type inprocNode struct {
	name    string
	dir     string
	node    *cluster.Node
	srv     *grpc.Server
	srvDone chan struct{}
}

// nullDataplane accepts every service set: the nodes are voters with a
// dataplane role, but nothing forwards packets in these suites.
type nullDataplane struct{}

func (nullDataplane) SetServices([]dataplane.Service) error { return nil }
func (nullDataplane) Counters() []dataplane.ServiceCounters { return nil }

// nodeOptions are the knobs the suites change from the documented defaults.
type nodeOptions struct {
	Raft   cluster.RaftConfig
	Batch  cluster.BatchConfig
	Logger *slog.Logger
}

// startInprocNode starts a node on dir. join lists gossip addresses; a node
// with none bootstraps a single-voter cluster (if dir has no state).
func startInprocNode(name, dir string, join []string, gossip bool, opts nodeOptions) (*inprocNode, error) {
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	n := &inprocNode{name: name, dir: dir}
	cfg := cluster.Config{
		Name: name, DataDir: dir, RaftBindAddr: "127.0.0.1:0", Bootstrap: len(join) == 0,
		Logger: logger, Raft: opts.Raft, Batch: opts.Batch,
	}
	var lis net.Listener
	if gossip {
		var err error
		if lis, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			return nil, err
		}
		cfg.Gossip = cluster.GossipConfig{BindAddr: "127.0.0.1:0", Join: join}
		cfg.AdminAddr = lis.Addr().String()
	}
	node, err := cluster.New(cfg)
	if err != nil {
		if lis != nil {
			lis.Close()
		}
		return nil, err
	}
	n.node = node
	if lis != nil {
		n.srv = grpc.NewServer()
		ikelbv1.RegisterAdminServiceServer(n.srv, cluster.NewAdminServer(node))
		ikelbv1.RegisterClusterServiceServer(n.srv, cluster.NewClusterServer(node))
		n.srvDone = make(chan struct{})
		go func(srv *grpc.Server, done chan struct{}) { // waited for in stop
			defer close(done)
			_ = srv.Serve(lis)
		}(n.srv, n.srvDone)
	}
	if err := node.Start(nullDataplane{}); err != nil {
		n.stopServer()
		return nil, err
	}
	return n, nil
}

func (n *inprocNode) stopServer() {
	if n.srv != nil {
		n.srv.Stop()
		<-n.srvDone
		n.srv = nil
	}
}

// stop shuts the node down without leaving the cluster.
func (n *inprocNode) stop() error {
	if n == nil || n.node == nil {
		return nil
	}
	err := n.node.Shutdown()
	n.stopServer()
	n.node = nil
	return err
}

// inprocCluster is nodes started in this process; the first bootstraps and
// the others join it by gossip.
type inprocCluster struct {
	nodes []*inprocNode
}

func startInprocCluster(ctx context.Context, dir string, size int, opts nodeOptions) (*inprocCluster, error) {
	c := &inprocCluster{}
	var join []string
	for i := range size {
		name := fmt.Sprintf("n%d", i+1)
		n, err := startInprocNode(name, filepath.Join(dir, name), join, true, opts)
		if err != nil {
			c.stop()
			return nil, fmt.Errorf("start %s: %w", name, err)
		}
		c.nodes = append(c.nodes, n)
		if i == 0 {
			join = []string{n.node.GossipAddr()}
		}
	}
	err := pollUntil(ctx, 30*time.Second, 10*time.Millisecond, func() bool {
		l := c.leader()
		if l == nil {
			return false
		}
		ms, err := l.node.Members()
		if err != nil {
			return false
		}
		voters := 0
		for _, m := range ms {
			if m.Suffrage == "Voter" {
				voters++
			}
		}
		if voters != size {
			return false
		}
		for _, n := range c.nodes {
			if st := n.node.Status(); st.LeaderID != l.name {
				return false
			}
		}
		return true
	})
	if err != nil {
		c.stop()
		return nil, fmt.Errorf("cluster of %d did not form: %w", size, err)
	}
	return c, nil
}

func (c *inprocCluster) leader() *inprocNode {
	for _, n := range c.nodes {
		if n.node != nil && n.node.IsLeader() {
			return n
		}
	}
	return nil
}

func (c *inprocCluster) follower() *inprocNode {
	l := c.leader()
	for _, n := range c.nodes {
		if n != l && n.node != nil {
			return n
		}
	}
	return nil
}

func (c *inprocCluster) stop() error {
	var errs []error
	for i := len(c.nodes) - 1; i >= 0; i-- {
		if err := c.nodes[i].stop(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// benchService is the service the in-process suites bind clients of: three
// backends, no health checks (so they stay usable).
func benchService() *ikelbv1.Service {
	return &ikelbv1.Service{Name: "bench", Vip: "10.0.100.1", Backends: []*ikelbv1.Backend{
		{Address: "10.0.11.2"}, {Address: "10.0.12.2"}, {Address: "10.0.13.2"},
	}}
}

// createService commits benchService through n and waits until every node
// in all has it; it returns the committed dataplane view.
func createService(ctx context.Context, n *cluster.Node, all ...*cluster.Node) (dataplane.Service, error) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := cluster.NewAdminServer(n).CreateService(cctx, &ikelbv1.CreateServiceRequest{Service: benchService()}); err != nil {
		return dataplane.Service{}, fmt.Errorf("create service: %w", err)
	}
	var svc dataplane.Service
	err := pollUntil(ctx, 10*time.Second, 5*time.Millisecond, func() bool {
		for _, o := range append(all, n) {
			ss := o.FSM().Services()
			if len(ss) != 1 {
				return false
			}
			svc = ss[0]
		}
		return true
	})
	return svc, err
}

// clientKey is the i-th simulated client: IPv4 10.0.0.0 + i + 1.
func clientKey(service uint32, i uint64) dataplane.ClientKey {
	v := uint32(0x0a000000) + uint32(i) + 1
	return dataplane.ClientKey{Service: service, Client: dataplane.AddrFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}))}
}

// pollUntil checks cond every interval until it holds, ctx ends or timeout
// passes.
func pollUntil(ctx context.Context, timeout, interval time.Duration, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %v", timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval): // polling interval, not a wait for state
		}
	}
	return nil
}

// warnLogger logs warnings and errors to w (the test log).
func warnLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelWarn}))
}
