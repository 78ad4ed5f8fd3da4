// Command ikelbctl drives ikelbd's admin API (gRPC, plaintext; the admin
// listener is on loopback by default).
//
//	ikelbctl [--addr HOST:PORT] [-o table|json|yaml] [--timeout D] COMMAND
//
// Commands: service list|get|create|update|delete, backend
// list|add|remove|set|drain, affinity lookup|list|delete|flush, health,
// counters, status, cluster status, apply -f FILE, check ready. `ikelbctl
// help COMMAND` describes each.
//
// The address comes from --addr, else $IKELB_ADDR, else 127.0.0.1:7450.
// --timeout bounds each request (default 10s; `check ready` defaults to 1s).
// -o json prints the API's messages with protojson (proto field names,
// unpopulated fields included, stable indentation); -o yaml prints services
// in the declarative format `apply -f` reads (package spec) and everything
// else as the YAML form of that JSON.
//
// Exit status:
//
//	0  success (`check ready`: the node is ready)
//	1  the request failed: gRPC errors are printed as
//	   `error: <code>: <message>` on stderr (`check ready`: not ready,
//	   printed as `not ready: <reason>`)
//	2  usage: bad flags or arguments, an invalid spec file, or the server
//	   answered INVALID_ARGUMENT
//
// Only main exits; every command returns its error to run, which prints it
// and chooses the status.
package main
