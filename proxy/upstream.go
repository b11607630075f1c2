package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/pgerror"
)

// serverConn is one upstream PostgreSQL session, opened by pgconn (which does
// SCRAM and TLS) and then hijacked so the relay owns the socket. It is used by
// one client at a time; the pool hands it out and takes it back.
type serverConn struct {
	conn   net.Conn
	r      *bufio.Reader
	w      *bufio.Writer
	pid    uint32
	secret []byte
	addr   string            // host:port dialed, for cancel requests
	params map[string]string // last ParameterStatus of each parameter
	cred   *broker.Credential
	pool   *pool

	created  time.Time
	lastUsed time.Time // guarded by poolSet.mu while idle
	buf      []byte    // scratch for handshake-phase messages
}

const ioBufSize = 32 << 10

// dialServer opens an upstream session under cred.
func dialServer(ctx context.Context, tmpl *pgconn.Config, cred *broker.Credential, timeout time.Duration) (*serverConn, error) {
	cfg := tmpl.Copy()
	cfg.User = cred.Username
	cfg.Password = cred.Password
	cfg.ConnectTimeout = timeout
	pc, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, upstreamFailure(err)
	}
	// pgconn may have a background reader parked in conn.Read (it starts one
	// when a write is slow); it would steal the server's next reply from the
	// relay. SyncConn stops it and drains pgconn's buffers, as Hijack's
	// contract requires.
	if err := pc.SyncConn(ctx); err != nil {
		pc.Close(context.Background())
		return nil, upstreamFailure(err)
	}
	hj, err := pc.Hijack()
	if err != nil {
		pc.Close(context.Background())
		return nil, pgerror.Wrap(err, pgerror.InternalError, "pgwarden internal error")
	}
	params := make(map[string]string, len(hj.ParameterStatuses))
	for k, v := range hj.ParameterStatuses {
		params[k] = v
	}
	return &serverConn{
		conn: hj.Conn, r: bufio.NewReaderSize(hj.Conn, ioBufSize), w: bufio.NewWriterSize(hj.Conn, ioBufSize),
		pid: hj.PID, secret: hj.SecretKey, addr: hj.Conn.RemoteAddr().String(), params: params, cred: cred,
		created: time.Now(), lastUsed: time.Now(),
	}, nil
}

// upstreamFailure passes a PostgreSQL error through with its own code and
// turns anything else (dial, TLS, timeout) into 08006. pgconn's errors never
// include the password.
func upstreamFailure(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return err
	}
	return pgerror.Wrap(err, pgerror.ConnectionFailure, "could not connect to the upstream database")
}

// simpleQuery runs sql with the simple protocol and reads through
// ReadyForQuery, recording ParameterStatus changes. It returns the first
// ErrorResponse as a *pgconn.PgError, and the final transaction status.
func (sc *serverConn) simpleQuery(ctx context.Context, sql string) (txStatus byte, err error) {
	if dl, ok := ctx.Deadline(); ok {
		sc.conn.SetDeadline(dl)
		defer sc.conn.SetDeadline(time.Time{})
	}
	q := pgproto3.Query{String: sql}
	if sc.buf, err = q.Encode(sc.buf[:0]); err != nil {
		return 0, err
	}
	if _, err := sc.w.Write(sc.buf); err != nil {
		return 0, err
	}
	if err := sc.w.Flush(); err != nil {
		return 0, err
	}
	var firstErr error
	for {
		typ, body, buf, err := readMessage(sc.r, sc.buf, 1<<30)
		sc.buf = buf
		if err != nil {
			return 0, err
		}
		switch typ {
		case 'S':
			var ps pgproto3.ParameterStatus
			if err := ps.Decode(body); err == nil {
				sc.params[ps.Name] = ps.Value
			}
		case 'E':
			var er pgproto3.ErrorResponse
			if err := er.Decode(body); err == nil && firstErr == nil {
				firstErr = pgconn.ErrorResponseToPgError(&er)
			}
		case 'Z':
			if len(body) != 1 {
				return 0, fmt.Errorf("ReadyForQuery with %d-byte body", len(body))
			}
			return body[0], firstErr
		}
	}
}

// reset returns the session to its startup state (DISCARD ALL) so the next
// client inherits nothing. It fails if the session is not idle afterwards.
func (sc *serverConn) reset(ctx context.Context) error {
	st, err := sc.simpleQuery(ctx, "DISCARD ALL")
	if err != nil {
		return err
	}
	if st != 'I' {
		return fmt.Errorf("session not idle after DISCARD ALL (status %q)", st)
	}
	return nil
}

// applySettings sets the client's startup parameters that differ from the
// session's, in one round trip. Names and values are sent as quoted literals
// to set_config, so no client input is ever parsed as SQL.
func (sc *serverConn) applySettings(ctx context.Context, settings [][2]string) error {
	var b strings.Builder
	for _, kv := range settings {
		if v, ok := sc.params[kv[0]]; ok && v == kv[1] {
			continue
		}
		if b.Len() == 0 {
			b.WriteString("SELECT ")
		} else {
			b.WriteString(", ")
		}
		b.WriteString("pg_catalog.set_config(")
		b.WriteString(quoteLiteral(kv[0]))
		b.WriteString(", ")
		b.WriteString(quoteLiteral(kv[1]))
		b.WriteString(", false)")
	}
	if b.Len() == 0 {
		return nil
	}
	st, err := sc.simpleQuery(ctx, b.String())
	if err != nil {
		return err
	}
	if st != 'I' {
		return fmt.Errorf("session not idle after applying settings (status %q)", st)
	}
	return nil
}

// quoteLiteral quotes s as an escape-string literal, safe whatever
// standard_conforming_strings is.
func quoteLiteral(s string) string {
	s = strings.ReplaceAll(s, `\`, `\\`)
	s = strings.ReplaceAll(s, `'`, `''`)
	return `E'` + s + `'`
}

func (sc *serverConn) close() { sc.conn.Close() }
