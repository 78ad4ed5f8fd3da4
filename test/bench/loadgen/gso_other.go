//go:build !linux

package loadgen

import (
	"errors"
	"net"
)

const maxGSOSegments = 64

func setGSO(*net.UDPConn, int) error { return errors.New("UDP GSO needs linux") }
