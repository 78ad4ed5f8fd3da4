package netns

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Spec describes a long-running process for StartSpec.
type Spec struct {
	// Args is the program and its arguments; Args[0] is looked up in PATH
	// inside the namespace.
	Args []string
	// Env is added to the test process's environment.
	Env []string
	// Dir is the working directory; "" keeps the test's.
	Dir string
	// Binds are bind mounts made in the process's private mount namespace
	// before the program starts, in order; see PrivateRun.
	Binds []Bind
}

// Bind is one bind mount: Src (a host path) mounted onto Dst.
type Bind struct{ Src, Dst string }

// PrivateRun binds dir onto /run, so that a daemon that writes fixed pid files
// or sockets under /run (= /var/run) does not meet another instance's.
func PrivateRun(dir string) Bind { return Bind{Src: dir, Dst: "/run"} }

// Proc is a process started by Start or StartSpec.
type Proc struct {
	// set once
	name    string
	ns      *NS
	pid     int
	logPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed after the process is reaped; then err is set

	err error
}

// Start runs prog with args inside ns as a long-running process named name
// (the name of its log file, unique within the Lab). See StartSpec.
func (l *Lab) Start(ns *NS, name, prog string, args ...string) *Proc {
	l.t.Helper()
	return l.StartSpec(ns, name, Spec{Args: append([]string{prog}, args...)})
}

// StartSpec starts a long-running process inside ns: in its own process
// group, with stdout and stderr in the log file Dir()/name.log, and killed
// (with its whole group) by the Lab's cleanup if it is still running. It fails
// the test if the process cannot be started.
func (l *Lab) StartSpec(ns *NS, name string, spec Spec) *Proc {
	l.t.Helper()
	if len(spec.Args) == 0 {
		l.t.Fatalf("netns: start %s: no command", name)
	}
	l.mu.Lock()
	base := name
	for i := 2; l.logNames[base]; i++ {
		base = name + "-" + strconv.Itoa(i)
	}
	l.logNames[base] = true
	l.mu.Unlock()
	logPath := filepath.Join(l.dir, base+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		l.t.Fatalf("netns: start %s: %v", name, err)
	}
	defer f.Close() // the child has its own copy

	args := []string{"netns", "exec", ns.name}
	if len(spec.Binds) > 0 {
		// mount --bind SRC DST for each bind, then exec the program: the
		// mounts live in the mount namespace `ip netns exec` made for us.
		script := ""
		for range spec.Binds {
			script += `mount --bind "$1" "$2" || exit 111; shift 2; `
		}
		script += `exec "$@"`
		args = append(args, "sh", "-c", script, "sh")
		for _, b := range spec.Binds {
			args = append(args, b.Src, b.Dst)
		}
	}
	args = append(args, spec.Args...)
	cmd := exec.Command("ip", args...)
	cmd.Env = append(os.Environ(), spec.Env...)
	cmd.Dir = spec.Dir
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		l.t.Fatalf("netns: start %s in %s: %v", name, ns.name, err)
	}
	p := &Proc{name: name, ns: ns, pid: cmd.Process.Pid, logPath: logPath, cmd: cmd, done: make(chan struct{})}
	l.mu.Lock()
	l.procs = append(l.procs, p)
	l.mu.Unlock()
	// The Lab's cleanup waits for this goroutine (through p.done).
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p
}

// Name returns the name given to Start.
func (p *Proc) Name() string { return p.name }

// Pid returns the process id (also its process group id). Because `ip netns
// exec` and the bind-mount shell exec the program, it is the program's pid.
func (p *Proc) Pid() int { return p.pid }

// LogPath returns the path of the file holding the process's stdout and stderr.
func (p *Proc) LogPath() string { return p.logPath }

// Log returns the process's output so far.
func (p *Proc) Log() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return ""
	}
	return string(b)
}

// CountLog returns how many lines of the process's output so far contain
// substr.
func (p *Proc) CountLog(substr string) int {
	n := 0
	for line := range strings.Lines(p.Log()) {
		if strings.Contains(line, substr) {
			n++
		}
	}
	return n
}

// Signal sends sig to the process (not its group).
func (p *Proc) Signal(sig syscall.Signal) error {
	select {
	case <-p.done:
		return ErrExited
	default:
	}
	if err := syscall.Kill(p.pid, sig); err != nil {
		return fmt.Errorf("netns: signal %s: %w", p.name, err)
	}
	return nil
}

// Kill sends SIGKILL to the process's whole group. Killing a group that is
// already gone is not an error.
func (p *Proc) Kill() error {
	err := syscall.Kill(-p.pid, syscall.SIGKILL)
	if err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("netns: kill %s: %w", p.name, err)
	}
	return nil
}

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Wait waits for the process to exit and returns its exit error (nil for
// status 0; an *exec.ExitError otherwise).
func (p *Proc) Wait() error {
	<-p.done
	return p.err
}

// Exited reports whether the process has exited, and if so its exit error.
func (p *Proc) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

func (p *Proc) state() string {
	if exited, err := p.Exited(); exited {
		if err == nil {
			return "exited 0"
		}
		return err.Error()
	}
	return "running"
}
