package membership

import "errors"

// Errors returned by this package. Callers test them with errors.Is; the
// message that wraps them names the field or the address involved.
var (
	// ErrInvalidConfig: a Config (or a Meta given to SetMeta) is invalid.
	// The wrapping message names the field, e.g. "encrypt_key: must be 16,
	// 24 or 32 bytes, got 7".
	ErrInvalidConfig = errors.New("invalid membership config")
	// ErrMetaTooLarge: the encoded Meta exceeds memberlist's MetaMaxSize
	// (512 bytes). It is returned together with ErrInvalidConfig.
	ErrMetaTooLarge = errors.New("meta too large")
	// ErrBadMeta: a member's gossiped metadata could not be decoded (an
	// unknown format version, or corrupt).
	ErrBadMeta = errors.New("malformed member meta")
	// ErrJoin: Join could reach none of the configured addresses before its
	// context ended. The wrapping message carries memberlist's last error.
	ErrJoin = errors.New("could not join the cluster")
	// ErrShutdown: the Members was shut down (or has left, for SetMeta).
	ErrShutdown = errors.New("membership is shut down")
)
