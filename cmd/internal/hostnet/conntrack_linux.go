package hostnet

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"slices"
	"time"

	mnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/ikelb/ikelb/dataplane"
)

// nat-mode clients the kernel forwards show nowhere in the rules per
// packet: conntrack's entry, made by the first datagram through the DNAT
// rule, carries every later one. Their activity (for touches) and the
// kernel's packet counts are read from conntrack instead: a dump at most
// every ctCountersEvery for the counters, and at most every second when a
// touch round is due.
const ctCountersEvery = 5 * time.Second

// ctKey is one conntrack entry of a nat service's kernel path: client →
// VIP:port, DNATed to a backend. id is conntrack's own: an entry deleted
// (a rebuild, a client leaving the map) or expired, and made again for
// the same tuple between two dumps, is a new entry whose counts start
// from zero, not a continuation of the old one.
type ctKey struct {
	svc    uint32
	client netip.AddrPort
	port   uint16
	id     uint32
}

type ctCounts struct{ pkts, bytes, rpkts, rbytes uint64 }

// ctReader keeps what the dumps showed.
type ctReader struct {
	at   time.Time
	took time.Duration // how long the last dump took
	seq  uint64
	prev map[ctKey]ctCounts
	// totals: per service since the last install, what the entries
	// counted (with net.netfilter.nf_conntrack_acct=1; zero without).
	totals map[uint32]FastCounters
	// reported: the totals counters last returned, per service.
	reported map[uint32]FastCounters
	// active: per client, the seq of the last dump that showed it
	// active — its entry new, or its packet count moved (without
	// accounting: present).
	active map[dataplane.ClientKey]uint64
	// warned: the missing accounting was logged.
	warned bool
}

func (r *ctReader) reset() {
	*r = ctReader{prev: map[ctKey]ctCounts{}, totals: map[uint32]FastCounters{}, reported: map[uint32]FastCounters{},
		active: map[dataplane.ClientKey]uint64{}, warned: r.warned}
}

// ctAccounting reports whether conntrack counts packets per entry.
func ctAccounting() bool {
	b, err := os.ReadFile(ctAcctSysctl)
	return err == nil && string(bytes.TrimSpace(b)) == "1"
}

const ctAcctSysctl = "/proc/sys/net/netfilter/nf_conntrack_acct"

// enableAccounting turns conntrack's per-entry packet accounting on once,
// if it is off: the nat kernel path's counters and touches come from it
// (entries made before count nothing). Where it cannot (a read-only
// /proc/sys), readConntrack says what is missing.
func (k *nftFast) enableAccounting() {
	if k.acctTried || ctAccounting() {
		return
	}
	k.acctTried = true
	if err := os.WriteFile(ctAcctSysctl, []byte("1"), 0); err != nil {
		return
	}
	k.log.Info("fast path: turned conntrack accounting on (net.netfilter.nf_conntrack_acct=1) to count the nat clients the kernel forwards")
}

// countersAge is how old the counters' dump may be: ctCountersEvery,
// or 20 times what the last dump took when that is longer (a large table
// costs no more than 5 % of a core in dumps for the counters).
func (r *ctReader) countersAge() time.Duration { return max(ctCountersEvery, 20*r.took) }

// readConntrack dumps conntrack unless the last dump is younger than
// maxAge, and folds the nat services' entries into k.ct.
func (k *nftFast) readConntrack(maxAge time.Duration) error {
	r := &k.ct
	if r.prev == nil {
		r.reset()
	}
	if !r.at.IsZero() && time.Since(r.at) < maxAge {
		return nil
	}
	byVIP := map[netip.Addr][]*fastService{}
	for _, id := range sortedIDs(k.svcs) {
		if s := k.svcs[id]; !s.transparent && k.ctCarries(id) {
			byVIP[s.vip] = append(byVIP[s.vip], s)
		}
	}
	if len(byVIP) == 0 {
		return nil
	}
	acct := ctAccounting()
	if !acct && !r.warned {
		k.log.Warn("fast path: conntrack accounting is off (net.netfilter.nf_conntrack_acct=0): nat packets the kernel forwards are not counted, and a client counts as active while it has a conntrack entry")
		r.warned = true
	}
	r.at = time.Now()
	r.seq++
	next := make(map[ctKey]ctCounts, len(r.prev))
	interrupted := false
	var errs []error
	for _, v6 := range []bool{false, true} {
		if !hasNATFamily(k.svcs, v6) {
			continue
		}
		fam := uint8(unix.AF_INET)
		if v6 {
			fam = unix.AF_INET6
		}
		err := dumpConntrack(fam, func(e *ctEntry) { k.foldEntry(e, byVIP, next, acct) })
		if errors.Is(err, netlink.ErrDumpInterrupted) {
			interrupted = true // partial: what it held still counts
		} else if err != nil {
			errs = append(errs, wrap("dump conntrack", err))
			interrupted = true
		}
	}
	r.took = time.Since(r.at)
	if interrupted {
		// Entries the dump missed are not gone: keep their counts, or
		// their next sighting would count them twice.
		for key, c := range r.prev {
			if _, ok := next[key]; !ok {
				next[key] = c
			}
		}
	}
	r.prev = next
	present := make(map[dataplane.ClientKey]bool, len(next))
	for key := range next {
		present[dataplane.ClientKey{Service: key.svc, Client: dataplane.AddrFrom(key.client.Addr())}] = true
	}
	for c := range r.active {
		if !present[c] {
			delete(r.active, c)
		}
	}
	return errors.Join(errs...)
}

// foldEntry adds e to next and to the totals and activity if it is a nat
// service's kernel entry.
func (k *nftFast) foldEntry(e *ctEntry, byVIP map[netip.Addr][]*fastService, next map[ctKey]ctCounts, acct bool) {
	r := &k.ct
	if e.proto != unix.IPPROTO_UDP {
		return
	}
	dst, src := e.dst.Addr().Unmap(), e.src.Addr().Unmap()
	if e.replySrc.Unmap() == dst {
		return // not DNATed: a flow of the userspace listener
	}
	var s *fastService
	for _, c := range byVIP[dst] {
		if slices.Contains(c.ports, e.dst.Port()) {
			s = c
			break
		}
	}
	if s == nil {
		return
	}
	key := ctKey{svc: s.id, client: netip.AddrPortFrom(src, e.src.Port()), port: e.dst.Port(), id: e.id}
	if _, seen := next[key]; seen {
		return // an interrupted dump can show an entry twice
	}
	cur := e.counts
	p, had := r.prev[key]
	d := cur
	if had {
		d = ctCounts{sub(cur.pkts, p.pkts), sub(cur.bytes, p.bytes), sub(cur.rpkts, p.rpkts), sub(cur.rbytes, p.rbytes)}
	}
	t := r.totals[s.id]
	t.Packets += d.pkts
	t.Bytes += d.bytes
	t.ReplyPackets += d.rpkts
	t.ReplyBytes += d.rbytes
	r.totals[s.id] = t
	next[key] = cur
	if !had || d.pkts > 0 || !acct {
		r.active[dataplane.ClientKey{Service: s.id, Client: dataplane.AddrFrom(src)}] = r.seq
	}
}

// sub is a − b, or 0 if b is larger (a counter never goes back on the
// same entry).
func sub(a, b uint64) uint64 {
	if a < b {
		return 0
	}
	return a - b
}

// ctEntry is what ikelb reads of one conntrack entry.
type ctEntry struct {
	id       uint32
	proto    uint8
	src, dst netip.AddrPort // original direction
	replySrc netip.Addr
	counts   ctCounts
}

// dumpConntrack streams the family's conntrack table through fn, one
// entry at a time (fn's *ctEntry is reused): the table can hold millions
// of entries, which a dump collected whole and parsed into a structure
// per entry would hold in memory at once, on the balancer's core.
func dumpConntrack(family uint8, fn func(*ctEntry)) error {
	req := nl.NewNetlinkRequest(int(netlink.ConntrackTable)<<8|nl.IPCTNL_MSG_CT_GET, unix.NLM_F_DUMP)
	req.AddData(&nl.Nfgenmsg{NfgenFamily: family, Version: nl.NFNETLINK_V0})
	var e ctEntry
	return req.ExecuteIter(unix.NETLINK_NETFILTER, 0, func(msg []byte) bool {
		if len(msg) > 4 && parseCTEntry(msg[4:], &e) { // after the nfgenmsg
			fn(&e)
		}
		return true
	})
}

// parseCTEntry reads the attributes of one ctnetlink entry into e.
func parseCTEntry(b []byte, e *ctEntry) bool {
	*e = ctEntry{}
	ad, err := mnl.NewAttributeDecoder(b)
	if err != nil {
		return false
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		switch ad.Type() {
		case nl.CTA_TUPLE_ORIG:
			ad.Nested(func(nad *mnl.AttributeDecoder) error {
				e.proto, e.src, e.dst = parseCTTuple(nad)
				return nil
			})
		case nl.CTA_TUPLE_REPLY:
			ad.Nested(func(nad *mnl.AttributeDecoder) error {
				_, src, _ := parseCTTuple(nad)
				e.replySrc = src.Addr()
				return nil
			})
		case nl.CTA_ID:
			e.id = ad.Uint32()
		case nl.CTA_COUNTERS_ORIG:
			ad.Nested(func(nad *mnl.AttributeDecoder) error {
				e.counts.pkts, e.counts.bytes = parseCTCounters(nad)
				return nil
			})
		case nl.CTA_COUNTERS_REPLY:
			ad.Nested(func(nad *mnl.AttributeDecoder) error {
				e.counts.rpkts, e.counts.rbytes = parseCTCounters(nad)
				return nil
			})
		}
	}
	return ad.Err() == nil && e.src.IsValid() && e.dst.IsValid()
}

func parseCTTuple(ad *mnl.AttributeDecoder) (proto uint8, src, dst netip.AddrPort) {
	ad.ByteOrder = binary.BigEndian
	var sa, da netip.Addr
	var sp, dp uint16
	for ad.Next() {
		switch ad.Type() {
		case nl.CTA_TUPLE_IP:
			ad.Nested(func(nad *mnl.AttributeDecoder) error {
				for nad.Next() {
					a, _ := netip.AddrFromSlice(nad.Bytes())
					switch nad.Type() {
					case nl.CTA_IP_V4_SRC, nl.CTA_IP_V6_SRC:
						sa = a
					case nl.CTA_IP_V4_DST, nl.CTA_IP_V6_DST:
						da = a
					}
				}
				return nil
			})
		case nl.CTA_TUPLE_PROTO:
			ad.Nested(func(nad *mnl.AttributeDecoder) error {
				nad.ByteOrder = binary.BigEndian
				for nad.Next() {
					switch nad.Type() {
					case nl.CTA_PROTO_NUM:
						proto = nad.Uint8()
					case nl.CTA_PROTO_SRC_PORT:
						sp = nad.Uint16()
					case nl.CTA_PROTO_DST_PORT:
						dp = nad.Uint16()
					}
				}
				return nil
			})
		}
	}
	if sa.IsValid() {
		src = netip.AddrPortFrom(sa, sp)
	}
	if da.IsValid() {
		dst = netip.AddrPortFrom(da, dp)
	}
	return proto, src, dst
}

func parseCTCounters(ad *mnl.AttributeDecoder) (pkts, bytes uint64) {
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		switch ad.Type() {
		case nl.CTA_COUNTERS_PACKETS:
			pkts = ad.Uint64()
		case nl.CTA_COUNTERS_BYTES:
			bytes = ad.Uint64()
		}
	}
	return pkts, bytes
}

func hasNATFamily(svcs map[uint32]*fastService, v6 bool) bool {
	for _, s := range svcs {
		if !s.transparent && s.v6() == v6 {
			return true
		}
	}
	return false
}

// natActivity is activity for a nat service: per client with a kernel
// entry, the dump seq when it was last active.
func (k *nftFast) natActivity(s *fastService) (map[netip.Addr]uint64, error) {
	if err := k.readConntrack(time.Second); err != nil {
		return nil, err
	}
	out := map[netip.Addr]uint64{}
	for c, seq := range k.ct.active {
		if c.Service == s.id {
			out[c.Client.Netip()] = seq
		}
	}
	return out, nil
}

// handover deletes the conntrack entries client → local of flows, by
// exact tuple, in batches of netlink messages on one socket (a client
// moves to the kernel at its next datagram; one request and socket per
// entry took seconds for a thousand clients while the core was busy
// forwarding them). An entry already gone is no error.
//
// The tuple given is the reply direction, local → client: only an entry
// of the listener has it. The client's DNAT entry that replaces it has
// the same original tuple, and the engine asks again while datagrams
// still arrive, so deleting by the original tuple would delete that one
// too, and its counts with it.
func (k *nftFast) handover(flows []ctFlow) error {
	conn, err := mnl.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return wrap("conntrack netlink", err)
	}
	defer conn.Close()
	// Failures answer with a short header, not a copy of the request: a
	// batch of ENOENTs fits the socket's receive buffer.
	_ = conn.SetOption(mnl.CapAcknowledge, true)
	var errs []error
	for len(flows) > 0 {
		n := min(len(flows), ctDeleteBatch)
		if err := deleteConntrack(conn, flows[:n]); err != nil {
			errs = append(errs, err)
		}
		flows = flows[n:]
	}
	return errors.Join(errs...)
}

// sweep deletes the entries to a nat service's listener of the clients
// forwards names: original destination a VIP:port of the service, reply
// from that same address (an entry the DNAT rule made answers from the
// backend). One streamed dump per family, then batched deletes by reply
// tuple (handover).
func (k *nftFast) sweep(svcs map[uint32]*fastService, forwards func(dataplane.ClientKey) bool) (int, error) {
	byVIP := map[netip.AddrPort]uint32{}
	for id, s := range svcs {
		if s.transparent {
			continue
		}
		for _, p := range s.ports {
			byVIP[netip.AddrPortFrom(s.vip, p)] = id
		}
	}
	var flows []ctFlow
	var errs []error
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		if !hasNATFamily(svcs, fam == unix.AF_INET6) {
			continue
		}
		err := dumpConntrack(fam, func(e *ctEntry) {
			dst := netip.AddrPortFrom(e.dst.Addr().Unmap(), e.dst.Port())
			id, ok := byVIP[dst]
			if !ok || e.proto != unix.IPPROTO_UDP || e.replySrc.Unmap() != dst.Addr() {
				return
			}
			if forwards(dataplane.ClientKey{Service: id, Client: dataplane.AddrFrom(e.src.Addr().Unmap())}) {
				flows = append(flows, ctFlow{client: e.src, local: dst})
			}
		})
		if err != nil {
			errs = append(errs, err)
		}
	}
	if len(flows) > 0 {
		if err := k.handover(flows); err != nil {
			errs = append(errs, err)
		}
	}
	return len(flows), errors.Join(errs...)
}

// ctDeleteBatch is the most delete requests sent in one sendmsg (about
// 80 bytes each; the kernel runs them all within that call).
const ctDeleteBatch = 256

// deleteConntrack deletes flows' entries (by reply tuple) with one sendmsg
// and as few reads as it can: the deletes ask for no acknowledgement, so
// only failures are answered (ENOENT: the entry is gone already, no
// error), and a NLMSG_NOOP with an acknowledgement closes the batch — its
// ack comes after every other answer. Acknowledging every delete took one
// read per entry: on a core saturated by the traffic being handed over,
// about 1,000 deletes/s, and 100,000 clients bound at once were not all
// moved to the kernel after a minute.
func deleteConntrack(conn *mnl.Conn, flows []ctFlow) error {
	msgs := make([]mnl.Message, 0, len(flows)+1)
	for _, fl := range flows {
		c, l := fl.client.Addr().Unmap(), fl.local.Addr().Unmap()
		fam, srcAttr, dstAttr := uint8(unix.AF_INET), uint16(nl.CTA_IP_V4_SRC), uint16(nl.CTA_IP_V4_DST)
		if !c.Is4() {
			fam, srcAttr, dstAttr = unix.AF_INET6, nl.CTA_IP_V6_SRC, nl.CTA_IP_V6_DST
		}
		ae := mnl.NewAttributeEncoder()
		ae.Nested(unix.NLA_F_NESTED|nl.CTA_TUPLE_REPLY, func(ae *mnl.AttributeEncoder) error {
			ae.Nested(unix.NLA_F_NESTED|nl.CTA_TUPLE_IP, func(ae *mnl.AttributeEncoder) error {
				ae.Bytes(srcAttr, l.AsSlice())
				ae.Bytes(dstAttr, c.AsSlice())
				return nil
			})
			ae.Nested(unix.NLA_F_NESTED|nl.CTA_TUPLE_PROTO, func(ae *mnl.AttributeEncoder) error {
				ae.Uint8(nl.CTA_PROTO_NUM, unix.IPPROTO_UDP)
				ae.Bytes(nl.CTA_PROTO_SRC_PORT, binary.BigEndian.AppendUint16(nil, fl.local.Port()))
				ae.Bytes(nl.CTA_PROTO_DST_PORT, binary.BigEndian.AppendUint16(nil, fl.client.Port()))
				return nil
			})
			return nil
		})
		attrs, err := ae.Encode()
		if err != nil {
			return wrap("encode conntrack delete", err)
		}
		msgs = append(msgs, mnl.Message{
			Header: mnl.Header{
				Type:  mnl.HeaderType(unix.NFNL_SUBSYS_CTNETLINK<<8 | nl.IPCTNL_MSG_CT_DELETE),
				Flags: mnl.Request,
			},
			Data: append(nfgenHeader(fam, 0), attrs...),
		})
	}
	msgs = append(msgs, mnl.Message{Header: mnl.Header{Type: unix.NLMSG_NOOP, Flags: mnl.Request | mnl.Acknowledge}})
	sent, err := conn.SendMessages(msgs)
	if err != nil {
		return wrap("delete conntrack entries", err)
	}
	end := sent[len(sent)-1].Header.Sequence
	if err := conn.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return wrap("delete conntrack entries", err)
	}
	var errs []error
	for {
		replies, err := conn.Receive()
		if err != nil {
			var oe *mnl.OpError
			if !errors.As(err, &oe) || errors.Is(err, os.ErrDeadlineExceeded) {
				return errors.Join(append(errs, wrap("delete conntrack entries", err))...)
			}
			if !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, wrap("delete conntrack entry", err))
			}
			continue
		}
		for _, m := range replies {
			if m.Header.Sequence == end {
				return errors.Join(errs...)
			}
		}
	}
}
