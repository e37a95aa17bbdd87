//go:build unix

package fanout

import (
	"errors"
	"syscall"
)

const nonBlockingWrites = true

// writeNow writes as much of p to raw's socket as it takes without
// blocking (Go's sockets are non-blocking): all of it, a part, or nothing
// when its send buffer is full. raw nil writes nothing.
func writeNow(raw syscall.RawConn, p []byte) (int, error) {
	if raw == nil {
		return 0, nil
	}
	var n int
	var werr error
	err := raw.Write(func(fd uintptr) bool {
		n, werr = syscall.Write(int(fd), p)
		return true // never wait for the socket to become writable
	})
	switch {
	case err != nil:
		return 0, err
	case errors.Is(werr, syscall.EAGAIN), errors.Is(werr, syscall.EINTR):
		return 0, nil
	case werr != nil:
		return 0, werr
	}
	return max(n, 0), nil
}
