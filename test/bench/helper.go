package bench

import (
	"os"

	"github.com/ikelb/ikelb/test/bench/loadgen"
)

// HelperEnv, set to "1", makes a binary that calls HelperMain act as the
// loadgen command line (send, ready, sink) instead of running its tests.
const HelperEnv = "IKELB_BENCH_HELPER"

// HelperMain runs loadgen.Main on the process's arguments if HelperEnv is
// set, and returns its exit code and true; otherwise it returns false. Call
// it first in TestMain: `if code, ok := bench.HelperMain(); ok { os.Exit(code) }`.
func HelperMain() (code int, ok bool) {
	if os.Getenv(HelperEnv) != "1" {
		return 0, false
	}
	return loadgen.Main(os.Args[1:], os.Stdout, os.Stderr), true
}
