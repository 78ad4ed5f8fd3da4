package persist

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"
)

func TestNewHCLogBridgesToSlog(t *testing.T) {
	var buf bytes.Buffer
	l := NewHCLog(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})), "raft")
	l.Warn("failed to contact", "server-id", "n2", "error", errors.New("dial refused"))
	l.Debug("hidden at info")
	l.Named("net").With("peer addr", "10.0.0.1").Info("hello")
	out := buf.String()
	for _, want := range []string{
		`level=WARN msg="failed to contact" component=raft server_id=n2 error="dial refused"`,
		`component=raft.net`,
		`peer_addr=10.0.0.1`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "hidden at info") {
		t.Errorf("debug logged at info level:\n%s", out)
	}
	if l.IsDebug() || !l.IsWarn() {
		t.Errorf("IsDebug=%v IsWarn=%v at info level", l.IsDebug(), l.IsWarn())
	}
}
