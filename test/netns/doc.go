// Package netns builds throw-away network topologies out of Linux network
// namespaces for end-to-end tests, and runs processes inside them.
//
// A Lab is created per test with New. Everything it makes carries the Lab's
// short unique tag in its namespace name, so parallel tests and parallel test
// binaries never collide, and the test's Cleanup removes it all: every process
// the Lab started (its whole process group, then anything else still inside
// one of the Lab's namespaces) is killed with SIGKILL, and every namespace is
// deleted, also when the test failed or called t.Fatal midway.
//
// Guarantees:
//   - The root network namespace is never changed: veth pairs are created
//     from inside one of the Lab's namespaces straight into another, so no
//     device ever exists in the root namespace, not even for a moment; a
//     Switch is a Linux bridge inside a namespace of its own.
//   - The calling process never switches namespaces. Commands run through
//     `ip netns exec`, which also gives each of them a private mount
//     namespace; a daemon that writes fixed files under /run gets its own
//     /run by a bind mount made inside that private mount namespace.
//   - Each long-running process (Start) runs in its own process group, with
//     stdout and stderr in a log file under t.TempDir(); the tail of every log
//     is written to the test log when the test failed.
//
// Helpers that build the topology (AddNS, Link, Switch, routes, sysctls, nft)
// call t.Fatal on error and must be called from the test goroutine. Run and
// Start-ed process handles return errors instead.
//
// Require skips a test that cannot run here (not root, `ip` missing); with
// CI=true in the environment it fails the test instead, so CI never passes by
// skipping.
package netns
