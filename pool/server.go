package pool

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/pgerror"
	"github.com/pgwarden/pgwarden/wire"
)

// Server is one upstream PostgreSQL session, opened by pgconn (which does
// SCRAM and TLS) and then hijacked so the relay owns the socket.
//
// Ownership: the Set that opened it owns it. A client borrows it from
// Set.Acquire to Set.Release, Set.Checkin or Set.Discard, and while borrowed
// only that client's session goroutine (and its relay goroutines) touch it;
// while idle only the Set does, under its lock. The borrower may call Close
// to unblock its own goroutines when it ends a session it cannot hand back
// clean, but it still gives the Server back (Discard): only the Set lets go
// of a server and its slot for good. The exported fields are the holder's
// to read (and, where said, to write) while it holds the Server.
type Server struct {
	// Conn is the session's socket; R and W buffer it (W under a write
	// deadline, Options.WriteTimeout). The holder reads R and writes W; it
	// may set read deadlines on Conn to interrupt its own reader.
	Conn net.Conn
	R    *bufio.Reader
	W    *bufio.Writer
	dw   *wire.DeadlineWriter // under W: bounds every write
	// PID and Secret are the backend's key (BackendKeyData).
	PID    uint32
	Secret []byte
	// CancelAddr is where a CancelRequest for this backend goes (Cancel).
	CancelAddr CancelAddr
	// Params are the last ParameterStatus of each parameter; the holder's
	// (SetParam records one).
	Params map[string]string
	// Cred is the credential the session logged in with, held
	// (Credential.Hold) from dial to close.
	Cred   *broker.Credential
	pool   *pool
	closed atomic.Bool

	Created  time.Time // when it was opened
	lastUsed time.Time // guarded by Set.mu while idle
	buf      []byte    // scratch for handshake-phase messages

	// Transaction mode: what pgwarden set on the session (lower-cased
	// setting names) and the identity it carries (an opaque key of the
	// client's), both the holder's to read and write; and the statements
	// prepared on it (Stmts). Reset (DISCARD ALL) clears them.
	Applied   map[string]string
	Identity  string
	stmtCache *StmtCache
	maxStmts  int

	// ID numbers the session for the console.
	ID uint64
	// AppName is application_name as last reported, for the console
	// (Params is the holder's alone).
	AppName atomic.Pointer[string]
	// Client is the id of the client it is lent to, 0 when none; the
	// borrower sets it, the console reads it.
	Client  atomic.Uint64
	onClose func(*Server) // the Set's, when registered
}

// SetParam records a ParameterStatus. Params belongs to whoever holds the
// server; the console reads application_name through AppName.
func (sc *Server) SetParam(name, value string) {
	sc.Params[name] = value
	if name == "application_name" {
		sc.AppName.Store(&value)
	}
}

// Key is the pool the server belongs to.
func (sc *Server) Key() Key { return sc.pool.key }

// serverIDs numbers server connections for the console.
var serverIDs atomic.Uint64

// serverBufSize is the size of each upstream session's read and write
// buffers. Messages larger than a buffer are streamed through it.
const serverBufSize = 16 << 10

// CancelAddr is how to reach the postmaster that runs a backend: the network
// and address the session itself was opened on, and its TLS settings.
type CancelAddr struct {
	Network, Address string
	TLS              *tls.Config // nil: the session is not encrypted
}

// dialServer opens an upstream session under cred. The template's TLS and
// authentication policy (see ParseUpstream) apply.
func dialServer(ctx context.Context, tmpl *pgconn.Config, cred *broker.Credential, dialTimeout, writeTimeout time.Duration) (*Server, error) {
	cfg := tmpl.Copy()
	cfg.User = cred.Username
	cfg.Password = cred.Password
	cfg.ConnectTimeout = dialTimeout
	// The session's socket makes its system calls raw (see wire.WithRawIO), under
	// pgconn's TLS too.
	dial := cfg.DialFunc
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return wire.WithRawIO(c), nil
	}
	pc, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, UpstreamFailure(err)
	}
	// pgconn may have a background reader parked in conn.Read (it starts one
	// when a write is slow); it would steal the server's next reply from the
	// relay. SyncConn stops it and drains pgconn's buffers, as Hijack's
	// contract requires.
	if err := pc.SyncConn(ctx); err != nil {
		pc.Close(context.Background())
		return nil, UpstreamFailure(err)
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
	dw := wire.NewDeadlineWriter(hj.Conn, writeTimeout)
	now := time.Now()
	cred.Hold()
	sc := &Server{
		Conn: hj.Conn, R: bufio.NewReaderSize(hj.Conn, serverBufSize), W: bufio.NewWriterSize(dw, serverBufSize), dw: dw,
		PID: hj.PID, Secret: hj.SecretKey, CancelAddr: cancelAddrOf(hj), Params: params, Cred: cred,
		Created: now, lastUsed: now, ID: serverIDs.Add(1),
	}
	if v, ok := params["application_name"]; ok {
		sc.AppName.Store(&v)
	}
	return sc, nil
}

// cancelAddrOf is where cancel requests for a hijacked session go. For TCP it
// is the peer the session is connected to (so a multi-host connection string
// cancels on the host it landed on). For a unix socket the peer name is the
// path the server bound, which PostgreSQL makes relative; the configured
// socket is used then, as pgconn's own CancelRequest does.
func cancelAddrOf(hj *pgconn.HijackedConn) CancelAddr {
	a := CancelAddr{Network: hj.Conn.RemoteAddr().Network(), Address: hj.Conn.RemoteAddr().String(), TLS: hj.TLSConfig}
	if a.Network == "unix" && !strings.HasPrefix(a.Address, "/") {
		a.Network, a.Address = pgconn.NetworkAddress(hj.Config.Host, hj.Config.Port)
	}
	return a
}

// UpstreamFailure passes a PostgreSQL error through with its own code and
// turns anything else (dial, TLS, timeout, an authentication method pgwarden
// will not use) into 08006. pgconn's errors never include the password.
func UpstreamFailure(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return err
	}
	return pgerror.Wrap(err, pgerror.ConnectionFailure, "could not connect to the upstream database")
}

// UpstreamPolicy is what ParseUpstream enforces on a route's connection string.
type UpstreamPolicy struct {
	// AllowInsecure lets a non-loopback upstream use an sslmode weaker than
	// verify-full (disable, prefer, require, verify-ca…). Default false.
	AllowInsecure bool
}

// ParseUpstream parses a route's connection string and applies pgwarden's
// policy for the upstream leg, which carries the dynamic credentials:
//
//   - A non-loopback upstream without an sslmode gets sslmode=verify-full
//     (pgconn's default, prefer, neither verifies nor insists). One whose
//     sslmode allows plaintext or skips verifying the server's certificate
//     and name is refused unless policy.AllowInsecure is set. Loopback hosts
//     and unix sockets keep what the string says.
//   - The upstream must authenticate with SCRAM-SHA-256 (require_auth): a man
//     in the middle asking for a cleartext or MD5 password gets nothing.
//
// User, password and run-time parameters are cleared: each credential and
// client supplies its own. Errors say what to change.
func ParseUpstream(conn string, policy UpstreamPolicy) (*pgconn.Config, error) {
	cfg, err := pgconn.ParseConfig(conn)
	if err != nil {
		return nil, err
	}
	if !allLocal(cfg) {
		// A setting given later in the string wins, so this is only a default.
		if cfg, err = pgconn.ParseConfig(withDefaultSSLMode(conn, "verify-full")); err != nil {
			return nil, err
		}
		if !policy.AllowInsecure {
			// allow and prefer list each host twice, with TLS and without:
			// report the weakest setting a host may be reached with.
			var host, why string
			rank := 0
			for _, h := range upstreamHosts(cfg) {
				if r, w := weakTLS(h.tls); r > rank && !isLocalHost(h.host) {
					host, why, rank = h.host, w, r
				}
			}
			if rank > 0 {
				return nil, fmt.Errorf("upstream host %s is not loopback and %s: use sslmode=verify-full (with sslrootcert naming the server's CA), or allow it explicitly with allow_insecure_upstream", host, why)
			}
		}
	}
	switch cfg.RequireAuth {
	case "", "scram-sha-256":
		cfg.RequireAuth = "scram-sha-256"
	default:
		return nil, fmt.Errorf("require_auth=%s: pgwarden authenticates upstream with SCRAM-SHA-256 only; leave require_auth out", cfg.RequireAuth)
	}
	cfg.User, cfg.Password = "", ""
	cfg.RuntimeParams = map[string]string{}
	return cfg, nil
}

type upstreamHost struct {
	host string
	tls  *tls.Config
}

// upstreamHosts lists every (host, TLS setting) pgconn may try, in order.
func upstreamHosts(cfg *pgconn.Config) []upstreamHost {
	out := []upstreamHost{{cfg.Host, cfg.TLSConfig}}
	for _, f := range cfg.Fallbacks {
		out = append(out, upstreamHost{f.Host, f.TLSConfig})
	}
	return out
}

func allLocal(cfg *pgconn.Config) bool {
	for _, h := range upstreamHosts(cfg) {
		if !isLocalHost(h.host) {
			return false
		}
	}
	return true
}

// isLocalHost reports whether host is a unix socket directory or a loopback
// address or name: a connection no one else on the network can sit in.
func isLocalHost(host string) bool {
	if strings.HasPrefix(host, "/") || host == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.Unmap().IsLoopback()
}

// weakTLS says what is wrong with a TLS setting for a network upstream, and
// how badly (0: nothing). pgconn encodes sslmode in its tls.Config: nil is
// plaintext (disable, or the fallback of allow/prefer); InsecureSkipVerify
// without a verifier is require; with VerifyPeerCertificate it is verify-ca
// (the chain, not the name).
func weakTLS(c *tls.Config) (rank int, why string) {
	switch {
	case c == nil:
		return 3, "its sslmode allows an unencrypted connection"
	case c.InsecureSkipVerify && c.VerifyPeerCertificate == nil:
		return 2, "its sslmode does not verify the server's certificate"
	case c.InsecureSkipVerify:
		return 1, "its sslmode (verify-ca) does not verify the server's name"
	}
	return 0, ""
}

// withDefaultSSLMode returns conn with sslmode=mode unless conn sets one: for
// a URL as a query parameter when absent, for keyword/value form in front,
// where a later sslmode overrides it.
func withDefaultSSLMode(conn, mode string) string {
	if strings.HasPrefix(conn, "postgres://") || strings.HasPrefix(conn, "postgresql://") {
		u, err := url.Parse(conn)
		if err != nil {
			return conn // ParseConfig has already accepted it; leave it be
		}
		q := u.Query()
		if !q.Has("sslmode") {
			q.Set("sslmode", mode)
			u.RawQuery = q.Encode()
		}
		return u.String()
	}
	return "sslmode=" + mode + " " + conn
}

// SimpleQuery runs sql with the simple protocol and reads through
// ReadyForQuery, within ctx's deadline, recording ParameterStatus changes and
// handing each DataRow's values to row (when not nil; they alias a buffer
// reused by the next message). It returns the first ErrorResponse as a
// *pgconn.PgError, and the final transaction status. It is for pgwarden's own
// statements, never a client's.
func (sc *Server) SimpleQuery(ctx context.Context, sql string, row func(values [][]byte)) (txStatus byte, err error) {
	defer sc.within(ctx)()
	q := pgproto3.Query{String: sql}
	if sc.buf, err = q.Encode(sc.buf[:0]); err != nil {
		return 0, err
	}
	if _, err := sc.W.Write(sc.buf); err != nil {
		return 0, err
	}
	if err := sc.W.Flush(); err != nil {
		return 0, err
	}
	var firstErr error
	for {
		typ, body, buf, err := wire.ReadMessage(sc.R, sc.buf, 1<<30)
		sc.buf = buf
		if err != nil {
			return 0, err
		}
		switch typ {
		case 'S':
			var ps pgproto3.ParameterStatus
			if err := ps.Decode(body); err == nil {
				sc.SetParam(ps.Name, ps.Value)
			}
		case 'D':
			var dr pgproto3.DataRow
			if err := dr.Decode(body); err == nil && row != nil {
				row(dr.Values)
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

// Reset returns the session to its startup state (DISCARD ALL) so the next
// client inherits nothing. It fails if the session is not idle afterwards.
func (sc *Server) Reset(ctx context.Context) error {
	st, err := sc.SimpleQuery(ctx, "DISCARD ALL", nil)
	if err != nil {
		return err
	}
	if st != 'I' {
		return fmt.Errorf("session not idle after DISCARD ALL (status %q)", st)
	}
	sc.Applied, sc.Identity = nil, ""
	if sc.stmtCache != nil {
		sc.stmtCache.Clear()
	}
	return nil
}

// ApplySettings sets the client's startup parameters that differ from the
// session's, in one round trip. Names and values are sent as quoted literals
// to set_config, so no client input is ever parsed as SQL.
func (sc *Server) ApplySettings(ctx context.Context, settings [][2]string) error {
	var b strings.Builder
	for _, kv := range settings {
		if v, ok := sc.Params[kv[0]]; ok && v == kv[1] {
			continue
		}
		if b.Len() == 0 {
			b.WriteString("SELECT ")
		} else {
			b.WriteString(", ")
		}
		b.WriteString("pg_catalog.set_config(")
		b.WriteString(QuoteLiteral(kv[0]))
		b.WriteString(", ")
		b.WriteString(QuoteLiteral(kv[1]))
		b.WriteString(", false)")
	}
	if b.Len() == 0 {
		return nil
	}
	st, err := sc.SimpleQuery(ctx, b.String(), nil)
	if err != nil {
		return err
	}
	if st != 'I' {
		return fmt.Errorf("session not idle after applying settings (status %q)", st)
	}
	return nil
}

// QuoteLiteral quotes s as an escape-string literal, safe whatever
// standard_conforming_strings is.
func QuoteLiteral(s string) string {
	s = strings.ReplaceAll(s, `\`, `\\`)
	s = strings.ReplaceAll(s, `'`, `''`)
	return `E'` + s + `'`
}

// QuoteIdent quotes s as an SQL identifier.
func QuoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

// Close closes the session and releases its credential; only the first call
// does anything. The Set closes the servers it lets go of; a borrower
// closes one only to stop its own goroutines on a session it is ending,
// and gives it back with Discard afterwards, which frees its slot.
func (sc *Server) Close() {
	if sc.closed.Swap(true) {
		return
	}
	_ = sc.Conn.Close()
	sc.Cred.Release()
	if sc.onClose != nil {
		sc.onClose(sc)
	}
}

// errUnexpectedData is an idle upstream session that has something to say:
// PostgreSQL only speaks unasked to end a session (a FATAL for a shutdown,
// pg_terminate_backend or idle_session_timeout).
var errUnexpectedData = errors.New("idle upstream session sent data: the server is ending it")

// alive decides whether an idle session may be lent. Bytes waiting or a
// closed socket mean the server ended it (restart, pg_terminate_backend,
// idle_session_timeout): that check reads nothing and costs one syscall. A
// silent network cut shows only in a round trip, and a role dropped under a
// session (its lease revoked behind pgwarden's back: the session still
// answers, and fails every privilege check) only in a question about it, so
// after an idle period (ping) the session must also show, within ctx, that
// its own role still exists.
func (sc *Server) alive(ctx context.Context, ping bool) error {
	if sc.R.Buffered() > 0 {
		return errUnexpectedData
	}
	if err := wire.PeekClosed(sc.Conn); err != nil {
		if errors.Is(err, wire.ErrUnexpectedData) {
			return errUnexpectedData
		}
		return err
	}
	if !ping {
		return nil
	}
	rows := 0
	st, err := sc.SimpleQuery(ctx, "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = session_user", func([][]byte) { rows++ })
	switch {
	case err != nil:
		return fmt.Errorf("no good answer to a ping: %w", err)
	case st != 'I':
		return fmt.Errorf("ping left the session in transaction status %q", st)
	case rows != 1:
		return errRoleGone
	}
	return nil
}

// errRoleGone is an idle session whose database role was dropped.
var errRoleGone = errors.New("the session's database role no longer exists (its lease was revoked)")

// within bounds reads and writes on the session by ctx's deadline, for one of
// pgwarden's own exchanges; the returned func lifts the bound.
func (sc *Server) within(ctx context.Context) (undo func()) {
	dl, ok := ctx.Deadline()
	if !ok {
		return func() {}
	}
	_ = sc.Conn.SetReadDeadline(dl)
	sc.dw.SetLimit(dl)
	return func() {
		_ = sc.Conn.SetReadDeadline(time.Time{})
		sc.dw.SetLimit(time.Time{})
	}
}

// NoteApplied records that sc carries settings (lower-cased names) and the
// identity idKey: transaction mode's bookkeeping, so the next client that
// attaches sets only what differs.
func (sc *Server) NoteApplied(settings map[string]string, idKey string) {
	if sc.Applied == nil {
		sc.Applied = make(map[string]string, len(settings))
	}
	for k, v := range settings {
		sc.Applied[k] = v
	}
	sc.Identity = idKey
}

// Stmts is the server's cache of prepared statements, made on first use.
// It is the holder's, as the server is.
func (sc *Server) Stmts() *StmtCache {
	if sc.stmtCache == nil {
		sc.stmtCache = NewStmtCache(sc.maxStmts)
	}
	return sc.stmtCache
}

// Cancel asks PostgreSQL to cancel what the session's backend is running:
// it opens a connection to the postmaster at CancelAddr — on the network
// and address the session itself uses, encrypted when it is — sends a
// CancelRequest for (PID, Secret), and waits, within ctx, for the server to
// close the connection, which it does once it has signalled the backend.
// Like PostgreSQL's, the answer says nothing about whether a query was
// cancelled; an error means the request may not have arrived.
func (sc *Server) Cancel(ctx context.Context) error {
	addr := sc.CancelAddr
	msg, err := (&pgproto3.CancelRequest{ProcessID: sc.PID, SecretKey: sc.Secret}).Encode(nil)
	if err != nil {
		return err
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, addr.Network, addr.Address)
	if err != nil {
		return err
	}
	defer nc.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = nc.SetDeadline(dl)
	}
	if addr.TLS != nil {
		req, _ := (&pgproto3.SSLRequest{}).Encode(nil)
		if _, err := nc.Write(req); err != nil {
			return err
		}
		var answer [1]byte
		if _, err := io.ReadFull(nc, answer[:]); err != nil {
			return err
		}
		if answer[0] != 'S' {
			return fmt.Errorf("upstream refused TLS for a cancel request (%q)", answer[0])
		}
		tc := tls.Client(nc, addr.TLS)
		if err := tc.HandshakeContext(ctx); err != nil {
			return err
		}
		nc = tc
	}
	if _, err := nc.Write(msg); err != nil {
		return err
	}
	_, _ = nc.Read(make([]byte, 1))
	return nil
}
