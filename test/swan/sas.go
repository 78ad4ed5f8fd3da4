package swan

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// ErrParse reports swanctl output this package does not understand.
var ErrParse = errors.New("swan: cannot parse swanctl output")

// IKESA is one IKE SA as `swanctl --list-sas` shows it.
type IKESA struct {
	Name      string // connection name
	UniqueID  int
	State     string // e.g. ESTABLISHED, CONNECTING
	Initiator bool   // this charon initiated the SA

	// The addresses and ports the SA runs between, as this charon sees them:
	// on a responder behind a NAT or balancer, Remote is what the NAT made of
	// the initiator.
	Local, Remote netip.AddrPort
	LocalID       string
	RemoteID      string
	InitiatorSPI  string // hex
	ResponderSPI  string // hex
	NATLocal      bool   // this charon is behind a NAT
	NATRemote     bool   // the peer is behind a NAT
	NATAny        bool   // any NAT detected, or faked (kernel-libipsec fakes it)

	LocalVIPs  []netip.Addr
	RemoteVIPs []netip.Addr
	Children   []ChildSA
}

// ChildSA is one CHILD SA of an IKESA.
type ChildSA struct {
	Name       string // child config name
	UniqueID   int
	State      string // e.g. INSTALLED
	Mode       string // TUNNEL
	Protocol   string // ESP
	Encap      bool   // ESP in UDP
	SPIIn      string // hex
	SPIOut     string // hex
	BytesIn    uint64
	BytesOut   uint64
	PacketsIn  uint64
	PacketsOut uint64
	LocalTS    []netip.Prefix
	RemoteTS   []netip.Prefix
}

// Up reports whether the IKE SA is established and has an installed CHILD SA.
func (sa IKESA) Up() bool {
	if sa.State != "ESTABLISHED" {
		return false
	}
	for _, c := range sa.Children {
		if c.State == "INSTALLED" {
			return true
		}
	}
	return false
}

// ListSAs returns the charon's IKE SAs.
func (c *Charon) ListSAs() ([]IKESA, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := c.swanctl(ctx, "--list-sas", "--pretty")
	if err != nil {
		return nil, fmt.Errorf("%w\n%s", err, out)
	}
	return ParseSAs(out)
}

// section is one `name { ... }` block of swanctl's --pretty output.
type section struct {
	name     string
	values   map[string]string
	lists    map[string][]string
	sections []*section
}

// ParseSAs parses the output of `swanctl --list-sas --pretty`: a sequence
// of "list-sa event { <ike-sa name> { key = value ... } }" blocks and a final
// "list-sas reply { }".
func ParseSAs(out string) ([]IKESA, error) {
	root, err := parsePretty(out)
	if err != nil {
		return nil, err
	}
	var sas []IKESA
	for _, ev := range root.sections {
		if ev.name != "list-sa event" {
			continue
		}
		for _, s := range ev.sections {
			sa, err := ikeSA(s)
			if err != nil {
				return nil, err
			}
			sas = append(sas, sa)
		}
	}
	return sas, nil
}

func parsePretty(out string) (*section, error) {
	newSection := func(name string) *section {
		return &section{name: name, values: map[string]string{}, lists: map[string][]string{}}
	}
	stack := []*section{newSection("")}
	var list string // the key of the list being read, if any
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		cur := stack[len(stack)-1]
		switch {
		case line == "":
		case list != "":
			if line == "]" {
				list = ""
			} else {
				cur.lists[list] = append(cur.lists[list], line)
			}
		case line == "}":
			if len(stack) == 1 {
				return nil, fmt.Errorf("%w: line %d: unbalanced }", ErrParse, n)
			}
			stack = stack[:len(stack)-1]
		case strings.HasSuffix(line, " {"):
			s := newSection(strings.TrimSuffix(line, " {"))
			cur.sections = append(cur.sections, s)
			stack = append(stack, s)
		case strings.HasSuffix(line, " = ["):
			list = strings.TrimSuffix(line, " = [")
			cur.lists[list] = []string{}
		default:
			k, v, ok := strings.Cut(line, " = ")
			if !ok {
				return nil, fmt.Errorf("%w: line %d: %q", ErrParse, n, line)
			}
			cur.values[k] = v
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrParse, err)
	}
	if len(stack) != 1 || list != "" {
		return nil, fmt.Errorf("%w: truncated", ErrParse)
	}
	return stack[0], nil
}

func ikeSA(s *section) (IKESA, error) {
	p := &fieldParser{s: s}
	sa := IKESA{
		Name:         s.name,
		UniqueID:     p.int("uniqueid"),
		State:        s.values["state"],
		Initiator:    s.values["initiator"] == "yes",
		Local:        p.addrPort("local-host", "local-port"),
		Remote:       p.addrPort("remote-host", "remote-port"),
		LocalID:      s.values["local-id"],
		RemoteID:     s.values["remote-id"],
		InitiatorSPI: s.values["initiator-spi"],
		ResponderSPI: s.values["responder-spi"],
		NATLocal:     s.values["nat-local"] == "yes",
		NATRemote:    s.values["nat-remote"] == "yes",
		NATAny:       s.values["nat-any"] == "yes",
		LocalVIPs:    p.addrs("local-vips"),
		RemoteVIPs:   p.addrs("remote-vips"),
	}
	for _, cs := range s.sections {
		if cs.name != "child-sas" {
			continue
		}
		for _, ch := range cs.sections {
			cp := &fieldParser{s: ch}
			sa.Children = append(sa.Children, ChildSA{
				Name:       ch.values["name"],
				UniqueID:   cp.int("uniqueid"),
				State:      ch.values["state"],
				Mode:       ch.values["mode"],
				Protocol:   ch.values["protocol"],
				Encap:      ch.values["encap"] == "yes",
				SPIIn:      ch.values["spi-in"],
				SPIOut:     ch.values["spi-out"],
				BytesIn:    cp.uint("bytes-in"),
				BytesOut:   cp.uint("bytes-out"),
				PacketsIn:  cp.uint("packets-in"),
				PacketsOut: cp.uint("packets-out"),
				LocalTS:    cp.prefixes("local-ts"),
				RemoteTS:   cp.prefixes("remote-ts"),
			})
			if cp.err != nil {
				return IKESA{}, cp.err
			}
		}
	}
	return sa, p.err
}

// fieldParser converts values of a section, keeping the first error.
type fieldParser struct {
	s   *section
	err error
}

func (p *fieldParser) fail(key, v string, err error) {
	if p.err == nil {
		p.err = fmt.Errorf("%w: %s: %s = %q: %w", ErrParse, p.s.name, key, v, err)
	}
}

func (p *fieldParser) uint(key string) uint64 {
	v, ok := p.s.values[key]
	if !ok {
		return 0
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		p.fail(key, v, err)
	}
	return n
}

func (p *fieldParser) int(key string) int {
	return int(p.uint(key))
}

func (p *fieldParser) addrPort(hostKey, portKey string) netip.AddrPort {
	h, ok := p.s.values[hostKey]
	if !ok {
		return netip.AddrPort{}
	}
	a, err := netip.ParseAddr(h)
	if err != nil {
		p.fail(hostKey, h, err)
		return netip.AddrPort{}
	}
	port := p.uint(portKey)
	if port > 65535 {
		p.fail(portKey, strconv.FormatUint(port, 10), errors.New("out of range"))
	}
	return netip.AddrPortFrom(a, uint16(port))
}

func (p *fieldParser) addrs(key string) []netip.Addr {
	var out []netip.Addr
	for _, v := range p.s.lists[key] {
		a, err := netip.ParseAddr(v)
		if err != nil {
			p.fail(key, v, err)
			continue
		}
		out = append(out, a)
	}
	return out
}

func (p *fieldParser) prefixes(key string) []netip.Prefix {
	var out []netip.Prefix
	for _, v := range p.s.lists[key] {
		// A traffic selector may carry a protocol/port suffix: 10.0.0.0/8[udp/53].
		v, _, _ = strings.Cut(v, "[")
		pf, err := netip.ParsePrefix(v)
		if err != nil {
			p.fail(key, v, err)
			continue
		}
		out = append(out, pf)
	}
	return out
}
