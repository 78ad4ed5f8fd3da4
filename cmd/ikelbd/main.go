// Command ikelbd is the ikelb daemon: one node of a clustered load balancer
// for IKEv2/IPsec VPN traffic. It forwards UDP for its services, keeps the
// client → backend affinity table in Raft, and serves the gRPC admin API.
//
//	ikelbd                   run on the embedded default (one node, admin on 127.0.0.1:7450)
//	ikelbd --config FILE     run on FILE (YAML; see `ikelbd default-config`)
//	ikelbd demo              a self-contained demonstration on loopback, no root needed
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "ikelbd:", err)
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	var configPath string
	root := &cobra.Command{
		Use:           "ikelbd",
		Short:         "ikelb daemon: clustered IKEv2/IPsec load balancer node",
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := LoadConfig(configPath)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return run(ctx, cfg, newLogger(os.Stderr, cfg.LogLevel))
		},
	}
	root.Flags().StringVarP(&configPath, "config", "c", "", "YAML configuration file (default: the embedded single-node default)")
	root.AddCommand(&cobra.Command{
		Use:   "default-config",
		Short: "Print the embedded default configuration",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			cmd.OutOrStdout().Write(defaultConfigYAML)
		},
	})
	root.AddCommand(newDemoCmd())
	return root
}

// run starts a node and blocks until ctx ends, then shuts it down.
func run(ctx context.Context, cfg *Config, logger *slog.Logger) error {
	d, err := startDaemon(ctx, cfg, logger)
	if err != nil {
		return err
	}
	<-ctx.Done()
	logger.Info("shutting down")
	if err := d.Close(); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
