//go:build linux || darwin || freebsd || netbsd || openbsd

package wire

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"syscall"
)

// PeekClosed looks at an idle connection's socket without reading from it or
// blocking (recv with MSG_PEEK|MSG_DONTWAIT): a peer that closed (io.EOF) or
// sent something (ErrUnexpectedData) is reported as an error; one with
// nothing to say, as nil. A TLS connection is looked at beneath its TLS.
// It cannot see a silent network cut; a ping after an idle period does.
func PeekClosed(c net.Conn) error {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var (
		n    int
		rerr error
		b    [1]byte
	)
	if err := rc.Read(func(fd uintptr) bool {
		n, _, rerr = syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		return true
	}); err != nil {
		return err
	}
	switch {
	case errors.Is(rerr, syscall.EAGAIN), errors.Is(rerr, syscall.EWOULDBLOCK):
		return nil
	case rerr != nil:
		return rerr
	case n == 0:
		return io.EOF
	}
	return ErrUnexpectedData
}
