package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/ikelb/ikelb/cmd/internal/spec"
	ikelbv1 "github.com/ikelb/ikelb/proto/ikelb/v1"
)

func newBackendCmd(a *app) *cobra.Command {
	var addWeight uint32
	var addState string
	add := &cobra.Command{
		Use:   "add SERVICE ADDR [--weight N] [--state active|drain|disabled]",
		Short: "Add a backend to a service",
		Args:  exactArgs("SERVICE", "ADDR"),
		RunE: func(cmd *cobra.Command, args []string) error {
			b := &ikelbv1.Backend{Address: args[1], Weight: addWeight, State: ikelbv1.BackendState_BACKEND_STATE_ACTIVE}
			if addWeight == 0 || addWeight > spec.MaxWeight {
				return usagef("--weight: %d is out of range 1..%d", addWeight, spec.MaxWeight)
			}
			st, err := spec.ParseState(addState)
			if err != nil {
				return usagef("--state: %q is not one of active, drain, disabled", addState)
			}
			b.State = st
			return a.backendChange(cmd, fmt.Sprintf("backend %s added to %s", args[1], args[0]),
				func(c ikelbv1.AdminServiceClient) (*ikelbv1.Service, error) {
					resp, err := call(a, cmd, c.AddBackend, &ikelbv1.AddBackendRequest{Service: args[0], Backend: b})
					return resp.GetService(), err
				})
		},
	}
	add.Flags().Uint32Var(&addWeight, "weight", spec.DefaultWeight, "weight, 1..1000")
	add.Flags().StringVar(&addState, "state", spec.DefaultState, "state: active, drain or disabled")

	var setWeight uint32
	var setState string
	set := &cobra.Command{
		Use:   "set SERVICE ADDR [--state active|drain|disabled] [--weight N]",
		Short: "Change a backend's state and/or weight",
		Long: `Change a backend's state and/or weight.
  active    takes new and existing clients
  drain     keeps its existing clients, takes no new ones
  disabled  takes nothing; its clients are re-chosen on their next packet`,
		Args: exactArgs("SERVICE", "ADDR"),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &ikelbv1.SetBackendRequest{Service: args[0], Address: args[1]}
			var what []string
			if cmd.Flags().Changed("state") {
				st, err := spec.ParseState(setState)
				if err != nil {
					return usagef("--state: %q is not one of active, drain, disabled", setState)
				}
				req.State = st
				what = append(what, "state "+setState)
			}
			if cmd.Flags().Changed("weight") {
				if setWeight == 0 || setWeight > spec.MaxWeight {
					return usagef("--weight: %d is out of range 1..%d", setWeight, spec.MaxWeight)
				}
				req.Weight = setWeight
				what = append(what, fmt.Sprintf("weight %d", setWeight))
			}
			if len(what) == 0 {
				return usagef("backend set: give --state and/or --weight")
			}
			return a.setBackend(cmd, req, fmt.Sprintf("backend %s of %s: %s", args[1], args[0], strings.Join(what, ", ")))
		},
	}
	set.Flags().Uint32Var(&setWeight, "weight", 0, "new weight, 1..1000")
	set.Flags().StringVar(&setState, "state", "", "new state: active, drain or disabled")

	return group("backend", "List, add, remove, drain and change backends",
		&cobra.Command{
			Use:   "list SERVICE",
			Short: "List a service's backends",
			Args:  exactArgs("SERVICE"),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := a.client()
				if err != nil {
					return err
				}
				resp, err := call(a, cmd, c.GetService, &ikelbv1.GetServiceRequest{Name: args[0]})
				if err != nil {
					return err
				}
				if a.output != "table" {
					return a.printServices(resp.GetService(), resp.GetService())
				}
				return a.backendTable(resp.GetService())
			},
		},
		add,
		&cobra.Command{
			Use:   "remove SERVICE ADDR",
			Short: "Remove a backend from a service; its clients are re-chosen",
			Args:  exactArgs("SERVICE", "ADDR"),
			RunE: func(cmd *cobra.Command, args []string) error {
				return a.backendChange(cmd, fmt.Sprintf("backend %s removed from %s", args[1], args[0]),
					func(c ikelbv1.AdminServiceClient) (*ikelbv1.Service, error) {
						resp, err := call(a, cmd, c.RemoveBackend, &ikelbv1.RemoveBackendRequest{Service: args[0], Address: args[1]})
						return resp.GetService(), err
					})
			},
		},
		set,
		&cobra.Command{
			Use:   "drain SERVICE ADDR",
			Short: "Drain a backend: it keeps its clients and takes no new ones (set --state drain)",
			Args:  exactArgs("SERVICE", "ADDR"),
			RunE: func(cmd *cobra.Command, args []string) error {
				return a.setBackend(cmd, &ikelbv1.SetBackendRequest{
					Service: args[0], Address: args[1], State: ikelbv1.BackendState_BACKEND_STATE_DRAIN,
				}, fmt.Sprintf("backend %s of %s: draining (keeps its clients, takes no new ones)", args[1], args[0]))
			},
		},
	)
}

func (a *app) setBackend(cmd *cobra.Command, req *ikelbv1.SetBackendRequest, done string) error {
	return a.backendChange(cmd, done, func(c ikelbv1.AdminServiceClient) (*ikelbv1.Service, error) {
		resp, err := call(a, cmd, c.SetBackend, req)
		return resp.GetService(), err
	})
}

// backendChange runs one backend write and prints done, or the resulting
// service for -o json|yaml.
func (a *app) backendChange(cmd *cobra.Command, done string, rpc func(ikelbv1.AdminServiceClient) (*ikelbv1.Service, error)) error {
	c, err := a.client()
	if err != nil {
		return err
	}
	s, err := rpc(c)
	if err != nil {
		return err
	}
	if a.output != "table" {
		return a.printServices(s, s)
	}
	fmt.Fprintln(a.stdout, done)
	return nil
}
