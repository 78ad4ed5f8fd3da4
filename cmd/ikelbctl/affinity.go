package main

import (
	"fmt"

	"github.com/spf13/cobra"

	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

// maxPageSize is the largest page the server returns.
const maxPageSize = 10000

func newAffinityCmd(a *app) *cobra.Command {
	var lf struct {
		service, backend string
		limit            int
		all              bool
	}
	list := &cobra.Command{
		Use:   "list [--service S] [--backend B] [--limit N | --all]",
		Short: "List committed affinities (client → backend)",
		Args:  exactArgs(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if lf.limit <= 0 && !lf.all {
				return usagef("--limit: must be positive (or use --all), got %d", lf.limit)
			}
			return a.affinityList(cmd, lf.service, lf.backend, lf.limit, lf.all)
		},
	}
	list.Flags().StringVar(&lf.service, "service", "", "only this service")
	list.Flags().StringVar(&lf.backend, "backend", "", "only clients of this backend address")
	list.Flags().IntVar(&lf.limit, "limit", 100, "print at most N affinities")
	list.Flags().BoolVar(&lf.all, "all", false, "print every affinity (follows all pages)")

	var flushBackend string
	flush := &cobra.Command{
		Use:   "flush SERVICE [--backend B]",
		Short: "Delete every affinity of a service, or only those of one backend",
		Args:  exactArgs("SERVICE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			resp, err := call(a, cmd, c.FlushAffinities, &ikelbv1.FlushAffinitiesRequest{Service: args[0], Backend: flushBackend})
			if err != nil {
				return err
			}
			if a.output != "table" {
				return a.printMessage(resp)
			}
			of := args[0]
			if flushBackend != "" {
				of += " backend " + flushBackend
			}
			fmt.Fprintf(a.stdout, "%d affinities of %s deleted\n", resp.GetDeleted(), of)
			return nil
		},
	}
	flush.Flags().StringVar(&flushBackend, "backend", "", "only clients of this backend address")

	return group("affinity", "Look up, list and delete client → backend affinities",
		&cobra.Command{
			Use:   "lookup SERVICE CLIENT",
			Short: "Show which backend a client is bound to",
			Args:  exactArgs("SERVICE", "CLIENT"),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := a.client()
				if err != nil {
					return err
				}
				resp, err := call(a, cmd, c.LookupAffinity, &ikelbv1.LookupAffinityRequest{Service: args[0], Client: args[1]})
				if err != nil {
					return err
				}
				if a.output != "table" {
					return a.printMessage(resp.GetAffinity())
				}
				return a.affinityTable([]*ikelbv1.Affinity{resp.GetAffinity()})
			},
		},
		list,
		&cobra.Command{
			Use:   "delete SERVICE CLIENT",
			Short: "Forget a client's affinity; its next packet chooses again",
			Args:  exactArgs("SERVICE", "CLIENT"),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := a.client()
				if err != nil {
					return err
				}
				resp, err := call(a, cmd, c.DeleteAffinity, &ikelbv1.DeleteAffinityRequest{Service: args[0], Client: args[1]})
				if err != nil {
					return err
				}
				if a.output != "table" {
					return a.printMessage(resp)
				}
				fmt.Fprintf(a.stdout, "affinity of %s in %s deleted\n", args[1], args[0])
				return nil
			},
		},
		flush,
	)
}

// affinityList follows page tokens until limit affinities (or, with all,
// every one) are read.
func (a *app) affinityList(cmd *cobra.Command, service, backend string, limit int, all bool) error {
	c, err := a.client()
	if err != nil {
		return err
	}
	out := &ikelbv1.ListAffinitiesResponse{}
	token := ""
	for {
		size := maxPageSize
		if !all {
			size = min(size, limit-len(out.Affinities))
		}
		resp, err := call(a, cmd, c.ListAffinities, &ikelbv1.ListAffinitiesRequest{
			Service: service, Backend: backend, PageSize: uint32(size), PageToken: token,
		})
		if err != nil {
			return err
		}
		got := resp.GetAffinities()
		if !all && len(out.Affinities)+len(got) > limit {
			got = got[:limit-len(out.Affinities)]
		}
		out.Affinities = append(out.Affinities, got...)
		token = resp.GetNextPageToken()
		if token == "" || (!all && len(out.Affinities) >= limit) {
			break
		}
	}
	out.NextPageToken = token
	if a.output != "table" {
		return a.printMessage(out)
	}
	if err := a.affinityTable(out.Affinities); err != nil {
		return err
	}
	if token != "" {
		fmt.Fprintf(a.stderr, "(first %d shown; use --limit N or --all for more)\n", len(out.Affinities))
	}
	return nil
}

func (a *app) affinityTable(affs []*ikelbv1.Affinity) error {
	t := newTable(a.stdout, "SERVICE", "CLIENT", "BACKEND", "AGE", "LAST-SEEN")
	for _, f := range affs {
		t.row(f.GetService(), f.GetClient(), f.GetBackend(), a.age(f.GetCreated()), a.age(f.GetLastSeen()))
	}
	return t.flush()
}
