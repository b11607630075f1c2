package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/pgerror"
)

// Startup packet limits and codes, from PostgreSQL's
// src/include/libpq/pqcomm.h and src/backend/tcop/backend_startup.c.
const (
	minStartupLen   = 8
	maxStartupLen   = 10000 // MAX_STARTUP_PACKET_LENGTH
	sslRequestCode  = 80877103
	gssEncReqCode   = 80877104
	cancelReqCode   = 80877102
	tlsHandshakeRec = 0x16 // first byte of a TLS record carrying a ClientHello
)

// errSilentClose marks a connection closed without a word, as PostgreSQL
// does for garbage before the startup packet completes.
var errSilentClose = errors.New("malformed startup; closed silently")

// errNoStartup is a connection that closed before sending a byte: a port
// probe or health check, not an authentication attempt.
var errNoStartup = fmt.Errorf("%w: no startup packet", errSilentClose)

// bufConn lets the TLS handshake read bytes already buffered by r.
type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (b bufConn) Read(p []byte) (int, error) { return b.r.Read(p) }

// readStartup negotiates encryption and returns the StartupMessage or
// CancelRequest that follows. Bytes a client sends behind an SSLRequest before
// it has our answer are a protocol violation (CVE-2021-23214): such a
// connection is closed.
func (c *clientConn) readStartup(ctx context.Context) (pgproto3.FrontendMessage, error) {
	// As PostgreSQL's ProcessStartupPacket: each of SSLRequest and
	// GSSENCRequest may come once, in either order; after TLS is up, neither.
	// libpq with a Kerberos credential cache sends GSSENCRequest, takes 'N',
	// then sends SSLRequest.
	sslDone, gssDone := false, false
	if _, err := c.r.Peek(1); err != nil {
		return nil, errNoStartup
	}
	for {
		if !sslDone && !gssDone && c.rc.TLS != nil {
			first, err := c.r.Peek(1)
			if err != nil {
				return nil, errSilentClose
			}
			if first[0] == tlsHandshakeRec {
				// PostgreSQL 17 sslnegotiation=direct: TLS from the first byte,
				// ALPN "postgresql" required.
				if err := c.startTLS(ctx, bufConn{c.nc, c.r}, true); err != nil {
					return nil, err
				}
				sslDone, gssDone = true, true
				continue
			}
		}
		var lenBuf [4]byte
		if _, err := io.ReadFull(c.r, lenBuf[:]); err != nil {
			return nil, errSilentClose
		}
		n := int(binary.BigEndian.Uint32(lenBuf[:]))
		if n < minStartupLen || n > maxStartupLen {
			return nil, errSilentClose
		}
		body := make([]byte, n-4)
		if _, err := io.ReadFull(c.r, body); err != nil {
			return nil, errSilentClose
		}
		code := binary.BigEndian.Uint32(body)
		switch code {
		case sslRequestCode, gssEncReqCode:
			if (code == sslRequestCode && sslDone) || (code == gssEncReqCode && gssDone) {
				return nil, fmt.Errorf("%w: repeated encryption request", errSilentClose)
			}
			if c.r.Buffered() > 0 {
				return nil, fmt.Errorf("%w: data sent behind an encryption request", errSilentClose)
			}
			if code == gssEncReqCode || c.rc.TLS == nil {
				if code == gssEncReqCode {
					gssDone = true
				} else {
					sslDone = true
				}
				if err := c.writeRaw([]byte{'N'}); err != nil {
					return nil, err
				}
				continue
			}
			if err := c.writeRaw([]byte{'S'}); err != nil {
				return nil, err
			}
			if err := c.startTLS(ctx, c.nc, false); err != nil {
				return nil, err
			}
			sslDone, gssDone = true, true
		case cancelReqCode:
			var cr pgproto3.CancelRequest
			if err := cr.Decode(body); err != nil {
				return nil, errSilentClose
			}
			return &cr, nil
		default:
			if major := code >> 16; major != 3 {
				return nil, pgerror.Newf(pgerror.FeatureNotSupported,
					"unsupported frontend protocol %d.%d: pgwarden supports 3.0", major, code&0xffff)
			}
			var sm pgproto3.StartupMessage
			if err := sm.Decode(body); err != nil {
				// Decode refuses minor versions other than 0 and 2; any other
				// 3.x is answered with NegotiateProtocolVersion like 3.2 is.
				binary.BigEndian.PutUint32(body, pgproto3.ProtocolVersion30)
				if err2 := sm.Decode(body); err2 != nil {
					return nil, pgerror.Wrap(err, pgerror.ProtocolViolation, "invalid startup packet layout")
				}
				sm.ProtocolVersion = code
			}
			return &sm, nil
		}
	}
}

func (c *clientConn) writeRaw(b []byte) error {
	_, err := c.nc.Write(b)
	return err
}

// startTLS runs the server side of a TLS handshake over under and switches
// the connection's reader and writer to it.
func (c *clientConn) startTLS(ctx context.Context, under net.Conn, direct bool) error {
	tc := tls.Server(under, c.rc.TLS)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("%w: TLS handshake: %v", errSilentClose, err)
	}
	if direct && tc.ConnectionState().NegotiatedProtocol != "postgresql" {
		return fmt.Errorf("%w: direct TLS without ALPN \"postgresql\"", errSilentClose)
	}
	c.nc = tc
	c.tls = true
	// After an SSLRequest the plaintext reader is empty (readStartup checked),
	// so both buffers move onto the TLS conn. With direct TLS the old reader
	// sits beneath the handshake and may hold the client's next record, so
	// the TLS side gets a reader of its own.
	if direct {
		c.r = bufio.NewReaderSize(tc, handshakeBufSize)
	} else {
		c.r.Reset(tc)
	}
	c.w.Reset(tc)
	return nil
}
