package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

func newCheckCmd(a *app) *cobra.Command {
	var allowDegraded bool
	var w watchOptions
	ready := &cobra.Command{
		Use:   "ready",
		Short: "Exit 0 if this node can serve traffic, else 1 with the reason (for keepalived)",
		Long: `Exit 0 if this node can serve traffic, else exit 1 and print the reason.
Meant for a keepalived track script; the default timeout is 1s.

Ready means: the admin API answers, the node is a voter (a witness has no
dataplane), it knows a Raft leader, it is not degraded (it reaches a quorum),
and it has at least one service.

Caution: when every node of an HA pair loses quorum at once, all of them fail
this check and keepalived may leave the VIP nowhere. --allow-degraded accepts
a degraded node (it forwards by its last committed table).

  vrrp_script ikelb {
    script "/usr/bin/ikelbctl check ready"
    interval 1
    fall 2
    rise 2
  }

With --track-file PATH it keeps running instead: it checks every --interval
and writes 0 (ready) or 1 (not ready) to PATH whenever that changes, for a
keepalived track_file with weight 0, which keepalived re-reads at once
(inotify). A killed ikelbd (the connection is refused) is then noticed
within one interval instead of the track script's interval × fall. A
not-ready answer or a timed-out request counts only after --fall in a row
(default 10, 2 s): the surviving node has no Raft leader for a moment
while the cluster elects one, and must not give up the VIP for that. Ready
again after --rise in a row. On exit (SIGTERM) it writes 1: the file
vouches for the node only while a watcher runs. Keep the track script as
well: it notices a watcher that died.

  track_file ikelb_ready_file {
    file /run/ikelb/ready
    weight 0
    init_file 1 overwrite
  }`,
		Args: exactArgs(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !cmd.Flags().Changed("timeout") {
				a.timeout = defaultCheckTimeout
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			// hard: ikelbd is not there at all (connection refused).
			check := func() (reason string, hard bool) {
				st, err := call(a, cmd, c.GetNodeStatus, &ikelbv1.GetNodeStatusRequest{})
				if err != nil {
					if code, msg, ok := rpcError(err); ok {
						return fmt.Sprintf("%s: %s", code, msg), code == codes.Unavailable
					}
					return err.Error(), true
				}
				return notReady(st, allowDegraded), false
			}
			if w.file != "" {
				return w.run(cmd.Context(), a, check)
			}
			if reason, _ := check(); reason != "" {
				return &notReadyError{reason: reason}
			}
			fmt.Fprintln(a.stdout, "ready")
			return nil
		},
	}
	ready.Flags().BoolVar(&allowDegraded, "allow-degraded", false, "a node without Raft quorum is still ready")
	ready.Flags().StringVar(&w.file, "track-file", "", "keep checking and write 0 (ready) / 1 (not) to this file for keepalived's track_file")
	ready.Flags().DurationVar(&w.interval, "interval", 200*time.Millisecond, "with --track-file: time between checks")
	ready.Flags().IntVar(&w.fall, "fall", 10, "with --track-file: not-ready or timed-out checks in a row before not ready (a refused connection: at once)")
	ready.Flags().IntVar(&w.rise, "rise", 2, "with --track-file: ready checks in a row before ready again")
	return group("check", "Health checks for scripts", ready)
}

// notReady returns why st cannot serve, or "" when it can.
func notReady(st *ikelbv1.GetNodeStatusResponse, allowDegraded bool) string {
	switch {
	case st.GetRole() == "witness":
		return "node is a witness (no dataplane)"
	case st.GetDegraded() && !allowDegraded:
		return "degraded: no raft quorum"
	case st.GetLeader() == "" && !allowDegraded:
		return "no raft leader"
	case st.GetServices() == 0:
		return "no services"
	case st.GetDataplaneError() != "":
		return "dataplane: " + st.GetDataplaneError()
	}
	return ""
}
