package loadgen

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// Main is the command line of the helper processes the harness starts
// inside network namespaces:
//
//	send  -dst A:P -clients N -client-base IP -size B -duration D [-rate PPS] [-max-packets N] [-src-port P]
//	      [-probes N -probe-base IP -probe-rate PPS] [-out FILE]
//	ready -dst A:P -src IP [-timeout D]
//	sink  -listen A:P[,A:P...] [-ctl UNIX-SOCKET] [-rcvbuf BYTES] [-lifetime D]
//
// send writes its SendResult as JSON to -out (default stdout). It returns
// the process exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "loadgen: want a command: send, ready or sink")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch args[0] {
	case "send":
		err = mainSend(ctx, args[1:], stdout)
	case "ready":
		err = mainReady(ctx, args[1:])
	case "sink":
		err = mainSink(ctx, args[1:])
	default:
		err = fmt.Errorf("loadgen: unknown command %q: want send, ready or sink", args[0])
	}
	if err != nil {
		fmt.Fprintln(stderr, err) // the package's errors already say "loadgen:"
		if errors.Is(err, flag.ErrHelp) {
			return 2
		}
		return 1
	}
	return 0
}

type addrPortFlag struct{ v *netip.AddrPort }

func (f addrPortFlag) String() string {
	if f.v == nil || !f.v.IsValid() {
		return ""
	}
	return f.v.String()
}
func (f addrPortFlag) Set(s string) (err error) { *f.v, err = netip.ParseAddrPort(s); return err }

type addrFlag struct{ v *netip.Addr }

func (f addrFlag) String() string {
	if f.v == nil || !f.v.IsValid() {
		return ""
	}
	return f.v.String()
}
func (f addrFlag) Set(s string) (err error) { *f.v, err = netip.ParseAddr(s); return err }

func mainSend(ctx context.Context, args []string, stdout io.Writer) error {
	var cfg SendConfig
	fs := flag.NewFlagSet("send", flag.ContinueOnError)
	fs.Var(addrPortFlag{&cfg.Dst}, "dst", "destination address:port")
	fs.Var(addrFlag{&cfg.ClientBase}, "client-base", "first load client source address")
	fs.IntVar(&cfg.Clients, "clients", 0, "number of load clients")
	fs.IntVar(&cfg.Size, "size", 64, "UDP payload bytes per datagram")
	fs.DurationVar(&cfg.Duration, "duration", time.Second, "run length (upper bound)")
	fs.Uint64Var(&cfg.MaxPackets, "max-packets", 0, "stop after this many load datagrams (0: no limit)")
	fs.Float64Var(&cfg.Rate, "rate", 0, "load datagrams per second (0: as fast as possible)")
	fs.IntVar(&cfg.Batch, "batch", 64, "datagrams per sendmmsg (per GSO write with -gso)")
	fs.BoolVar(&cfg.GSO, "gso", false, "send each batch as one UDP GSO write (UDP_SEGMENT), cut into datagrams by the kernel")
	srcPort := fs.Uint("src-port", 0, "every client's source port (0: ephemeral)")
	fs.Var(addrFlag{&cfg.ProbeBase}, "probe-base", "first probe client source address")
	fs.IntVar(&cfg.Probes, "probes", 0, "number of probe clients")
	fs.Float64Var(&cfg.ProbeRate, "probe-rate", 1000, "probes per second in total")
	out := fs.String("out", "-", "file for the JSON result (- for stdout)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *srcPort > 65535 {
		return fmt.Errorf("-src-port %d: out of range", *srcPort)
	}
	cfg.SrcPort = uint16(*srcPort)
	// Let the probe readers run beside a busy sender even when pinned to
	// one CPU: the kernel then wakes them as soon as an echo arrives.
	runtime.GOMAXPROCS(max(2, runtime.GOMAXPROCS(0)))
	res, err := Send(ctx, cfg)
	if err != nil {
		return err
	}
	b, err := json.Marshal(res)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if *out == "-" {
		_, err = stdout.Write(b)
		return err
	}
	return os.WriteFile(*out, b, 0o644)
}

func mainReady(ctx context.Context, args []string) error {
	var dst netip.AddrPort
	var src netip.Addr
	fs := flag.NewFlagSet("ready", flag.ContinueOnError)
	fs.Var(addrPortFlag{&dst}, "dst", "destination address:port")
	fs.Var(addrFlag{&src}, "src", "source address")
	timeout := fs.Duration("timeout", 10*time.Second, "give up after")
	if err := fs.Parse(args); err != nil {
		return err
	}
	return WaitReady(ctx, dst, src, *timeout)
}

func mainSink(ctx context.Context, args []string) error {
	var cfg SinkConfig
	fs := flag.NewFlagSet("sink", flag.ContinueOnError)
	listen := fs.String("listen", "0.0.0.0:4500", "comma-separated address:port list")
	ctl := fs.String("ctl", "", "Unix socket for stats/reset (empty: none)")
	fs.IntVar(&cfg.RcvBuf, "rcvbuf", 8<<20, "socket receive buffer bytes")
	lifetime := fs.Duration("lifetime", time.Hour, "exit after this long (a bound in case the harness dies)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	for _, s := range strings.Split(*listen, ",") {
		a, err := netip.ParseAddrPort(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("-listen: %w", err)
		}
		cfg.Listen = append(cfg.Listen, a)
	}
	s, err := NewSink(cfg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *lifetime)
	defer cancel()
	errc := make(chan error, 1)
	if *ctl != "" {
		go func() { errc <- ServeControl(ctx, *ctl, s) }()
	} else {
		errc <- nil
	}
	runErr := s.Run(ctx)
	cancel()
	return errors.Join(runErr, <-errc)
}
