package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// A start that fails part-way (here: the admin address is taken) returns a
// clear error naming the field and stops what it had started.
func TestStartFailsCleanlyOnBusyAdminAddress(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	cfg, err := LoadConfig("")
	if err != nil {
		t.Fatal(err)
	}
	cfg.DataDir = t.TempDir()
	cfg.AdminAddress = busy.Addr().String()
	cfg.MetricsAddress = ""
	cfg.Raft.BindAddress = "127.0.0.1:0"
	d, err := startDaemon(context.Background(), cfg, newLogger(io.Discard, "info"))
	if err == nil {
		d.Close()
		t.Fatal("start succeeded on a busy admin address")
	}
	if !strings.Contains(err.Error(), "admin_address") {
		t.Fatalf("error does not name admin_address: %v", err)
	}
}

// lockedBuffer is an io.Writer safe for the daemon's goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// The config file only creates missing services. A restart with the same
// file says the service exists; a restart with an edited one warns that
// the edit is not applied, naming what differs.
func TestConfigServiceDrift(t *testing.T) {
	dir := t.TempDir()
	config := func(weight int) string {
		path := filepath.Join(dir, "ikelbd.yaml")
		y := fmt.Sprintf(`node: drift
data_dir: %s
admin_address: 127.0.0.1:0
metrics_address: ""
raft: {bind_address: 127.0.0.1:0}
dataplane: {kernel_fast_path: false}
services:
  - name: vpn
    vip: 127.0.0.61
    ports: [45061]
    persistence_timeout: 8h
    health_check: {type: none}
    backends:
      - {address: 127.0.0.62, weight: %d}
`, filepath.Join(dir, "data"), weight)
		if err := os.WriteFile(path, []byte(y), 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	run := func(weight int, want string) string {
		t.Helper()
		cfg, err := LoadConfig(config(weight))
		if err != nil {
			t.Fatal(err)
		}
		var log lockedBuffer
		d, err := startDaemon(context.Background(), cfg, newLogger(&log, "info"))
		if err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for !strings.Contains(log.String(), want) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond) // polling the log, bounded by deadline
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(log.String(), want) {
			t.Fatalf("no %q in the log:\n%s", want, log.String())
		}
		return log.String()
	}
	run(100, "created service from config")
	if out := run(100, "service from config already exists"); strings.Contains(out, "differs") {
		t.Errorf("the same config warned of a difference:\n%s", out)
	}
	out := run(50, "service in config differs from the replicated state")
	if !strings.Contains(out, "differs=backends") {
		t.Errorf("the warning does not name backends:\n%s", out)
	}
}
