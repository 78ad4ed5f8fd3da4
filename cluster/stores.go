package cluster

import "github.com/ikelb/ikelb/persist"

// openStores opens the raft stores under cfg.DataDir with package persist.
func openStores(cfg Config) (Stores, error) {
	s, err := persist.Open(cfg.DataDir, persist.Options{Logger: cfg.Logger})
	if err != nil {
		return Stores{}, err
	}
	return Stores{Log: s.Log, Stable: s.Stable, Snapshots: s.Snapshots, Close: s.Close}, nil
}
