package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ikelb/ikelb/cmd/internal/spec"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

// applyResult is what apply did to one service.
type applyResult struct {
	Service string   `json:"service"`
	Action  string   `json:"action"` // created | updated | unchanged | deleted
	Changes []string `json:"changes,omitempty"`
}

func newApplyCmd(a *app) *cobra.Command {
	var file string
	var prune, dryRun bool
	cmd := &cobra.Command{
		Use:   "apply -f FILE [--prune] [--dry-run]",
		Short: "Make services match a YAML file (create, update, optionally delete)",
		Long: `Make the cluster's services match FILE ("-" reads stdin): services missing from
the cluster are created; services that differ are updated with compare-and-set
against the version just read, so a concurrent change fails with Aborted instead
of being overwritten; equal services are left alone. With --prune, services not
in FILE are deleted. Each service is reported as created, updated (with the
fields that changed), unchanged or deleted. Stops at the first error.

The format (see "ikelbctl service get NAME -o yaml" for an existing service):

services:
  - name: vpn
    vip: 198.18.2.100
    ports: [500, 4500]          # default
    persistence_timeout: 8h     # Go duration, default 5m
    forwarding_mode: nat        # nat | transparent
    affinity_key: source-ip
    snat_address: 198.18.2.100  # optional, nat only
    health_check: {type: ikev2, interval: 5s, timeout: 2s, rise: 2, fall: 3, port: 500}
    backends:
      - {address: 10.0.0.11, weight: 100, state: active}   # active|drain|disabled`,
		Args: exactArgs(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if file == "" {
				return usagef("apply: -f FILE is required")
			}
			return a.apply(cmd, file, prune, dryRun)
		},
	}
	cmd.Flags().StringVarP(&file, "filename", "f", "", "YAML file with a services: list (- for stdin)")
	cmd.Flags().BoolVar(&prune, "prune", false, "delete services that are not in the file")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "report what would change without changing it")
	return cmd
}

func (a *app) apply(cmd *cobra.Command, file string, prune, dryRun bool) error {
	var data []byte
	var err error
	if file == "-" {
		data, err = io.ReadAll(a.stdin)
		file = "stdin"
	} else {
		data, err = os.ReadFile(file)
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", file, err)
	}
	desired, err := spec.Parse(data, file)
	if err != nil {
		if fes := spec.FieldErrors(err); len(fes) > 0 {
			msgs := make([]string, len(fes))
			for i, fe := range fes {
				msgs[i] = "  " + fe.Error()
			}
			return usagef("%s is not valid:\n%s", file, strings.Join(msgs, "\n"))
		}
		return &usageError{msg: err.Error()}
	}
	if prune && len(desired) == 0 {
		return usagef("%s defines no services: refusing to --prune every service", file)
	}
	c, err := a.client()
	if err != nil {
		return err
	}

	var results []applyResult
	report := func(r applyResult) {
		results = append(results, r)
		if a.output != "table" {
			return
		}
		line := "service/" + r.Service + " " + r.Action
		if len(r.Changes) > 0 {
			line += ": " + strings.Join(r.Changes, ", ")
		}
		if dryRun && r.Action != "unchanged" {
			line += " (dry run)"
		}
		fmt.Fprintln(a.stdout, line)
	}
	// Results so far are printed even when a later service fails.
	finish := func(err error) error {
		if a.output != "table" {
			if perr := a.printApplyResults(results, dryRun); perr != nil && err == nil {
				err = perr
			}
		}
		return err
	}

	for _, want := range desired {
		got, err := call(a, cmd, c.GetService, &ikelbv1.GetServiceRequest{Name: want.GetName()})
		switch {
		case status.Code(err) == codes.NotFound:
			if !dryRun {
				if _, err := call(a, cmd, c.CreateService, &ikelbv1.CreateServiceRequest{Service: want}); err != nil {
					return finish(fmt.Errorf("create service %s: %w", want.GetName(), err))
				}
			}
			report(applyResult{Service: want.GetName(), Action: "created"})
			continue
		case err != nil:
			return finish(fmt.Errorf("get service %s: %w", want.GetName(), err))
		}
		cur := got.GetService()
		changes := spec.Changes(cur, want)
		if changes == nil {
			report(applyResult{Service: want.GetName(), Action: "unchanged"})
			continue
		}
		if !dryRun {
			_, err := call(a, cmd, c.UpdateService, &ikelbv1.UpdateServiceRequest{Service: want, ExpectedVersion: cur.GetVersion()})
			if err != nil {
				return finish(fmt.Errorf("update service %s: %w", want.GetName(), err))
			}
		}
		report(applyResult{Service: want.GetName(), Action: "updated", Changes: changes})
	}

	if prune {
		keep := make(map[string]bool, len(desired))
		for _, s := range desired {
			keep[s.GetName()] = true
		}
		list, err := call(a, cmd, c.ListServices, &ikelbv1.ListServicesRequest{})
		if err != nil {
			return finish(fmt.Errorf("list services: %w", err))
		}
		for _, s := range list.GetServices() {
			if keep[s.GetName()] {
				continue
			}
			if !dryRun {
				if _, err := call(a, cmd, c.DeleteService, &ikelbv1.DeleteServiceRequest{Name: s.GetName()}); err != nil {
					return finish(fmt.Errorf("delete service %s: %w", s.GetName(), err))
				}
			}
			report(applyResult{Service: s.GetName(), Action: "deleted"})
		}
	}
	return finish(nil)
}

func (a *app) printApplyResults(results []applyResult, dryRun bool) error {
	if results == nil {
		results = []applyResult{}
	}
	v := struct {
		DryRun  bool          `json:"dry_run"`
		Results []applyResult `json:"results"`
	}{dryRun, results}
	var b []byte
	var err error
	if a.output == "yaml" {
		// Same keys as the JSON: go through it.
		j, _ := json.Marshal(v)
		var m any
		_ = json.Unmarshal(j, &m)
		b, err = marshalYAML(m)
	} else {
		b, err = json.MarshalIndent(v, "", "  ")
		b = append(b, '\n')
	}
	if err != nil {
		return err
	}
	_, err = a.stdout.Write(b)
	return err
}
