package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ikelb/ikelb/cluster"
	"github.com/ikelb/ikelb/cluster/membership"
	"github.com/ikelb/ikelb/cmd/internal/hostnet"
	"github.com/ikelb/ikelb/cmd/internal/spec"
	"github.com/ikelb/ikelb/dataplane"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

// daemon is one running node: Raft, the dataplane, the admin API and the
// metrics endpoint. Close stops them in reverse order.
type daemon struct {
	log     *slog.Logger
	node    *cluster.Node
	engine  *dataplane.Engine // nil on a witness
	hostnet *hostnet.Manager  // transparent mode's TPROXY rules and routes; nil on a witness
	fast    *hostnet.FastPath // kernel fast path; nil when off
	grpc    *grpc.Server
	health  *health.Server
	http    *http.Server

	// AdminAddr and MetricsAddr are the bound addresses (useful with port 0).
	AdminAddr   net.Addr
	MetricsAddr net.Addr

	wg     sync.WaitGroup
	cancel context.CancelFunc
}

// daemonOptions are start options that are not part of the configuration
// file.
type daemonOptions struct {
	// reusePort lets several nodes in one process share the VIP:ports (the
	// demo's three-node cluster on loopback).
	reusePort bool
}

func startDaemon(ctx context.Context, cfg *Config, logger *slog.Logger) (*daemon, error) {
	return startDaemonWith(ctx, cfg, logger, daemonOptions{})
}

func startDaemonWith(ctx context.Context, cfg *Config, logger *slog.Logger, opts daemonOptions) (_ *daemon, err error) {
	base := logger // the cluster package adds node= itself
	logger = logger.With("node", cfg.Node)
	d := &daemon{log: logger}
	defer func() {
		if err != nil {
			d.Close() // stop what did start; the results are (nil, err)
		}
	}()
	// The admin listener comes first: its address is gossiped, so that
	// followers can forward writes to the leader's.
	lis, err := net.Listen("tcp", cfg.AdminAddress)
	if err != nil {
		return nil, fmt.Errorf("admin_address: %w", err)
	}
	defer func() {
		if err != nil && d.grpc == nil {
			lis.Close()
		}
	}()
	d.AdminAddr = lis.Addr()
	gossip, err := gossipConfig(cfg, d.AdminAddr)
	if err != nil {
		return nil, err
	}
	table := dataplane.NewTable()
	// cluster.bootstrap_expect: see its doc and cluster/DESIGN.md "Bootstrap".
	alone, expect := cfg.Cluster.bootstrap()
	node, err := cluster.New(cluster.Config{
		Name:            cfg.Node,
		DataDir:         cfg.DataDir,
		RaftBindAddr:    cfg.Raft.BindAddress,
		RaftAdvertise:   cfg.Raft.AdvertiseAddress,
		Bootstrap:       alone,
		BootstrapExpect: expect,
		Logger:          base,
		Table:           table,
		HealthChecker:   cluster.NewProbeChecker(logger),
		Version:         version,
		Raft: cluster.RaftConfig{
			HeartbeatTimeout:   cfg.Raft.HeartbeatTimeout,
			ElectionTimeout:    cfg.Raft.ElectionTimeout,
			LeaderLeaseTimeout: cfg.Raft.LeaderLease,
			CommitTimeout:      cfg.Raft.CommitTimeout,
			SnapshotInterval:   cfg.Raft.SnapshotInterval,
			SnapshotThreshold:  cfg.Raft.SnapshotEntries,
			TrailingLogs:       cfg.Raft.TrailingLogs,
		},
		Batch: cluster.BatchConfig{
			MaxBatch:  cfg.Raft.BatchMax,
			Linger:    cfg.Raft.BatchLinger,
			QueueSize: cfg.Raft.QueueSize,
		},
		Gossip:            gossip.Gossip,
		AdminAddr:         gossip.AdminAddr,
		DeadServerTimeout: cfg.Cluster.DeadServerTimeout,
		ReconcileInterval: cfg.Cluster.ReconcileInterval,
	})
	if err != nil {
		return nil, err
	}
	var dp cluster.Dataplane
	if cfg.Cluster.Role != "witness" {
		engine, err := dataplane.New(dataplane.Config{Logger: logger, Table: table, Proposer: node.Proposer(), ReusePort: opts.reusePort})
		if err != nil {
			return nil, fmt.Errorf("dataplane: %w", err)
		}
		d.engine, dp = engine, engine
		// Transparent mode: the host's TPROXY rules and routes follow the
		// committed services (cmd/internal/hostnet); removed by Close.
		if d.hostnet, err = hostnet.New(hostnet.Config{Logger: logger}); err != nil {
			return nil, fmt.Errorf("hostnet: %w", err)
		}
		if cfg.Dataplane.KernelFastPath {
			d.fast, err = hostnet.NewFastPath(hostnet.FastPathConfig{Logger: logger, Table: table, Proposer: node.Proposer(),
				ConntrackNAT: cfg.Dataplane.NATFastPath == "conntrack"})
			if err != nil {
				logger.Info("kernel fast path off", "reason", err.Error())
				d.fast = nil
			}
		}
		dp = hostnet.WrapFast(engine, d.hostnet, d.fast)
	}
	if err := node.Start(dp); err != nil {
		return nil, err
	}
	d.node = node

	d.grpc = grpc.NewServer()
	ikelbv1.RegisterAdminServiceServer(d.grpc, cluster.NewAdminServer(node))
	ikelbv1.RegisterClusterServiceServer(d.grpc, cluster.NewClusterServer(node))
	d.health = health.NewServer()
	healthpb.RegisterHealthServer(d.grpc, d.health)
	reflection.Register(d.grpc)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		if err := d.grpc.Serve(lis); err != nil {
			logger.Error("admin server stopped", "err", err)
		}
	}()
	logger.Info("admin API listening", "addr", d.AdminAddr.String())

	if cfg.MetricsAddress != "" {
		reg := prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), cluster.NewCollector(node))
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.HandleFunc("/readyz", d.readyz)
		ml, err := net.Listen("tcp", cfg.MetricsAddress)
		if err != nil {
			return nil, fmt.Errorf("metrics_address: %w", err)
		}
		d.MetricsAddr = ml.Addr()
		d.http = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if err := d.http.Serve(ml); err != nil && !errors.Is(err, http.ErrServerClosed) {
				logger.Error("metrics server stopped", "err", err)
			}
		}()
		logger.Info("metrics listening", "addr", d.MetricsAddr.String())
	}

	bg, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	if len(cfg.Services) > 0 {
		svcs, err := spec.ToProto(cfg.Services)
		if err != nil {
			return nil, err
		}
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			d.createInitialServices(bg, svcs)
		}()
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		d.trackServing(bg)
	}()
	return d, nil
}

// configDrift names the fields in which the config file's service (every
// default filled in) differs from the committed one; none when they agree
// or the committed one cannot be read. Output-only fields are ignored.
func (d *daemon) configDrift(ctx context.Context, admin *cluster.AdminServer, want *ikelbv1.Service) []string {
	r, err := admin.GetService(ctx, &ikelbv1.GetServiceRequest{Name: want.GetName()})
	if err != nil {
		return nil
	}
	return serviceDiff(want, r.GetService())
}

// serviceDiff names the top-level fields of want that got does not have,
// ignoring the output-only version and backend health.
func serviceDiff(want, got *ikelbv1.Service) []string {
	got = proto.Clone(got).(*ikelbv1.Service)
	got.Version = 0
	for _, b := range got.GetBackends() {
		b.Health, b.HealthChanged = 0, nil
	}
	var diff []string
	w, g := want.ProtoReflect(), got.ProtoReflect()
	fields := w.Descriptor().Fields()
	for i := range fields.Len() {
		if f := fields.Get(i); !w.Get(f).Equal(g.Get(f)) {
			diff = append(diff, string(f.Name()))
		}
	}
	return diff
}

// createInitialServices creates the config file's services that the
// replicated state does not have yet, once this node can write.
func (d *daemon) createInitialServices(ctx context.Context, svcs []*ikelbv1.Service) {
	admin := cluster.NewAdminServer(d.node)
	for _, s := range svcs {
		for {
			_, err := admin.CreateService(ctx, &ikelbv1.CreateServiceRequest{Service: s})
			if err == nil {
				d.log.Info("created service from config", "service", s.GetName())
				break
			}
			switch status.Code(err) {
			case codes.AlreadyExists:
				if diff := d.configDrift(ctx, admin, s); len(diff) > 0 {
					d.log.Warn("service in config differs from the replicated state, which wins: change it with ikelbctl apply -f (the config file only creates missing services)",
						"service", s.GetName(), "differs", strings.Join(diff, ","))
				} else {
					d.log.Info("service from config already exists; the replicated state wins", "service", s.GetName())
				}
			case codes.InvalidArgument, codes.FailedPrecondition:
				d.log.Error("service in config rejected", "service", s.GetName(), "err", err)
			default:
				select {
				case <-ctx.Done():
					return
				case <-time.After(200 * time.Millisecond):
				}
				continue
			}
			break
		}
	}
}

// trackServing keeps grpc.health.v1's overall status in step with whether
// this node can serve.
func (d *daemon) trackServing(ctx context.Context) {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		st := healthpb.HealthCheckResponse_SERVING
		if ok, _ := d.ready(); !ok {
			st = healthpb.HealthCheckResponse_NOT_SERVING
		}
		d.health.SetServingStatus("", st)
		d.health.SetServingStatus(ikelbv1.AdminService_ServiceDesc.ServiceName, st)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// ready says whether this node can serve clients: it has a leader (or, if
// degraded, at least a committed table to forward by) and its dataplane runs.
func (d *daemon) ready() (bool, string) {
	st := d.node.Status()
	if st.Degraded {
		return false, "degraded: no raft leader reachable"
	}
	if e := d.node.DataplaneError(); e != "" {
		return false, "dataplane: " + e
	}
	return true, "ok"
}

func (d *daemon) readyz(w http.ResponseWriter, _ *http.Request) {
	ok, why := d.ready()
	if !ok {
		http.Error(w, why, http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, why)
}

// Close stops everything and waits for it.
func (d *daemon) Close() error {
	if d.cancel != nil {
		d.cancel()
	}
	if d.grpc != nil {
		stopped := make(chan struct{})
		go func() { d.grpc.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(3 * time.Second):
			d.grpc.Stop()
		}
	}
	if d.http != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		_ = d.http.Shutdown(ctx)
		cancel()
	}
	var errs []error
	if d.node != nil {
		errs = append(errs, d.node.Shutdown())
	}
	if d.engine != nil {
		errs = append(errs, d.engine.Close())
	}
	if d.fast != nil { // kernel fast path: remove its nft tables
		errs = append(errs, d.fast.Close())
	}
	if d.hostnet != nil { // transparent mode: remove the host setup
		errs = append(errs, d.hostnet.Close())
	}
	d.wg.Wait()
	return errors.Join(errs...)
}

// gossipSettings are the cluster.Config fields for membership.
type gossipSettings struct {
	Gossip    cluster.GossipConfig
	AdminAddr string
}

// gossipConfig derives the membership settings from cfg; admin is the bound
// admin address. Without cluster.gossip_address the node is a cluster of one.
func gossipConfig(cfg *Config, admin net.Addr) (gossipSettings, error) {
	c := cfg.Cluster
	if c.GossipAddress == "" {
		return gossipSettings{}, nil
	}
	key, err := c.encryptKey()
	if err != nil {
		return gossipSettings{}, err
	}
	adminAddr := c.AdminAdvertiseAddress
	if adminAddr == "" {
		adminAddr = admin.String()
		if ap, err := netip.ParseAddrPort(adminAddr); err == nil && ap.Addr().IsUnspecified() {
			raftAddr := cmp.Or(cfg.Raft.AdvertiseAddress, cfg.Raft.BindAddress)
			host, _, err := net.SplitHostPort(raftAddr)
			if err != nil {
				return gossipSettings{}, fmt.Errorf("cluster.admin_advertise_address: cannot derive it from raft address %q: %w", raftAddr, err)
			}
			adminAddr = net.JoinHostPort(host, strconv.Itoa(int(ap.Port())))
		}
	}
	t := c.GossipTimers
	return gossipSettings{
		Gossip: cluster.GossipConfig{
			BindAddr:      c.GossipAddress,
			AdvertiseAddr: c.GossipAdvertiseAddress,
			Join:          c.Join,
			EncryptKey:    key,
			Tunables: membership.Tunables{
				ProbeInterval: t.ProbeInterval, ProbeTimeout: t.ProbeTimeout,
				SuspicionMult: t.SuspicionMult, SuspicionMaxTimeoutMult: t.SuspicionMaxTimeoutMult,
				GossipInterval: t.GossipInterval, PushPullInterval: t.PushPullInterval,
				TCPTimeout: t.TCPTimeout, DeadNodeReclaimTime: t.DeadNodeReclaimTime,
			},
		},
		AdminAddr: adminAddr,
	}, nil
}
