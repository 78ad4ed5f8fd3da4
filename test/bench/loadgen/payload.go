package loadgen

import (
	"encoding/binary"
	"errors"
)

// Sentinel errors.
var (
	// ErrConfig reports an invalid SendConfig or SinkConfig.
	ErrConfig = errors.New("loadgen: invalid config")
	// ErrNotReady reports that no probe came back before WaitReady's
	// deadline.
	ErrNotReady = errors.New("loadgen: destination not ready")
)

// Payload kinds, byte 4 of every datagram.
const (
	KindLoad  byte = 0
	KindProbe byte = 'P'
)

const (
	// HeaderLen is the smallest datagram Send writes and Sink accepts.
	HeaderLen = 40
	// MaxSize is the largest datagram size Send accepts.
	MaxSize = 9000

	spiBase = 0x00100000 // SPIs are spiBase+client index: never zero
)

// putHeader writes the benchmark header into b (len(b) >= HeaderLen).
func putHeader(b []byte, spi uint32, kind byte, seq uint64, ts int64) {
	binary.BigEndian.PutUint32(b[0:4], spi)
	b[4] = kind
	b[5], b[6], b[7] = 0, 0, 0
	binary.BigEndian.PutUint64(b[8:16], seq)
	binary.BigEndian.PutUint64(b[16:24], uint64(ts))
	clear(b[24:40])
}

// stampProbe writes the sink's kernel receive time and its echo's send
// time into a probe.
func stampProbe(b []byte, rx, tx int64) {
	binary.BigEndian.PutUint64(b[24:32], uint64(rx))
	binary.BigEndian.PutUint64(b[32:40], uint64(tx))
}

// probeStamps returns the sink's kernel receive time of a probe and its
// echo's send time (0, 0: the sink's timestamps were off).
func probeStamps(b []byte) (rx, tx int64) {
	return int64(binary.BigEndian.Uint64(b[24:32])), int64(binary.BigEndian.Uint64(b[32:40]))
}

// parseHeader returns the kind and probe timestamp of a datagram, and false
// if it is too short or its SPI is zero (not ESP-in-UDP).
func parseHeader(b []byte) (kind byte, ts int64, ok bool) {
	if len(b) < HeaderLen || binary.BigEndian.Uint32(b[0:4]) == 0 {
		return 0, 0, false
	}
	return b[4], int64(binary.BigEndian.Uint64(b[16:24])), true
}
