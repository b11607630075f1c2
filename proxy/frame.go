package proxy

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Message framing after startup: a 1-byte type, a 4-byte big-endian length
// that counts itself, then the body. See
// https://www.postgresql.org/docs/current/protocol-overview.html#PROTOCOL-MESSAGE-CONCEPTS.
const headerLen = 5

// errFraming is a length field under 4: the peer is not speaking the protocol.
var errFraming = errors.New("invalid message length")

// copyFrame relays one message from src to dst without decoding it and
// without allocating: the header and body are peeked from src's buffer and
// written to dst's. It returns the message type and, for a one-byte body
// (ReadyForQuery's status), that byte, and the message's size. dst is not flushed.
func copyFrame(dst *bufio.Writer, src *bufio.Reader) (typ, first byte, size int, err error) {
	hdr, err := src.Peek(headerLen)
	if err != nil {
		return 0, 0, 0, err
	}
	typ = hdr[0]
	n := int(binary.BigEndian.Uint32(hdr[1:])) - 4
	if n < 0 {
		return typ, 0, 0, fmt.Errorf("%w: %d for message type %q", errFraming, n+4, typ)
	}
	if _, err := dst.Write(hdr); err != nil {
		return typ, 0, 0, err
	}
	if _, err := src.Discard(headerLen); err != nil {
		return typ, 0, 0, err
	}
	firstSet := false
	total := n
	for n > 0 {
		chunk := min(n, src.Size())
		if b := src.Buffered(); b > 0 && b < chunk {
			chunk = b // forward what has arrived instead of waiting for a full buffer
		}
		body, err := src.Peek(chunk)
		if err != nil {
			return typ, 0, 0, err
		}
		if !firstSet {
			first, firstSet = body[0], true
		}
		if _, err := dst.Write(body); err != nil {
			return typ, 0, 0, err
		}
		_, _ = src.Discard(chunk)
		n -= chunk
	}
	return typ, first, total + headerLen, nil
}

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
