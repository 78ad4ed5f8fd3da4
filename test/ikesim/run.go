package ikesim

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"time"
)

// Options configures Run.
type Options struct {
	Clients     int // how many clients
	Concurrency int // at most this many at once; default 64

	VIP      netip.Addr
	IKEPort  uint16
	NATTPort uint16

	// SourceBase is the first client source IP; client i uses the i-th
	// address after it whose last byte is neither 0 nor 255. Default
	// 127.1.0.0 (so 127.1.0.1, 127.1.0.2, ...). IPv4 only.
	SourceBase netip.Addr
	// SharedSource puts every client on SourceBase itself, each with its
	// own ports: many clients behind one NAT address.
	SharedSource bool

	Fragments, AuthSize, ESP, Keepalives int
	Timeout                              time.Duration
	Retries                              int
}

// Report is the outcome of Run.
type Report struct {
	Results     []Result // in client order
	Failed      int      // clients with an error
	Split       int      // clients answered by different responders on the two ports
	ByResponder map[string]int
	Elapsed     time.Duration
}

// Run runs opts.Clients clients, at most opts.Concurrency at once, and
// waits for all of them. It fails only on invalid options; each client's
// own failure is in its Result.
func Run(ctx context.Context, opts Options) (Report, error) {
	if opts.Concurrency <= 0 {
		opts.Concurrency = 64
	}
	if !opts.SourceBase.IsValid() {
		opts.SourceBase = netip.MustParseAddr("127.1.0.0")
	}
	if !opts.SourceBase.Is4() || !opts.VIP.IsValid() || opts.IKEPort == 0 || opts.NATTPort == 0 || opts.Clients < 0 {
		return Report{}, errors.New("run needs an IPv4 SourceBase, VIP, IKEPort, NATTPort and Clients >= 0")
	}
	start := time.Now()
	rep := Report{Results: make([]Result, opts.Clients), ByResponder: make(map[string]int)}
	sem := make(chan struct{}, opts.Concurrency)
	var wg sync.WaitGroup
	src := opts.SourceBase
	for i := range opts.Clients {
		if !opts.SharedSource {
			src = nextHost(src)
		}
		c := Client{
			Local: src, VIP: opts.VIP, IKEPort: opts.IKEPort, NATTPort: opts.NATTPort,
			Fragments: opts.Fragments, AuthSize: opts.AuthSize, ESP: opts.ESP, Keepalives: opts.Keepalives,
			Timeout: opts.Timeout, Retries: opts.Retries,
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			for j := i; j < opts.Clients; j++ {
				rep.Results[j].Err = ctx.Err()
			}
			wg.Wait()
			return rep.tally(start), nil
		}
		wg.Go(func() {
			defer func() { <-sem }()
			rep.Results[i] = c.Run(ctx)
		})
	}
	wg.Wait()
	return rep.tally(start), nil
}

func (r Report) tally(start time.Time) Report {
	for _, res := range r.Results {
		if res.Err != nil {
			r.Failed++
		}
		if res.Split {
			r.Split++
		}
		if res.IKEResponder != "" {
			r.ByResponder[res.IKEResponder]++
		}
	}
	r.Elapsed = time.Since(start)
	return r
}

// nextHost returns the next IPv4 address whose last byte is not 0 or 255.
func nextHost(a netip.Addr) netip.Addr {
	for {
		a = a.Next()
		if b := a.As4(); b[3] != 0 && b[3] != 255 {
			return a
		}
	}
}
