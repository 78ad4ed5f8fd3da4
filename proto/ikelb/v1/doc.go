// Package ikelbv1 is the generated Go code of ikelb's gRPC API, version 1
// (admin.proto: AdminService, for operators; cluster.proto: ClusterService,
// node to node). Only this doc file is hand-written; regenerate the rest with
// `go generate ./proto`. Requests are validated by the server, which answers
// INVALID_ARGUMENT naming the field.
package ikelbv1
