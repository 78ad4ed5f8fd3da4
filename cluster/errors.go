package cluster

import (
	"context"
	"errors"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Errors returned by the FSM, the Node and the admin server. Callers test
// them with errors.Is; the admin server maps them to gRPC codes in one place,
// grpcError.
var (
	// ErrNotFound: the service, backend or affinity does not exist.
	ErrNotFound = errors.New("not found")
	// ErrExists: a service with that name, or a backend with that address,
	// already exists.
	ErrExists = errors.New("already exists")
	// ErrAddrInUse: another service already listens on the VIP and port.
	ErrAddrInUse = errors.New("address in use")
	// ErrConflict: a compare-and-set write found another version.
	ErrConflict = errors.New("version conflict")
	// ErrNotLeader: the write must go to the Raft leader.
	ErrNotLeader = errors.New("not the raft leader")
	// ErrTimeout: the write was not committed in time; it may still be.
	ErrTimeout = errors.New("timed out")
	// ErrInvalid: a request or log entry is malformed.
	ErrInvalid = errors.New("invalid argument")
	// ErrUnsupported: the dataplane cannot do what was asked.
	ErrUnsupported = errors.New("not supported")
	// ErrShutdown: the node is shutting down or not started.
	ErrShutdown = errors.New("node is shut down")
)

// unappliedError marks a write that certainly did not reach the Raft log:
// the node was not the leader when asked, no leader was known, or the
// leader was handing leadership over. Sending it again cannot apply it
// twice, so the admin API holds it for a leader (forwarder.applyEntry),
// as Consul and Nomad hold RPCs while there is none. A write that may
// have reached the log (leadership lost after appending it, a transport
// error mid-call) is not marked.
type unappliedError struct{ err error }

func (e unappliedError) Error() string { return e.err.Error() }
func (e unappliedError) Unwrap() error { return e.err }

func isUnapplied(err error) bool {
	var u unappliedError
	return errors.As(err, &u)
}

// unappliedRetryDelay is the RetryInfo delay an unapplied write's status
// suggests: about an election's length.
const unappliedRetryDelay = 500 * time.Millisecond

// grpcError maps an error from this package to a gRPC status error. Errors
// that already carry a status (from validation) pass through. An unapplied
// write's status carries RetryInfo: the client may send it again, and
// another node's forwarder does.
func grpcError(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var c codes.Code
	switch {
	case errors.Is(err, ErrNotFound):
		c = codes.NotFound
	case errors.Is(err, ErrExists), errors.Is(err, ErrAddrInUse):
		c = codes.AlreadyExists
	case errors.Is(err, ErrConflict):
		c = codes.Aborted
	case errors.Is(err, ErrNotLeader), errors.Is(err, ErrShutdown):
		c = codes.Unavailable
	case errors.Is(err, ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		c = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		c = codes.Canceled
	case errors.Is(err, ErrInvalid):
		c = codes.InvalidArgument
	case errors.Is(err, ErrUnsupported):
		c = codes.FailedPrecondition
	default:
		c = codes.Internal
	}
	st := status.New(c, err.Error())
	if isUnapplied(err) {
		if d, derr := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(unappliedRetryDelay)}); derr == nil {
			st = d
		}
	}
	return st.Err()
}

// remoteError is an error another node returned over gRPC, mapped back to
// this package's sentinel so that callers (the compare-and-set retry, the
// admin API's code mapping) treat it like a local one.
type remoteError struct {
	sentinel error
	msg      string
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.sentinel }

// errorFromStatus is grpcError's inverse, for errors from another node's
// ClusterService. A transport failure (the leader is gone) is UNAVAILABLE
// and becomes ErrNotLeader.
func errorFromStatus(err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	var s error
	switch st.Code() {
	case codes.NotFound:
		s = ErrNotFound
	case codes.AlreadyExists:
		s = ErrExists
	case codes.Aborted:
		s = ErrConflict
	case codes.Unavailable:
		s = ErrNotLeader
	case codes.DeadlineExceeded:
		s = ErrTimeout
	case codes.Canceled:
		s = context.Canceled
	case codes.InvalidArgument:
		s = ErrInvalid
	case codes.FailedPrecondition:
		s = ErrUnsupported
	default:
		return err
	}
	re := &remoteError{sentinel: s, msg: st.Message()}
	for _, d := range st.Details() {
		if _, ok := d.(*errdetails.RetryInfo); ok {
			return unappliedError{re}
		}
	}
	return re
}
