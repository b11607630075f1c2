//go:build !(linux || darwin || freebsd || netbsd || openbsd)

package wire

import "net"

// WithRawIO leaves c as it is where raw system calls are not available.
func WithRawIO(c net.Conn) net.Conn { return c }
