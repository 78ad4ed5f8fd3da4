package main

import (
	"context"
	"io"
	"net"
	"strings"
	"testing"
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
