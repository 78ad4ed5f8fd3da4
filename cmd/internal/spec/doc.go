// Package spec is the declarative YAML format for ikelb services, shared by
// `ikelbctl apply -f FILE` and by the `services:` list of ikelbd's
// configuration file.
//
// A file looks like this; every field but name and vip has a default:
//
//	services:
//	  - name: vpn
//	    vip: 198.18.2.100
//	    ports: [500, 4500]          # default
//	    persistence_timeout: 8h     # Go duration, default 5m
//	    forwarding_mode: nat        # nat (default) | transparent
//	    affinity_key: source-ip     # default and only choice
//	    snat_address: 198.18.2.100  # optional, nat mode only
//	    health_check: {type: ikev2, interval: 5s, timeout: 2s, rise: 2, fall: 3, port: 500}
//	    backends:
//	      - {address: 10.0.0.11, weight: 100, state: active}  # active|drain|disabled
//
// Guarantees:
//   - Decoding is strict: an unknown field, a duplicate field, a value of the
//     wrong kind or a value that does not parse is an error, never ignored.
//   - Every error names the offending field by its full path and, when the
//     service was decoded from YAML, its line, e.g.
//     `services[0].backends[1].state: "actve" is not one of active, drain, disabled (line 12)`.
//     All problems are reported at once (errors.Join of *FieldError), and
//     every one matches ErrInvalid.
//   - ToProto fills in every default explicitly and canonicalises addresses,
//     so what is sent to the admin API is exactly what the file means, and
//     FromProto/ToYAML produce a file that Parse reads back to the same
//     services (output-only fields such as version and health are dropped).
//
// Service implements yaml.Unmarshaler so that ikelbd's config struct can hold
// a `Services []spec.Service` field decoded by its own yaml.Decoder.
// UnmarshalYAML never fails on a service's content: it records the problems
// and the line of every field, and ToProto (or Validate) reports them with
// the `services[i]` path, which only the caller of ToProto knows.
package spec
