package hostnet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// nftables

func (m *Manager) table() *nftables.Table {
	return &nftables.Table{Name: m.cfg.NFTTable, Family: nftables.TableFamilyINet}
}

var (
	keyType4 = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService)
	keyType6 = nftables.MustConcatSetType(nftables.TypeIP6Addr, nftables.TypeInetService)
)

func (m *Manager) applyNFT(s Spec, v4, v6 bool) error {
	c, err := nftables.New()
	if err != nil {
		return wrap("nftables", err)
	}
	t := m.table()
	// add + delete + add in one transaction: replaces a table of any
	// content (ours from a killed run included) atomically.
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	ch := c.AddChain(&nftables.Chain{
		Name:     "prerouting",
		Table:    t,
		Type:     nftables.ChainTypeFilter,
		Hooknum:  nftables.ChainHookPrerouting,
		Priority: nftables.ChainPriorityMangle,
	})
	fams := []struct {
		on   bool
		v6   bool
		port uint16
	}{{v4, false, s.ReplyPort4}, {v6, true, s.ReplyPort6}}
	for _, f := range fams {
		if !f.on {
			continue
		}
		set := &nftables.Set{Table: t, Name: "backends4", KeyType: keyType4, Concatenation: true}
		if f.v6 {
			set = &nftables.Set{Table: t, Name: "backends6", KeyType: keyType6, Concatenation: true}
		}
		var elems []nftables.SetElement
		for _, ic := range s.Intercepts {
			if ic.Backend.Unmap().Is4() == f.v6 {
				continue
			}
			elems = append(elems, nftables.SetElement{Key: keyBytes(ic)})
		}
		if err := c.AddSet(set, elems); err != nil {
			return wrap("nft set "+set.Name, err)
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: m.tproxyRule(set, f.v6, f.port)})
	}
	if err := c.Flush(); err != nil {
		return wrap("nft table inet "+t.Name, err)
	}
	return nil
}

// tproxyRule is: meta nfproto F meta l4proto udp fib daddr type != local
// SADDR . udp sport @set meta mark set MARK tproxy F to :port accept.
func (m *Manager) tproxyRule(set *nftables.Set, v6 bool, port uint16) []expr.Any {
	nfproto, saddrOff, saddrLen, portReg := byte(unix.NFPROTO_IPV4), uint32(12), uint32(4), uint32(9)
	if v6 {
		// ip6 saddr fills the 16-byte register 1; the port goes right after it.
		nfproto, saddrOff, saddrLen, portReg = unix.NFPROTO_IPV6, 8, 16, 2
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
		// Only traffic routed through the box: never replies to the
		// balancer's own sockets (health checks, NAT-mode flows).
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: saddrOff, Len: saddrLen},
		&expr.Payload{DestRegister: portReg, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
		&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(m.cfg.Mark)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
		&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
		&expr.TProxy{Family: nfproto, TableFamily: byte(nftables.TableFamilyINet), RegPort: 1},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}
}

func (m *Manager) removeNFT() error {
	c, err := nftables.New()
	if err != nil {
		return wrap("nftables", err)
	}
	t := m.table()
	c.AddTable(t) // so that the delete succeeds when there is none
	c.DelTable(t)
	if err := c.Flush(); err != nil {
		return wrap("delete nft table inet "+t.Name, err)
	}
	return nil
}

// policy routing

func (m *Manager) wantRule(family int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = family
	r.Mark = m.cfg.Mark
	mask := uint32(0xffffffff)
	r.Mask = &mask
	r.Table = m.cfg.Table
	r.Priority = m.cfg.RulePriority
	return r
}

func (m *Manager) wantRoute(family int, lo int) *netlink.Route {
	dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	if family == netlink.FAMILY_V6 {
		dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &netlink.Route{
		Family: family, LinkIndex: lo, Dst: dst, Table: m.cfg.Table,
		Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST, Protocol: unix.RTPROT_STATIC,
	}
}

func (m *Manager) applyRouting(v4, v6 bool) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return wrap("find lo", err)
	}
	for _, f := range []struct {
		on     bool
		family int
	}{{v4, netlink.FAMILY_V4}, {v6, netlink.FAMILY_V6}} {
		if !f.on {
			if err := m.removeFamily(f.family); err != nil {
				return err
			}
			continue
		}
		if err := m.ensureRule(f.family); err != nil {
			return err
		}
		if err := netlink.RouteReplace(m.wantRoute(f.family, lo.Attrs().Index)); err != nil {
			return wrap(fmt.Sprintf("route local default table %d", m.cfg.Table), err)
		}
	}
	return nil
}

// ensureRule leaves exactly one rule to the table, the wanted one.
func (m *Manager) ensureRule(family int) error {
	want := m.wantRule(family)
	rules, err := m.ourRules(family)
	if err != nil {
		return err
	}
	found := false
	for _, r := range rules {
		if !found && r.Mark == want.Mark && r.Mask != nil && *r.Mask == *want.Mask && r.Priority == want.Priority {
			found = true
			continue
		}
		if err := netlink.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			return wrap("delete stale ip rule", err)
		}
	}
	if found {
		return nil
	}
	if err := netlink.RuleAdd(want); err != nil {
		return wrap(fmt.Sprintf("ip rule fwmark %#x lookup %d", m.cfg.Mark, m.cfg.Table), err)
	}
	return nil
}

func (m *Manager) ourRules(family int) ([]netlink.Rule, error) {
	rules, err := netlink.RuleListFiltered(family, &netlink.Rule{Table: m.cfg.Table}, netlink.RT_FILTER_TABLE)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return nil, wrap("list ip rules", err)
	}
	return rules, nil
}

func (m *Manager) removeRouting() error {
	return errors.Join(m.removeFamily(netlink.FAMILY_V4), m.removeFamily(netlink.FAMILY_V6))
}

// removeFamily deletes the family's rules to the table and its routes.
func (m *Manager) removeFamily(family int) error {
	rules, err := m.ourRules(family)
	if err != nil {
		return err
	}
	for _, r := range rules {
		if err := netlink.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			return wrap("delete ip rule", err)
		}
	}
	routes, err := netlink.RouteListFiltered(family, &netlink.Route{Table: m.cfg.Table}, netlink.RT_FILTER_TABLE)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return wrap("list routes", err)
	}
	for _, r := range routes {
		if err := netlink.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			return wrap(fmt.Sprintf("delete route from table %d", m.cfg.Table), err)
		}
	}
	return nil
}

// keyBytes is the set element key of an intercept: the address, then the
// port padded to a 4-byte register.
func keyBytes(ic Intercept) []byte {
	b := ic.Backend.Unmap().AsSlice()
	return binary.BigEndian.AppendUint32(b, uint32(ic.Port)<<16)
}
