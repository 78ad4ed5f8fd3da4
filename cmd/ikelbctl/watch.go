package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// watchOptions are `check ready --track-file`'s.
type watchOptions struct {
	file       string
	interval   time.Duration
	fall, rise int
}

// run checks every interval until ctx ends and keeps w.file at "0\n"
// (ready) or "1\n" (not ready), written only on a change, by rename so
// that a reader never sees a partial value. It starts not ready (and
// writes that at once), and writes "1\n" on its way out.
func (w *watchOptions) run(ctx context.Context, a *app, check func() (reason string, hard bool)) error {
	switch {
	case w.interval <= 0:
		return usagef("--interval: must be positive, got %v", w.interval)
	case w.fall < 1 || w.rise < 1:
		return usagef("--fall and --rise: must be at least 1, got %d and %d", w.fall, w.rise)
	}
	ready, written := false, false
	set := func(r bool, why string) error {
		if written && r == ready {
			return nil
		}
		v := "1\n"
		if r {
			v = "0\n"
		}
		if err := writeAtomic(w.file, v); err != nil {
			return fmt.Errorf("--track-file: %w", err)
		}
		ready, written = r, true
		if r {
			fmt.Fprintf(a.stdout, "%s ready\n", time.Now().Format(time.RFC3339Nano))
		} else {
			fmt.Fprintf(a.stdout, "%s not ready: %s\n", time.Now().Format(time.RFC3339Nano), why)
		}
		return nil
	}
	if err := set(false, "starting"); err != nil {
		return err
	}
	defer func() { _ = writeAtomic(w.file, "1\n") }()
	tick := time.NewTicker(w.interval)
	defer tick.Stop()
	oks, fails := 0, 0
	for {
		reason, hard := check()
		switch {
		case reason == "":
			oks, fails = oks+1, 0
			if oks >= w.rise || ready {
				if err := set(true, ""); err != nil {
					return err
				}
			}
		default:
			oks, fails = 0, fails+1
			if hard || fails >= w.fall {
				if err := set(false, reason); err != nil {
					return err
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// writeAtomic replaces path with content through a temporary file in the
// same directory.
func writeAtomic(path, content string) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name()) // after a successful rename: already gone
	if _, err := f.WriteString(content); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
