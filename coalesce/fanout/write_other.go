//go:build !unix

package fanout

import "syscall"

const nonBlockingWrites = false

// writeNow writes nothing: without non-blocking writes every event of a
// detached subscriber goes through a drain.
func writeNow(syscall.RawConn, []byte) (int, error) { return 0, nil }
