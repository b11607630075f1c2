package proxy

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// Message framing after startup: a 1-byte type, a 4-byte big-endian length
// that counts itself, then the body. See
// https://www.postgresql.org/docs/current/protocol-overview.html#PROTOCOL-MESSAGE-CONCEPTS.
const headerLen = 5

// errFraming is a length field under 4: the peer is not speaking the protocol.
var errFraming = errors.New("invalid message length")

// frameCopier relays messages from src to dst one at a time, without decoding
// them and without allocating: the header and body are peeked from src's
// buffer and written to dst's.
//
// It never loses its place in a message. A read error part-way through a
// message — typically the read deadline a relay uses to interrupt a blocked
// reader — is returned with the copier's state intact, and the next call to
// next carries on with the rest of that message. bufio.Reader keeps what it
// had buffered across such an error, so nothing is lost or repeated. A write
// error is final: dst's error sticks and the stream is broken.
type frameCopier struct {
	src *bufio.Reader
	dst *bufio.Writer

	// Of the message being copied, while inMsg.
	inMsg     bool
	typ       byte
	first     byte
	firstSet  bool
	remaining int // body bytes not yet copied
	size      int // the whole message, header included

	// skip, set at a boundary, drops the next message instead of copying
	// it (a reply to a message pgwarden sent of its own); it clears when
	// that message ends.
	skip bool

	// writeErr is the error writing to dst, once there is one: the stream
	// is broken for good.
	writeErr error
}

// body starts copying the remaining n body bytes of a message whose header
// (and first body bytes) the caller has already dealt with.
func (f *frameCopier) body(typ byte, n int) {
	f.inMsg, f.typ, f.remaining, f.size, f.firstSet = true, typ, n, n, true
}

// next copies the rest of the current message, or the whole next one, to dst
// (not flushed). It returns the message's type, the first byte of its body
// (ReadyForQuery's status) and its size.
func (f *frameCopier) next() (typ, first byte, size int, err error) {
	if !f.inMsg {
		hdr, err := f.src.Peek(headerLen)
		if err != nil {
			return 0, 0, 0, err
		}
		n := int(binary.BigEndian.Uint32(hdr[1:])) - 4
		if n < 0 {
			return hdr[0], 0, 0, fmt.Errorf("%w: %d for message type %q", errFraming, n+4, hdr[0])
		}
		f.inMsg, f.typ, f.remaining, f.size, f.firstSet, f.first = true, hdr[0], n, n+headerLen, false, 0
		if !f.skip {
			if _, err := f.dst.Write(hdr); err != nil {
				f.writeErr = err
				return f.typ, 0, 0, err
			}
		}
		_, _ = f.src.Discard(headerLen)
	}
	for f.remaining > 0 {
		if f.src.Buffered() == 0 {
			// Wait for whatever arrives next and forward that, rather than
			// waiting for a whole buffer.
			if _, err := f.src.Peek(1); err != nil {
				return f.typ, 0, 0, err
			}
		}
		chunk := min(f.remaining, f.src.Buffered())
		body, _ := f.src.Peek(chunk)
		if !f.firstSet {
			f.first, f.firstSet = body[0], true
		}
		if !f.skip {
			if _, err := f.dst.Write(body); err != nil {
				f.writeErr = err
				return f.typ, 0, 0, err
			}
		}
		_, _ = f.src.Discard(chunk)
		f.remaining -= chunk
	}
	f.inMsg, f.skip = false, false
	return f.typ, f.first, f.size, nil
}

// atBoundary reports whether no message is half-copied: what dst has
// received so far is a whole number of messages.
func (f *frameCopier) atBoundary() bool { return !f.inMsg }

// readMessage reads one whole message into buf (grown as needed) and returns
// its type and body, which alias buf. Bodies over maxBody are refused before
// anything is allocated for them. It is for the handshake, not the relay.
func readMessage(r *bufio.Reader, buf []byte, maxBody int) (typ byte, body, newBuf []byte, err error) {
	hdr, err := r.Peek(headerLen)
	if err != nil {
		return 0, nil, buf, err
	}
	typ = hdr[0]
	n := int(binary.BigEndian.Uint32(hdr[1:])) - 4
	if n < 0 || n > maxBody {
		return typ, nil, buf, fmt.Errorf("%w: %d for message type %q (limit %d)", errFraming, n+4, typ, maxBody+4)
	}
	_, _ = r.Discard(headerLen)
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		return typ, nil, buf, err
	}
	return typ, buf, buf, nil
}

// deadlineWriter bounds every write to conn: a peer that takes no bytes for
// timeout makes the write fail — and the session end, freeing what it holds —
// instead of blocking it forever. The deadline is moved forward only once a
// quarter of it has passed, so a busy connection calls SetWriteDeadline
// rarely; a write therefore fails after between three quarters of timeout and
// timeout without progress. It is used by one goroutine at a time.
type deadlineWriter struct {
	conn    net.Conn
	timeout time.Duration
	limit   time.Time // when set, no deadline goes past it (a pool operation's context)
	until   time.Time // the write deadline in force
}

func newDeadlineWriter(conn net.Conn, timeout time.Duration) *deadlineWriter {
	return &deadlineWriter{conn: conn, timeout: timeout}
}

func (w *deadlineWriter) Write(p []byte) (int, error) {
	now := time.Now()
	if w.until.Sub(now) < w.timeout-w.timeout/4 {
		d := now.Add(w.timeout)
		if !w.limit.IsZero() && w.limit.Before(d) {
			d = w.limit
		}
		if !d.Equal(w.until) {
			if err := w.conn.SetWriteDeadline(d); err != nil {
				return 0, err
			}
			w.until = d
		}
	}
	return w.conn.Write(p)
}

// setLimit caps the write deadline at t (zero removes the cap) from the next
// write on.
func (w *deadlineWriter) setLimit(t time.Time) {
	w.limit = t
	w.until = time.Time{}
}

// isTimeout reports whether err is a deadline expiring.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
