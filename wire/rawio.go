//go:build linux || darwin || freebsd || netbsd || openbsd

package wire

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// rawIOConn is a plain TCP or unix connection whose Read and Write make the
// read and write system calls raw (see rawRead), inside the net package's own
// loops for them (syscall.RawConn.Read and Write: try the call, and on EAGAIN
// wait in the netpoller, honouring the connection's deadlines). Everything
// else — deadlines, addresses, Close — is the connection's own. TLS layered
// on it (a client's, or pgconn's upstream) gets the same system calls.
//
// Read and Write may run at the same time, from one goroutine each; two
// concurrent Reads (or Writes) are not allowed, as they are not for a relay.
type rawIOConn struct {
	net.Conn
	rc syscall.RawConn

	// One read's and one write's arguments and results, and the callbacks
	// that make them, kept here so that the hot path allocates nothing.
	rp      []byte
	rn      int
	rerr    error
	readFn  func(fd uintptr) bool
	wp      []byte
	wn      int
	werr    error
	writeFn func(fd uintptr) bool
}

// WithRawIO returns c with raw reads and writes when it is a plain TCP or
// unix connection, and c itself otherwise.
func WithRawIO(c net.Conn) net.Conn {
	var rc syscall.RawConn
	switch c := c.(type) {
	case *net.TCPConn:
		rc, _ = c.SyscallConn()
	case *net.UnixConn:
		rc, _ = c.SyscallConn()
	}
	if rc == nil {
		return c
	}
	r := &rawIOConn{Conn: c, rc: rc}
	r.readFn, r.writeFn = r.readFD, r.writeFD
	return r
}

// SyscallConn gives the socket, for PeekClosed.
func (c *rawIOConn) SyscallConn() (syscall.RawConn, error) { return c.rc, nil }

func (c *rawIOConn) Read(p []byte) (int, error) {
	c.rp = p
	err := c.rc.Read(c.readFn)
	n, rerr := c.rn, c.rerr
	c.rp, c.rerr = nil, nil
	switch {
	case err != nil:
		return 0, err
	case rerr != nil:
		return 0, os.NewSyscallError("read", rerr)
	case n == 0 && len(p) > 0:
		return 0, io.EOF
	}
	return n, nil
}

// readFD reads once into c.rp; false means "nothing yet, wait".
func (c *rawIOConn) readFD(fd uintptr) bool {
	for {
		c.rn, c.rerr = rawRead(int(fd), c.rp)
		switch c.rerr {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		return true
	}
}

func (c *rawIOConn) Write(p []byte) (int, error) {
	c.wp, c.wn, c.werr = p, 0, nil
	err := c.rc.Write(c.writeFn)
	n := c.wn
	if c.werr != nil {
		err = c.werr
	}
	c.wp, c.werr = nil, nil
	return n, err
}

// writeFD writes what is left of c.wp; false means "the socket is full, wait".
func (c *rawIOConn) writeFD(fd uintptr) bool {
	for c.wn < len(c.wp) {
		n, err := rawWrite(int(fd), c.wp[c.wn:])
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return false
		case err != nil:
			c.werr = os.NewSyscallError("write", err)
			return true
		}
		c.wn += n
	}
	return true
}

// rawRead and rawWrite are read(2) and write(2) on a non-blocking socket,
// made without telling the scheduler a system call is under way
// (syscall.RawSyscall): such a call cannot block. The scheduler's own
// bookkeeping for a system call costs little, but the first one after the
// process sat idle also wakes its monitor thread (sysmon), and a relay in a
// request/response exchange sits idle between every two messages: that wake
// and the monitor's sleep after it were two context switches per round trip.
func rawRead(fd int, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, _, errno := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

func rawWrite(fd int, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, _, errno := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}
