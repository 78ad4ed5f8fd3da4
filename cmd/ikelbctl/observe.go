package main

import (
	"fmt"
	"strconv"

	"github.com/spf13/cobra"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

func optional(args []string) string {
	if len(args) > 0 {
		return args[0]
	}
	return ""
}

func newHealthCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "health [SERVICE]",
		Short: "Show the committed health of every backend",
		Args:  maxArgs("SERVICE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			resp, err := call(a, cmd, c.GetHealth, &ikelbv1.GetHealthRequest{Service: optional(args)})
			if err != nil {
				return err
			}
			if a.output != "table" {
				return a.printMessage(resp)
			}
			t := newTable(a.stdout, "SERVICE", "BACKEND", "HEALTH", "SINCE", "LAST-ERROR")
			for _, b := range resp.GetBackends() {
				t.row(b.GetService(), b.GetBackend(), healthName(b.GetHealth()), a.age(b.GetChanged()), b.GetLastError())
			}
			return t.flush()
		},
	}
}

func newCountersCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "counters [SERVICE]",
		Short: "Show this node's traffic counters per service and backend",
		Long: `Show this node's traffic counters: each node counts what it forwards itself.
A service's row has BACKEND "*"; the rows under it are its backends.
CLIENTS are committed affinities (the same on every node).`,
		Args: maxArgs("SERVICE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			resp, err := call(a, cmd, c.GetCounters, &ikelbv1.GetCountersRequest{Service: optional(args)})
			if err != nil {
				return err
			}
			if a.output != "table" {
				return a.printMessage(resp)
			}
			t := newTable(a.stdout, "SERVICE", "BACKEND", "PACKETS", "BYTES", "REPLY-PACKETS", "REPLY-BYTES", "DROPS", "CLIENTS")
			for _, s := range resp.GetServices() {
				t.row(s.GetName(), "*", s.GetPackets(), s.GetBytes(), s.GetReplyPackets(), s.GetReplyBytes(), s.GetDrops(), s.GetActiveClients())
				for _, b := range s.GetBackends() {
					t.row(s.GetName(), b.GetAddress(), b.GetPackets(), b.GetBytes(), b.GetReplyPackets(), b.GetReplyBytes(), "", b.GetActiveClients())
				}
			}
			return t.flush()
		},
	}
}

func newStatusCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show this node's status",
		Args:  exactArgs(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			st, err := call(a, cmd, c.GetNodeStatus, &ikelbv1.GetNodeStatusRequest{})
			if err != nil {
				return err
			}
			if a.output != "table" {
				return a.printMessage(st)
			}
			started := "-"
			if st.GetStarted() != nil {
				started = fmt.Sprintf("%s (%s ago)", st.GetStarted().AsTime().Local().Format("2006-01-02 15:04:05"), a.age(st.GetStarted()))
			}
			degraded := yesNo(st.GetDegraded())
			if st.GetDegraded() {
				degraded += " (no raft quorum: forwarding by the last committed table)"
			}
			dp := "ok"
			if e := st.GetDataplaneError(); e != "" {
				dp = "error (retrying): " + e
			}
			return keyValues(a.stdout,
				"Node", st.GetName(),
				"Version", st.GetVersion(),
				"Role", st.GetRole(),
				"Raft state", st.GetRaftState(),
				"Leader", st.GetLeader(),
				"Indexes", fmt.Sprintf("last %d, commit %d, applied %d", st.GetLastIndex(), st.GetCommitIndex(), st.GetAppliedIndex()),
				"Degraded", degraded,
				"Dataplane", dp,
				"Services", strconv.FormatUint(uint64(st.GetServices()), 10),
				"Affinities", strconv.FormatUint(st.GetAffinities(), 10),
				"Proposals dropped", strconv.FormatUint(st.GetProposalsDropped(), 10),
				"Started", started,
			)
		},
	}
}

func newClusterCmd(a *app) *cobra.Command {
	return group("cluster", "Show the cluster",
		&cobra.Command{
			Use:   "status",
			Short: "Show members, roles, the leader and Raft replication",
			Args:  exactArgs(),
			RunE: func(cmd *cobra.Command, _ []string) error {
				c, err := a.client()
				if err != nil {
					return err
				}
				st, err := call(a, cmd, c.GetClusterStatus, &ikelbv1.GetClusterStatusRequest{})
				if err != nil {
					return err
				}
				if a.output != "table" {
					return a.printMessage(st)
				}
				if err := keyValues(a.stdout,
					"Leader", st.GetLeader(),
					"Term", strconv.FormatUint(st.GetTerm(), 10),
					"Indexes", fmt.Sprintf("last %d, commit %d", st.GetLastIndex(), st.GetCommitIndex()),
				); err != nil {
					return err
				}
				fmt.Fprintln(a.stdout)
				t := newTable(a.stdout, "NAME", "ROLE", "SUFFRAGE", "STATUS", "LEADER", "RAFT-ADDRESS", "ADMIN-ADDRESS", "MATCH-INDEX", "LAG")
				for _, m := range st.GetMembers() {
					leader := ""
					if m.GetLeader() {
						leader = "*"
					}
					t.row(m.GetName(), m.GetRole(), m.GetSuffrage(), m.GetStatus(), leader, m.GetRaftAddress(),
						m.GetAdminAddress(), m.GetMatchIndex(), m.GetLag())
				}
				return t.flush()
			},
		},
	)
}
