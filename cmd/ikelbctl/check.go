package main

import (
	"fmt"

	"github.com/spf13/cobra"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

func newCheckCmd(a *app) *cobra.Command {
	var allowDegraded bool
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
    interval 2
    fall 2
    rise 2
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
			st, err := call(a, cmd, c.GetNodeStatus, &ikelbv1.GetNodeStatusRequest{})
			if err != nil {
				if code, msg, ok := rpcError(err); ok {
					return &notReadyError{reason: fmt.Sprintf("%s: %s", code, msg)}
				}
				return &notReadyError{reason: err.Error()}
			}
			if reason := notReady(st, allowDegraded); reason != "" {
				return &notReadyError{reason: reason}
			}
			fmt.Fprintln(a.stdout, "ready")
			return nil
		},
	}
	ready.Flags().BoolVar(&allowDegraded, "allow-degraded", false, "a node without Raft quorum is still ready")
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
	}
	return ""
}
