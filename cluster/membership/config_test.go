package membership

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

func TestConfigValidate(t *testing.T) {
	valid := testConfig(nil, "n1")
	for _, tc := range []struct {
		name   string
		mutate func(*Config)
		want   string // substring of the error; "" means valid
		is     error  // also errors.Is, besides ErrInvalidConfig
	}{
		{"valid", func(*Config) {}, "", nil},
		{"defaults", func(c *Config) { c.BindAddr, c.Tunables, c.Meta.Role = "", Tunables{}, "" }, "", nil},
		{"advertise without port", func(c *Config) { c.AdvertiseAddr = "10.0.0.1" }, "", nil},
		{"16-byte key", func(c *Config) { c.EncryptKey = make([]byte, 16) }, "", nil},
		{"24-byte key", func(c *Config) { c.EncryptKey = make([]byte, 24) }, "", nil},
		{"name", func(c *Config) { c.Name = "" }, "name: required", nil},
		{"key length", func(c *Config) { c.EncryptKey = []byte("1234567") }, "encrypt_key: must be 16, 24 or 32 bytes, got 7", nil},
		{"bind without port", func(c *Config) { c.BindAddr = "127.0.0.1" }, "bind_addr: want host:port", nil},
		{"bind hostname", func(c *Config) { c.BindAddr = "localhost:7946" }, `bind_addr: host "localhost": want an IP address`, nil},
		{"bind port range", func(c *Config) { c.BindAddr = "127.0.0.1:70000" }, `bind_addr: port "70000"`, nil},
		{"advertise", func(c *Config) { c.AdvertiseAddr = "node1:7946" }, "advertise_addr: ", nil},
		{"join", func(c *Config) { c.Join = []string{"10.0.0.1:7946", "10.0.0.2"} }, "join[1]: want host:port", nil},
		{"raft addr", func(c *Config) { c.Meta.RaftAddr = "" }, "meta.raft_addr: required", nil},
		{"raft addr form", func(c *Config) { c.Meta.RaftAddr = "10.0.0.1" }, "meta.raft_addr: want host:port", nil},
		{"admin addr", func(c *Config) { c.Meta.AdminAddr = "x" }, "meta.admin_addr: want host:port", nil},
		{"role", func(c *Config) { c.Meta.Role = "observer" }, `meta.role: must be "voter" or "witness", got "observer"`, nil},
		{"meta too large", func(c *Config) { c.Meta.Version = strings.Repeat("x", 500) }, "meta: meta too large: encoded size 54", ErrMetaTooLarge},
		{"event buffer", func(c *Config) { c.EventBuffer = -1 }, "event_buffer: must not be negative", nil},
		{"probe timeout", func(c *Config) { c.Tunables.ProbeTimeout = time.Second }, "tunables.probe_timeout 1s: must be less than probe_interval 100ms", nil},
		{"negative", func(c *Config) { c.Tunables.PushPullInterval = -time.Second }, "tunables.push_pull_interval: must not be negative", nil},
		{"suspicion", func(c *Config) { c.Tunables.SuspicionMult = -1 }, "tunables.suspicion_mult: must be at least 1", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := valid
			tc.mutate(&cfg)
			err := cfg.Validate()
			if tc.want == "" {
				if err != nil {
					t.Fatalf("Validate: %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate: %v, want an error containing %q", err, tc.want)
			}
			if !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("%v is not ErrInvalidConfig", err)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("%v is not %v", err, tc.is)
			}
			if _, nerr := New(cfg); nerr == nil || nerr.Error() != err.Error() {
				t.Errorf("New: %v, want the Validate error", nerr)
			}
		})
	}
}

func TestConfigReportsEveryProblem(t *testing.T) {
	err := Config{EncryptKey: []byte{1}}.Validate()
	for _, want := range []string{"name: required", "encrypt_key:", "meta.raft_addr: required"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate: %v, want it to contain %q", err, want)
		}
	}
}

func TestMemberlistConfig(t *testing.T) {
	cfg := testConfig(nil, "n1")
	cfg.BindAddr = "127.0.0.1:7000"
	cfg.AdvertiseAddr = "10.1.2.3"
	cfg.EncryptKey = bytes.Repeat([]byte{7}, 16)
	cfg = cfg.withDefaults()
	mc := cfg.memberlistConfig(&delegate{}, &bytes.Buffer{})
	if mc.BindAddr != "127.0.0.1" || mc.BindPort != 7000 || mc.AdvertiseAddr != "10.1.2.3" || mc.AdvertisePort != 7000 {
		t.Errorf("addresses: bind %s:%d advertise %s:%d", mc.BindAddr, mc.BindPort, mc.AdvertiseAddr, mc.AdvertisePort)
	}
	if !bytes.Equal(mc.SecretKey, cfg.EncryptKey) || &mc.SecretKey[0] == &cfg.EncryptKey[0] {
		t.Error("secret key not copied")
	}
	if mc.ProbeInterval != fastTunables.ProbeInterval || mc.GossipToTheDeadTime != fastTunables.PushPullInterval ||
		mc.DeadNodeReclaimTime != fastTunables.DeadNodeReclaimTime || mc.SuspicionMaxTimeoutMult != 2 {
		t.Errorf("tunables not applied: %+v", mc)
	}
	// Everything not tuned keeps memberlist's LAN value.
	lan := memberlist.DefaultLANConfig()
	if mc.IndirectChecks != lan.IndirectChecks || mc.RetransmitMult != lan.RetransmitMult || mc.GossipNodes != lan.GossipNodes {
		t.Error("untuned settings differ from DefaultLANConfig")
	}
}

func TestMetaEncoding(t *testing.T) {
	full := Meta{RaftAddr: "10.0.0.1:7452", AdminAddr: "127.0.0.1:7450", Role: RoleWitness, Version: "1.2.3"}
	for _, leaving := range []bool{false, true} {
		got, gotLeaving, err := decodeMeta(full.encode(leaving))
		if err != nil || got != full || gotLeaving != leaving {
			t.Errorf("round trip (leaving %v): %+v %v %v", leaving, got, gotLeaving, err)
		}
	}
	// A later version may append fields and set new flag bits.
	b := append(full.encode(false), 9, 9, 9)
	b[2] |= 0x80
	if got, _, err := decodeMeta(b); err != nil || got != full {
		t.Errorf("with trailing bytes: %+v %v", got, err)
	}
	if n := len(full.encode(false)); n > 64 {
		t.Errorf("encoded meta is %d bytes, want compact", n)
	}
	good := full.encode(false)
	for _, tc := range []struct {
		name string
		b    []byte
		want string
	}{
		{"empty", nil, "0 bytes"},
		{"version", append([]byte{2}, good[1:]...), "unknown format version 2"},
		{"role", append([]byte{1, 7}, good[2:]...), "unknown role code 7"},
		{"truncated", good[:len(good)-1], "truncated"},
		{"huge length", []byte{1, 0, 0, 0xff, 0xff, 0x03}, "truncated"},
	} {
		_, _, err := decodeMeta(tc.b)
		if !errors.Is(err, ErrBadMeta) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want ErrBadMeta with %q", tc.name, err, tc.want)
		}
	}
}

// TestUndecodableMetaIsReported: a member with meta this version cannot
// read is listed, with MetaErr, and kept out of AutopilotServers.
func TestUndecodableMetaIsReported(t *testing.T) {
	m := &Members{members: map[string]Member{}, events: make(chan Event, 1), log: slog.New(slog.DiscardHandler)}
	m.observe(EventJoin, &memberlist.Node{Name: "future", Addr: []byte{10, 0, 0, 9}, Port: 7946, Meta: []byte{9, 0, 0}})
	ev := <-m.Events()
	if ev.Kind != EventJoin || !errors.Is(ev.Member.MetaErr, ErrBadMeta) || ev.Member.Addr.String() != "10.0.0.9:7946" {
		t.Errorf("event %+v", ev)
	}
	if s := AutopilotServers(m.Members()); len(s) != 0 {
		t.Errorf("AutopilotServers = %v, want none", s)
	}
}

func TestLogBridge(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug,
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}}))
	w := newLogWriter(log)
	for _, tc := range []struct{ in, want string }{
		{"[DEBUG] memberlist: Stream connection from=127.0.0.1:1\n", `level=DEBUG msg="Stream connection from=127.0.0.1:1" component=memberlist`},
		{"[INFO] memberlist: Marking b as failed\n", `level=INFO msg="Marking b as failed" component=memberlist`},
		{"[WARN] memberlist: Refuting a suspect message (from: a)\n", `level=WARN msg="Refuting a suspect message (from: a)" component=memberlist`},
		{"[ERR] memberlist: Failed to send ping\n", `level=ERROR msg="Failed to send ping" component=memberlist`},
		{"[ERROR] memberlist: x\n", `level=ERROR msg=x component=memberlist`},
		{"[ERR] Failed to shutdown transport: boom\n", `level=ERROR msg="Failed to shutdown transport: boom" component=memberlist`},
		{"[TRACE] memberlist: tiny\n", ``},
		{"no level at all\n", `level=INFO msg="no level at all" component=memberlist`},
		{"[odd] memberlist: y\n", `level=INFO msg="[odd] memberlist: y" component=memberlist`},
	} {
		buf.Reset()
		n, err := w.Write([]byte(tc.in))
		if n != len(tc.in) || err != nil {
			t.Errorf("Write(%q) = %d, %v", tc.in, n, err)
		}
		if got := strings.TrimSpace(buf.String()); got != tc.want {
			t.Errorf("Write(%q) logged %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestLogBridgeWithMemberlist checks that memberlist's own lines arrive at
// their level through a real member.
func TestLogBridgeWithMemberlist(t *testing.T) {
	var got []slog.Record
	h := &recordHandler{mu: &sync.Mutex{}, records: &got}
	cfg := testConfig(slog.New(h), "logger")
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Shutdown(); err != nil {
		t.Fatal(err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range got {
		var comp string
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "component" {
				comp = a.Value.String()
			}
			return true
		})
		// memberlist logs "[DEBUG] memberlist: Using dynamic bind port N".
		if comp == "memberlist" && r.Level == slog.LevelDebug && strings.HasPrefix(r.Message, "Using dynamic bind port") {
			return
		}
	}
	t.Errorf("no debug record from memberlist among %d records", len(got))
}

type recordHandler struct {
	mu      *sync.Mutex
	records *[]slog.Record
	attrs   []slog.Attr
}

func (h *recordHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	r = r.Clone()
	r.AddAttrs(h.attrs...)
	*h.records = append(*h.records, r)
	return nil
}
func (h *recordHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &recordHandler{mu: h.mu, records: h.records, attrs: append(h.attrs[:len(h.attrs):len(h.attrs)], as...)}
}
func (h *recordHandler) WithGroup(string) slog.Handler { return h }
