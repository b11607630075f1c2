//go:build !(linux || darwin || freebsd || netbsd || openbsd)

package proxy

import "net"

// withRawIO leaves c as it is where raw system calls are not available.
func withRawIO(c net.Conn) net.Conn { return c }
