package dataplane

import "errors"

// Sentinel errors returned by this package. Callers match them with errors.Is;
// the returned errors wrap them with detail (the address, the service).
var (
	// ErrShortIKE: the datagram is shorter than the 28-byte IKE header.
	ErrShortIKE = errors.New("datagram shorter than ike header")
	// ErrIKEVersion: the header's major version is neither 1 (ISAKMP) nor 2.
	ErrIKEVersion = errors.New("unsupported ike major version")
	// ErrIKELength: the header's length field disagrees with the datagram.
	ErrIKELength = errors.New("ike length field does not match datagram")
	// ErrNotIKE: a NAT-T datagram that is not IKE (a keepalive or ESP).
	ErrNotIKE = errors.New("datagram does not carry ike")

	// ErrInvalidConfig: Config.Validate rejected the engine configuration.
	ErrInvalidConfig = errors.New("invalid engine config")
	// ErrInvalidService: SetServices rejected a service definition.
	ErrInvalidService = errors.New("invalid service")
	// ErrListen: a listener could not be opened (the address is in the message).
	ErrListen = errors.New("listen failed")
	// ErrTransparent: a transparent-mode socket could not be opened (the
	// message says why: missing CAP_NET_RAW or CAP_NET_ADMIN, or a
	// platform other than Linux).
	ErrTransparent = errors.New("transparent mode unavailable")
	// ErrClosed: the engine was closed.
	ErrClosed = errors.New("engine closed")
)
