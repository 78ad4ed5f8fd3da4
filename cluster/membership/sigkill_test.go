package membership

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// The test binary doubles as a member process that TestSIGKILLedMember kills.
const (
	helperEnv         = "MEMBERSHIP_TEST_HELPER" // the member's name
	helperJoinEnv     = "MEMBERSHIP_TEST_HELPER_JOIN"
	helperTunablesEnv = "MEMBERSHIP_TEST_HELPER_TUNABLES" // "default" or "fast"
)

func TestMain(m *testing.M) {
	if name := os.Getenv(helperEnv); name != "" {
		os.Exit(runHelperMember(name))
	}
	os.Exit(m.Run())
}

// runHelperMember joins the cluster, prints "ready", and stays a member
// until its stdin closes (or it is killed).
func runHelperMember(name string) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	cfg := testConfig(log, name)
	cfg.Join = []string{os.Getenv(helperJoinEnv)}
	if os.Getenv(helperTunablesEnv) == "default" {
		cfg.Tunables = Tunables{}
	}
	m, err := New(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer m.Shutdown()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.Join(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// TestSIGKILLedMember measures how long two members take to declare a third,
// running in its own process, failed after it is SIGKILLed, with the
// default tunables and with the tests' fast ones.
func TestSIGKILLedMember(t *testing.T) {
	for _, tc := range []struct {
		name     string
		tunables Tunables
		bound    time.Duration
	}{
		// Default: about 1 s; the bound leaves room for -race on a shared
		// machine without hiding a return to memberlist's LAN profile (5.8 s).
		{"default", Tunables{}, 4 * time.Second},
		{"fast", fastTunables, 3 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log := testLogger(t)
			var observers []*Members
			for _, name := range []string{"a", "b"} {
				cfg := testConfig(log, name)
				cfg.Tunables = tc.tunables
				if len(observers) > 0 {
					cfg.Join = []string{observers[0].LocalAddr().String()}
				}
				m := start(t, cfg)
				join(t, m)
				observers = append(observers, m)
			}

			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), helperEnv+"=victim",
				helperJoinEnv+"="+observers[0].LocalAddr().String(), helperTunablesEnv+"="+tc.name)
			cmd.Stderr = &testWriter{t: t}
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				stdin.Close()
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
			})
			ready := make(chan string, 1)
			go func() {
				line, _ := bufio.NewReader(stdout).ReadString('\n')
				ready <- strings.TrimSpace(line)
				_, _ = io.Copy(io.Discard, stdout)
			}()
			select {
			case line := <-ready:
				if line != "ready" {
					t.Fatalf("helper said %q", line)
				}
			case <-time.After(15 * time.Second):
				t.Fatal("helper member not ready")
			}
			for _, m := range observers {
				waitFor(t, 10*time.Second, "victim alive", hasStatus(m, "victim", StatusAlive))
			}

			if err := cmd.Process.Kill(); err != nil { // SIGKILL
				t.Fatal(err)
			}
			killed := time.Now()
			detected := make([]time.Duration, len(observers))
			waitFor(t, tc.bound, "victim declared failed by a and b", func() (bool, string) {
				var missing []string
				for i, m := range observers {
					if detected[i] != 0 {
						continue
					}
					if mem, _ := member(m, "victim"); mem.Status == StatusFailed {
						detected[i] = time.Since(killed)
					} else {
						missing = append(missing, m.LocalName())
					}
				}
				return len(missing) == 0, fmt.Sprintf("%v still see the victim alive", missing)
			})
			t.Logf("SIGKILLed member declared failed after %v (a) and %v (b) with %s tunables",
				detected[0].Round(time.Millisecond), detected[1].Round(time.Millisecond), tc.name)
		})
	}
}
