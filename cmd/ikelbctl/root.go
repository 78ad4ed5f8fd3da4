package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

const (
	defaultAddr         = "127.0.0.1:7450"
	defaultTimeout      = 10 * time.Second
	defaultCheckTimeout = time.Second
)

// Exit statuses; see the package doc.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

// app is one invocation: the global flags, the streams and the connection.
type app struct {
	// Set once by run.
	stdin          io.Reader
	stdout, stderr io.Writer
	now            func() time.Time

	// Global flags.
	addr    string
	output  string
	timeout time.Duration

	// Dialled on first use by client.
	conn *grpc.ClientConn
}

// usageError is a mistake in how ikelbctl was called: exit status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// notReadyError is `check ready`'s answer when the node cannot serve.
type notReadyError struct{ reason string }

func (e *notReadyError) Error() string { return "not ready: " + e.reason }

// run executes one command line and returns the exit status; it is main
// without the process around it.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) int {
	a := &app{stdin: stdin, stdout: stdout, stderr: stderr, now: time.Now}
	root := newRootCmd(a, getenv)
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if a.conn != nil {
		a.conn.Close()
	}
	path := root.Name()
	if cmd != nil {
		path = cmd.CommandPath()
	}
	return report(stderr, path, err)
}

// report prints err and returns the exit status for it; path is the command
// that failed, for the usage hint.
func report(w io.Writer, path string, err error) int {
	if err == nil {
		return exitOK
	}
	var nr *notReadyError
	if errors.As(err, &nr) {
		fmt.Fprintln(w, err)
		return exitError
	}
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(w, "error: %s\nRun '%s --help' for usage.\n", err, path)
		return exitUsage
	}
	if code, msg, ok := rpcError(err); ok {
		fmt.Fprintf(w, "error: %s: %s\n", code, msg)
		if code == codes.InvalidArgument {
			return exitUsage
		}
		return exitError
	}
	fmt.Fprintf(w, "error: %s\n", err)
	return exitError
}

// rpcError finds a gRPC status in err; msg is the status message, preceded
// by whatever context err added around it.
func rpcError(err error) (codes.Code, string, bool) {
	var se interface {
		error
		GRPCStatus() *status.Status
	}
	if !errors.As(err, &se) {
		return codes.OK, "", false
	}
	st := se.GRPCStatus()
	prefix := strings.TrimSuffix(err.Error(), se.Error())
	return st.Code(), prefix + st.Message(), true
}

func newRootCmd(a *app, getenv func(string) string) *cobra.Command {
	addr := getenv("IKELB_ADDR")
	if addr == "" {
		addr = defaultAddr
	}
	root := &cobra.Command{
		Use:   "ikelbctl",
		Short: "Control an ikelb cluster through a node's admin API",
		Long: `ikelbctl drives ikelbd's admin API (gRPC, plaintext).

Exit status: 0 success; 1 the request failed (printed as "error: <code>: <message>"),
or "check ready" found the node not ready; 2 bad usage, an invalid spec file, or
the server answered InvalidArgument.`,
		SilenceErrors:     true,
		SilenceUsage:      true,
		Args:              noArgs,
		RunE:              func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
		PersistentPreRunE: a.checkGlobals,
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &usageError{msg: err.Error()} })
	pf := root.PersistentFlags()
	pf.StringVar(&a.addr, "addr", addr, "admin API address of an ikelbd (env IKELB_ADDR)")
	pf.StringVarP(&a.output, "output", "o", "table", "output format: table, json or yaml")
	pf.DurationVar(&a.timeout, "timeout", defaultTimeout, "timeout of each request (check ready: default 1s)")

	root.AddCommand(
		newServiceCmd(a),
		newBackendCmd(a),
		newAffinityCmd(a),
		newHealthCmd(a),
		newCountersCmd(a),
		newStatusCmd(a),
		newClusterCmd(a),
		newApplyCmd(a),
		newCheckCmd(a),
	)
	return root
}

func (a *app) checkGlobals(cmd *cobra.Command, _ []string) error {
	switch a.output {
	case "table", "json", "yaml":
	default:
		return usagef("--output: %q is not one of table, json, yaml", a.output)
	}
	if a.timeout <= 0 {
		return usagef("--timeout: must be positive, got %v", a.timeout)
	}
	if a.addr == "" {
		return usagef("--addr: must be set")
	}
	return nil
}

// client returns the admin client, connecting on first use. grpc.NewClient
// does not dial until the first request, so a down server shows up as that
// request's Unavailable error.
func (a *app) client() (ikelbv1.AdminServiceClient, error) {
	if a.conn == nil {
		// Reconnect backoff capped at 1 s (gRPC's default grows to 120 s):
		// `check ready --track-file` must see a restarted ikelbd soon.
		bo := backoff.DefaultConfig
		bo.MaxDelay = time.Second
		conn, err := grpc.NewClient(a.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: time.Second}))
		if err != nil {
			return nil, usagef("--addr %q: %v", a.addr, err)
		}
		a.conn = conn
	}
	return ikelbv1.NewAdminServiceClient(a.conn), nil
}

// call runs one request with the --timeout deadline.
func call[Req, Resp any](a *app, cmd *cobra.Command, rpc func(context.Context, Req, ...grpc.CallOption) (Resp, error), req Req) (Resp, error) {
	ctx, cancel := context.WithTimeout(cmd.Context(), a.timeout)
	defer cancel()
	return rpc(ctx, req)
}

// group makes a command that only holds subcommands: alone it prints its
// help; with an unknown subcommand it is a usage error.
func group(use, short string, subs ...*cobra.Command) *cobra.Command {
	c := &cobra.Command{
		Use:   use,
		Short: short,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usagef("unknown command %q for %q", args[0], cmd.CommandPath())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	c.AddCommand(subs...)
	return c
}

func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("unknown command %q for %q", args[0], cmd.CommandPath())
	}
	return nil
}

// exactArgs requires the named positional arguments.
func exactArgs(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != len(names) {
			return usagef("%s takes %d argument(s): %s (got %d)", cmd.CommandPath(), len(names), strings.Join(names, " "), len(args))
		}
		return nil
	}
}

// maxArgs allows up to len(names) optional positional arguments.
func maxArgs(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) > len(names) {
			return usagef("%s takes at most %d argument(s): [%s] (got %d)", cmd.CommandPath(), len(names), strings.Join(names, " "), len(args))
		}
		return nil
	}
}
