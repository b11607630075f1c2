package wire

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// HeaderLen is the size of a message header after startup: a 1-byte type
// and a 4-byte big-endian length that counts itself; the body follows. See
// https://www.postgresql.org/docs/current/protocol-overview.html#PROTOCOL-MESSAGE-CONCEPTS.
const HeaderLen = 5

// ErrFraming is a length field under 4 (or, for ReadMessage, over its
// limit): the peer is not speaking the protocol. FrameCopier.Next and
// ReadMessage return it wrapped.
var ErrFraming = errors.New("invalid message length")

// FrameCopier relays messages from Src to Dst one at a time, without decoding
// them and without allocating: the header and body are peeked from Src's
// buffer and written to Dst's.
//
// It never loses its place in a message. A read error part-way through a
// message — typically the read deadline a relay uses to interrupt a blocked
// reader — is returned with the copier's state intact, and the next call to
// Next carries on with the rest of that message. bufio.Reader keeps what it
// had buffered across such an error, so nothing is lost or repeated. A write
// error is final: Dst's error sticks (WriteErr) and the stream is broken.
//
// A FrameCopier is used by one goroutine at a time; its zero value with Src
// and Dst set is ready to use.
type FrameCopier struct {
	Src *bufio.Reader
	Dst *bufio.Writer

	// Of the message being copied, while inMsg.
	inMsg     bool
	typ       byte
	first     byte
	firstSet  bool
	remaining int // body bytes not yet copied
	size      int // the whole message, header included

	// Skip, set at a boundary, drops the next message instead of copying
	// it (a reply to a message pgwarden sent of its own); it clears when
	// that message ends.
	Skip bool

	// WriteErr is the error writing to Dst, once there is one: the stream
	// is broken for good.
	WriteErr error
}

// Body starts copying the remaining n body bytes of a message whose header
// (and first body bytes) the caller has already dealt with; Next copies
// them.
func (f *FrameCopier) Body(typ byte, n int) {
	f.inMsg, f.typ, f.remaining, f.size, f.firstSet = true, typ, n, n, true
}

// Next copies the rest of the current message, or the whole next one, to Dst
// (not flushed). It returns the message's type, the first byte of its body
// (ReadyForQuery's status) and its size. A read error leaves the copier
// where it was (call Next again to carry on); a length under 4 is
// ErrFraming; a write error is also kept in WriteErr.
func (f *FrameCopier) Next() (typ, first byte, size int, err error) {
	if !f.inMsg {
		hdr, err := f.Src.Peek(HeaderLen)
		if err != nil {
			return 0, 0, 0, err
		}
		n := int(binary.BigEndian.Uint32(hdr[1:])) - 4
		if n < 0 {
			return hdr[0], 0, 0, fmt.Errorf("%w: %d for message type %q", ErrFraming, n+4, hdr[0])
		}
		f.inMsg, f.typ, f.remaining, f.size, f.firstSet, f.first = true, hdr[0], n, n+HeaderLen, false, 0
		if !f.Skip {
			if _, err := f.Dst.Write(hdr); err != nil {
				f.WriteErr = err
				return f.typ, 0, 0, err
			}
		}
		_, _ = f.Src.Discard(HeaderLen)
	}
	for f.remaining > 0 {
		if f.Src.Buffered() == 0 {
			// Wait for whatever arrives next and forward that, rather than
			// waiting for a whole buffer.
			if _, err := f.Src.Peek(1); err != nil {
				return f.typ, 0, 0, err
			}
		}
		chunk := min(f.remaining, f.Src.Buffered())
		body, _ := f.Src.Peek(chunk)
		if !f.firstSet {
			f.first, f.firstSet = body[0], true
		}
		if !f.Skip {
			if _, err := f.Dst.Write(body); err != nil {
				f.WriteErr = err
				return f.typ, 0, 0, err
			}
		}
		_, _ = f.Src.Discard(chunk)
		f.remaining -= chunk
	}
	f.inMsg, f.Skip = false, false
	return f.typ, f.first, f.size, nil
}

// AtBoundary reports whether no message is half-copied: what Dst has
// received so far is a whole number of messages.
func (f *FrameCopier) AtBoundary() bool { return !f.inMsg }

// ReadMessage reads one whole message into buf (grown as needed) and returns
// its type and body, which alias buf, and buf to reuse. Bodies over maxBody
// are refused (ErrFraming) before anything is allocated for them. It is for
// the handshake and pgwarden's own exchanges, not the relay.
func ReadMessage(r *bufio.Reader, buf []byte, maxBody int) (typ byte, body, newBuf []byte, err error) {
	hdr, err := r.Peek(HeaderLen)
	if err != nil {
		return 0, nil, buf, err
	}
	typ = hdr[0]
	n := int(binary.BigEndian.Uint32(hdr[1:])) - 4
	if n < 0 || n > maxBody {
		return typ, nil, buf, fmt.Errorf("%w: %d for message type %q (limit %d)", ErrFraming, n+4, typ, maxBody+4)
	}
	_, _ = r.Discard(HeaderLen)
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		return typ, nil, buf, err
	}
	return typ, buf, buf, nil
}

// DeadlineWriter bounds every write to its connection: a peer that takes no bytes for
// timeout makes the write fail — and the session end, freeing what it holds —
// instead of blocking it forever. The deadline is moved forward only once a
// quarter of it has passed, so a busy connection calls SetWriteDeadline
// rarely; a write therefore fails after between three quarters of timeout and
// timeout without progress. It is used by one goroutine at a time.
type DeadlineWriter struct {
	conn    net.Conn
	timeout time.Duration
	limit   time.Time // when set, no deadline goes past it (a pool operation's context)
	until   time.Time // the write deadline in force
}

// NewDeadlineWriter returns a DeadlineWriter for conn; timeout must be
// positive.
func NewDeadlineWriter(conn net.Conn, timeout time.Duration) *DeadlineWriter {
	return &DeadlineWriter{conn: conn, timeout: timeout}
}

// Write writes p to the connection under the write deadline.
func (w *DeadlineWriter) Write(p []byte) (int, error) {
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

// SetLimit caps the write deadline at t (zero removes the cap) from the next
// write on.
func (w *DeadlineWriter) SetLimit(t time.Time) {
	w.limit = t
	w.until = time.Time{}
}

// IsTimeout reports whether err is a deadline expiring.
func IsTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
