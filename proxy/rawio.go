package proxy

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// rawReader reads a connection. On a plain TCP or unix socket it makes the
// read system call itself, raw (see rawRead), in the net package's own read
// loop (syscall.RawConn.Read: read until EAGAIN, then wait in the netpoller,
// honouring the read deadline); a TLS connection is read as usual.
type rawReader struct {
	conn net.Conn
	rc   syscall.RawConn // nil: read conn as usual

	// One read's arguments and results, and the callback that makes it,
	// kept here so that a read allocates nothing.
	p    []byte
	n    int
	rerr error
	read func(fd uintptr) bool
}

func newRawReader(conn net.Conn) *rawReader {
	r := &rawReader{conn: conn, rc: rawConnOf(conn)}
	r.read = r.readFD
	return r
}

func (r *rawReader) Read(p []byte) (int, error) {
	if r.rc == nil {
		return r.conn.Read(p)
	}
	r.p = p
	err := r.rc.Read(r.read)
	n, rerr := r.n, r.rerr
	r.p, r.rerr = nil, nil
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

// readFD reads once into r.p; false means "nothing yet, wait".
func (r *rawReader) readFD(fd uintptr) bool {
	for {
		r.n, r.rerr = rawRead(int(fd), r.p)
		switch r.rerr {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		return true
	}
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

// rawConnOf returns the socket under a plain TCP or unix connection, or nil
// (a TLS connection, a pipe).
func rawConnOf(c net.Conn) syscall.RawConn {
	var rc syscall.RawConn
	switch c := c.(type) {
	case *net.TCPConn:
		rc, _ = c.SyscallConn()
	case *net.UnixConn:
		rc, _ = c.SyscallConn()
	}
	return rc
}
