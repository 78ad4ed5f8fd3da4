// Command ikesim runs simulated IKEv2 peers as their own processes, so that
// end-to-end tests and benchmarks can place them in network namespaces:
//
//	ikesim responder --name vpn-a --ike 10.1.0.21:500 --natt 10.1.0.21:4500
//	ikesim sessions --vip 10.0.0.100 --clients 200 --source-base 203.0.113.10 --duration 20s
//	ikesim esp --from 198.51.100.2:4600 --to 10.0.0.100:4500 --count 200 --interval 20ms --no-checksum
//
// responder serves until SIGTERM/SIGINT and then prints its counters as
// JSON. sessions connects every client (IKE_SA_INIT on the IKE port, then
// IKE_AUTH from a new source port on the NAT-T port), keeps each one alive
// with DPD checks, ESP and keepalives for --duration, and prints one JSON
// object per client: where it landed, which servers answered and its
// longest gap without an answer. esp sends ESP-in-UDP datagrams (SPI
// 0xdeadbeef, a sequence number) from one address, with no UDP checksum
// when asked, as the kernels' ESP-in-UDP encapsulation leaves it.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ikelb/ikelb/test/ikesim"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: ikesim responder|sessions [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "responder":
		err = responder(os.Args[2:])
	case "sessions":
		err = sessions(os.Args[2:])
	case "esp":
		err = esp(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "ikesim:", err)
		os.Exit(1)
	}
}

func responder(args []string) error {
	fs := flag.NewFlagSet("responder", flag.ExitOnError)
	name := fs.String("name", "", "responder name, reported to clients")
	ike := fs.String("ike", "", "IKE listen address (host:500)")
	natt := fs.String("natt", "", "NAT-T listen address (host:4500)")
	fs.Parse(args)
	if *name == "" || *ike == "" || *natt == "" {
		return fmt.Errorf("responder needs --name, --ike and --natt")
	}
	r, err := ikesim.Listen(*name, *ike, *natt)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fmt.Fprintf(os.Stderr, "responder %s listening on %s and %s\n", *name, r.IKEAddr(), r.NATTAddr())
	<-ctx.Done()
	c := r.Counts()
	r.Close()
	return json.NewEncoder(os.Stdout).Encode(c)
}

// SessionLine is one client's outcome, as printed by sessions.
type SessionLine struct {
	Client        string   `json:"client"`
	NATTSource    string   `json:"natt_source"`
	IKEResponder  string   `json:"ike_responder"`
	NATTResponder string   `json:"natt_responder"`
	Servers       []string `json:"servers"`
	Kept          bool     `json:"kept"`
	ReachedEnd    bool     `json:"reached_end"`
	Checks        int      `json:"checks"`
	Answered      int      `json:"answered"`
	UnknownSA     int      `json:"unknown_sa"`
	MaxGapMS      float64  `json:"max_gap_ms"`
	Err           string   `json:"err,omitempty"`
}

func sessions(args []string) error {
	fs := flag.NewFlagSet("sessions", flag.ExitOnError)
	vip := fs.String("vip", "", "VIP address")
	ikePort := fs.Uint("ike-port", 500, "IKE port")
	nattPort := fs.Uint("natt-port", 4500, "NAT-T port")
	clients := fs.Int("clients", 10, "number of clients")
	base := fs.String("source-base", "", "first client source address is the one after this (IPv4); default: kernel's choice for all")
	shared := fs.Bool("shared", false, "all clients use the --source-base address itself (one IP, many ports)")
	interval := fs.Duration("interval", 100*time.Millisecond, "DPD/ESP interval")
	duration := fs.Duration("duration", 10*time.Second, "how long each client stays after connecting")
	timeout := fs.Duration("timeout", time.Second, "per-attempt timeout of the connect exchanges")
	retries := fs.Int("retries", 5, "attempts per connect exchange")
	fragments := fs.Int("fragments", 2, "IKE_AUTH fragments")
	fs.Parse(args)
	v, err := netip.ParseAddr(*vip)
	if err != nil {
		return fmt.Errorf("--vip: %w", err)
	}
	if *clients < 1 || *clients > 5000 || *duration > 10*time.Minute {
		return fmt.Errorf("--clients must be 1..5000 and --duration at most 10m")
	}
	opts := ikesim.Options{
		Clients: *clients, VIP: v, IKEPort: uint16(*ikePort), NATTPort: uint16(*nattPort),
		SharedSource: *shared, Fragments: *fragments, Timeout: *timeout, Retries: *retries,
	}
	if *base != "" {
		if opts.SourceBase, err = netip.ParseAddr(*base); err != nil {
			return fmt.Errorf("--source-base: %w", err)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *duration+time.Minute)
	defer cancel()
	res, err := ikesim.RunSessions(ctx, opts, *interval, *duration)
	if err != nil {
		return err
	}
	enc := json.NewEncoder(os.Stdout)
	for _, r := range res {
		l := SessionLine{
			Client: r.IKESource.String(), NATTSource: r.NATTSource.String(),
			IKEResponder: r.IKEResponder, NATTResponder: r.NATTResponder, Servers: r.Servers,
			Kept: r.Kept(), ReachedEnd: r.ReachedEnd, Checks: r.Checks, Answered: r.Answered, UnknownSA: r.UnknownSA,
			MaxGapMS: float64(r.MaxGap) / float64(time.Millisecond),
		}
		if r.Err != nil {
			l.Err = r.Err.Error()
		}
		if err := enc.Encode(l); err != nil {
			return err
		}
	}
	return nil
}

// espSPI marks esp's datagrams (tests filter on it).
const espSPI = 0xdeadbeef

func esp(args []string) error {
	fs := flag.NewFlagSet("esp", flag.ExitOnError)
	from := fs.String("from", "", "source address:port")
	to := fs.String("to", "", "destination address:port")
	count := fs.Int("count", 100, "datagrams to send")
	interval := fs.Duration("interval", 20*time.Millisecond, "time between datagrams")
	noCheck := fs.Bool("no-checksum", false, "send without a UDP checksum (SO_NO_CHECK)")
	fs.Parse(args)
	src, err := netip.ParseAddrPort(*from)
	if err != nil {
		return fmt.Errorf("--from: %w", err)
	}
	dst, err := netip.ParseAddrPort(*to)
	if err != nil {
		return fmt.Errorf("--to: %w", err)
	}
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(src))
	if err != nil {
		return err
	}
	defer c.Close()
	if *noCheck {
		rc, err := c.SyscallConn()
		if err != nil {
			return err
		}
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_NO_CHECK, 1) }); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("SO_NO_CHECK: %w", serr)
		}
	}
	b := make([]byte, 64)
	binary.BigEndian.PutUint32(b, espSPI)
	for i := range *count {
		binary.BigEndian.PutUint32(b[4:], uint32(i+1))
		if _, err := c.WriteToUDPAddrPort(b, dst); err != nil {
			return err
		}
		time.Sleep(*interval)
	}
	fmt.Printf("sent %d\n", *count)
	return nil
}
