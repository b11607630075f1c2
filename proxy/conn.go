package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/pgerror"
	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/wire"
)

// errAbandoned is a client that hung up while asked for its token.
var errAbandoned = fmt.Errorf("%w: client hung up during authentication", errSilentClose)

// clientConn is one accepted client. Its goroutine owns the connection: it
// reads and writes until the relay starts, waits for the relay, and closes
// it. kill may be called from any goroutine.
type clientConn struct {
	srv    *Server
	raw    net.Conn // as accepted
	nc     net.Conn // raw, or TLS over it
	r      *bufio.Reader
	w      *bufio.Writer
	dw     *wire.DeadlineWriter // under w once the relay's buffers are in place
	tls    bool
	start  time.Time
	remote string
	rc     *Reloadable // the configuration it was accepted under (Server.Reconfigure)

	killOnce sync.Once
	killed   atomic.Bool // kill ran: a server taken since must not run the client's message

	// Owned by the goroutine serving the connection (serve's, or the one
	// that resumed it after it parked).
	handshakeOver bool   // counted out of Server.handshakes
	holdsSubject  bool   // counted in Server.subjects
	cancelHeld    bool   // cancelPID is registered in Server.cancels
	cancelPID     uint32 // the BackendKeyData pid the client was given
	noticeSent    bool   // the token's NOTICE is out (session mode, before the first message)

	// Set during the handshake, for the relay and the audit record.
	database, level string
	id              *authn.Identity
	req             broker.Request // what the credential was read with
	mode            string         // PoolSession or PoolTransaction

	// For the console (read from other goroutines).
	cid       uint64
	info      atomic.Pointer[clientInfo]  // set once authenticated
	attached  atomic.Pointer[pool.Server] // the server it holds, if any
	waitSince atomic.Int64                // unix ns it started waiting for a server; 0 when not
	lastReq   atomic.Int64                // unix ns it last took a server
	onKill    atomic.Pointer[func()]      // what else kill interrupts (transaction mode)
}

// Buffer sizes. A connection that is still authenticating gets small buffers
// (the startup packet and the token are read into buffers of their own size,
// capped before allocation); the relay's are allocated once it is
// authenticated.
const (
	handshakeBufSize = 512
	clientBufSize    = 16 << 10
)

func newClientConn(s *Server, nc net.Conn) *clientConn {
	return &clientConn{
		srv: s, raw: nc, nc: nc, start: s.cfg.Now(), remote: nc.RemoteAddr().String(), cid: clientIDs.Add(1), rc: s.reloadable.Load(),
		r: bufio.NewReaderSize(nc, handshakeBufSize), w: bufio.NewWriterSize(nc, handshakeBufSize),
	}
}

// kill closes the client socket; the goroutines blocked on it return.
func (c *clientConn) kill() {
	c.killOnce.Do(func() {
		c.killed.Store(true)
		c.raw.Close()
		if f := c.onKill.Load(); f != nil {
			(*f)()
		}
	})
}

// endHandshake counts the connection out of MaxHandshakes, once.
func (c *clientConn) endHandshake() {
	if !c.handshakeOver {
		c.handshakeOver = true
		c.srv.handshakes.Add(-1)
	}
}

// serve runs one connection from accept to close — or, in transaction mode,
// until the client parks idle (txnSession.park): then the goroutine that
// resumes it ends it (close).
func (c *clientConn) serve() {
	cfg := &c.srv.cfg
	cfg.Observer.ClientConnected()
	handedOff := false
	defer func() {
		if !handedOff {
			c.close()
		}
	}()

	// The authentication timeout is a total deadline from accept to
	// AuthenticationOk, not an idle timer: trickling bytes buys nothing.
	deadline := c.start.Add(cfg.AuthTimeout)
	_ = c.raw.SetDeadline(deadline)
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()

	msg, err := c.readStartup(ctx)
	if err != nil {
		c.refuse(err, "protocol")
		return
	}
	if cr, ok := msg.(*pgproto3.CancelRequest); ok {
		c.srv.cancels.forward(ctx, cr)
		return
	}
	sm := msg.(*pgproto3.StartupMessage)
	if sm.Parameters["database"] == ConsoleDatabase {
		why, err := c.serveConsole(ctx, sm)
		if err != nil {
			c.refuse(err, authReason(err))
			return
		}
		cfg.Logger.Info("console session", "subject", c.id.Subject, "remote", c.remote, "tls", c.tls,
			"duration", cfg.Now().Sub(c.start).Round(time.Millisecond).String(), "end", why)
		return
	}
	pid, target := c.srv.cancels.register()
	c.cancelPID, c.cancelHeld = pid, true

	up, settings, err := c.authenticate(ctx, sm)
	if err != nil {
		c.refuse(err, authReason(err))
		return
	}
	target.set(up)
	if err := c.greet(ctx, up, settings, pid, target.secret); err != nil {
		target.set(nil)
		c.srv.pools.Discard(up)
		c.refuse(err, authReason(err))
		return
	}
	c.endHandshake()
	cfg.Observer.AuthResult(c.dbLabel(), c.level, "ok")
	_ = c.raw.SetDeadline(time.Time{})
	c.info.Store(&clientInfo{subject: c.id.Subject, database: c.database, level: c.level, mode: c.mode,
		appName: sm.Parameters["application_name"], tls: c.tls})
	stats := c.srv.statsFor(c.database)
	if c.srv.deniedToken(c.id) {
		// KILL SUBJECT ran while this login was under way: listed now, it
		// is refused as the ones it killed were.
		target.set(nil)
		c.srv.pools.Release(up)
		_ = sendFatal(c.w, errKilled)
		return
	}

	if c.mode == PoolTransaction {
		t := c.startTxn(up, c.req, settings, target)
		why, parked := t.run()
		if parked {
			handedOff = true // the goroutine that resumes it ends it
			return
		}
		t.done(why)
		return
	}

	// Session mode: the client holds a server from its first message to its
	// end. Until that message the login's server waits in the pool, its
	// settings and identity noted: the client most likely gets it back.
	cs := newClientSettings(c, settings)
	up.NoteApplied(cs.settings, cs.idKey)
	target.set(nil)
	cred := up.Cred
	c.srv.pools.Checkin(up, false)
	c.dw = wire.NewDeadlineWriter(c.nc, cfg.WriteTimeout)
	c.w.Reset(c.dw)
	if why, ok := c.awaitFirstMessage(); !ok {
		cfg.Logger.Info("session",
			"subject", c.id.Subject, "name", c.id.Name, "remote", c.remote, "tls", c.tls,
			"database", c.database, "level", c.level, "pool_mode", c.mode,
			"duration", cfg.Now().Sub(c.start).Round(time.Millisecond).String(), "statements", 0, "end", why)
		return
	}
	ctx = context.Background() // each step bounds itself, as in transaction mode
	if up, _, err = c.acquire(ctx, c.req, cred, stats); err == nil {
		if err = cs.apply(ctx, c, up); err != nil {
			c.srv.pools.Discard(up)
			err = pool.UpstreamFailure(err)
		} else if c.killed.Load() {
			c.srv.pools.Release(up)
			err = errKilledWaiting
		}
	}
	if err != nil {
		c.sendFinal(err)
		cfg.Logger.Info("session",
			"subject", c.id.Subject, "name", c.id.Name, "remote", c.remote, "tls", c.tls,
			"database", c.database, "level", c.level, "pool_mode", c.mode,
			"duration", cfg.Now().Sub(c.start).Round(time.Millisecond).String(), "statements", 0,
			"end", "no server for its first message", "error", err)
		return
	}
	target.set(up)
	c.growBuffers()
	c.lastReq.Store(time.Now().UnixNano())
	c.attached.Store(up)
	up.Client.Store(c.cid)
	res := c.relay(up)
	up.Client.Store(0)
	c.attached.Store(nil)
	stats.queries.Add(res.statements)
	stats.xacts.Add(res.xacts)
	stats.recv.Add(res.bytesIn)
	stats.sent.Add(res.bytesOut)
	c.dropBuffers() // the relay's goroutines have returned
	target.set(nil) // waits for a cancel in flight to land first
	if res.reusable {
		c.srv.pools.Release(up)
	} else {
		c.srv.pools.Discard(up)
	}
	// The session's own credential: a pooled session may have been opened
	// under another credential of the same level than the one just read.
	cfg.Logger.Info("session",
		"subject", c.id.Subject, "name", c.id.Name, "remote", c.remote, "tls", c.tls,
		"database", c.database, "level", c.level, "lease_id", up.Cred.LeaseID, "db_user", up.Cred.Username,
		"backend_pid", up.PID, "duration", cfg.Now().Sub(c.start).Round(time.Millisecond).String(),
		"bytes_in", res.bytesIn, "bytes_out", res.bytesOut, "statements", res.statements,
		"end", res.why, "upstream_reused", res.reusable)
}

// awaitFirstMessage waits, holding no server, for a session-mode client's
// first message after its greeting. The token still bounds the wait: the
// NOTICE before it expires, the end (57P01) once it has. It returns false
// and why when the session ended first.
func (c *clientConn) awaitFirstMessage() (string, bool) {
	cfg := &c.srv.cfg
	defer func() { _ = c.nc.SetReadDeadline(time.Time{}) }()
	for {
		var deadline time.Time
		if exp := c.id.Expiry; !exp.IsZero() {
			deadline = exp
			if !c.noticeSent {
				deadline = exp.Add(-cfg.TokenExpiryNotice)
			}
		}
		_ = c.nc.SetReadDeadline(deadline)
		if b, err := c.r.Peek(1); err == nil {
			if b[0] == 'X' {
				return "client terminated", false // no server for a goodbye
			}
			return "", true
		} else if !wire.IsTimeout(err) {
			return "client disconnected", false
		}
		if !c.noticeSent {
			c.noticeSent = true
			c.tokenNotice()
			if err := c.w.Flush(); err != nil {
				return "client write failed", false
			}
			continue
		}
		c.sendFinal(errTokenExpired)
		return "token expired", false
	}
}

// close ends the connection and its bookkeeping, once, on whichever
// goroutine ends the session.
func (c *clientConn) close() {
	if c.cancelHeld {
		c.srv.cancels.unregister(c.cancelPID)
	}
	if c.holdsSubject {
		c.srv.releaseSubject(c.id.Subject)
	}
	c.endHandshake()
	c.kill()
	c.srv.cfg.Observer.ClientClosed()
	c.srv.untrack(c)
}

// growBuffers swaps the small handshake buffers for the relay's, with a
// write deadline under the writer. The client may already have sent its first
// query: whatever the handshake reader holds is read first.
//
// The relay's buffers come from a pool and go back to it when the session
// ends (dropBuffers), so a connection storm does not allocate 32 KiB per
// connection for the collector to find.
func (c *clientConn) growBuffers() {
	var src io.Reader = c.nc
	if n := c.r.Buffered(); n > 0 {
		b, _ := c.r.Peek(n)
		src = io.MultiReader(bytes.NewReader(bytes.Clone(b)), src)
	}
	c.dw = wire.NewDeadlineWriter(c.nc, c.srv.cfg.WriteTimeout)
	c.r = relayReaders.Get().(*bufio.Reader)
	c.r.Reset(src)
	c.w = relayWriters.Get().(*bufio.Writer)
	c.w.Reset(c.dw)
}

// dropBuffers gives the relay's buffers back. The connection must not be
// read or written after it.
func (c *clientConn) dropBuffers() {
	c.r.Reset(nil)
	c.w.Reset(nil)
	relayReaders.Put(c.r)
	relayWriters.Put(c.w)
	c.r, c.w = nil, nil
}

var (
	relayReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, clientBufSize) }}
	relayWriters = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, clientBufSize) }}
)

// dbLabel is the database for metric labels: a configured name, or
// "unknown" for anything a client made up, since labels must stay bounded.
func (c *clientConn) dbLabel() string {
	if _, ok := c.srv.cfg.Routes[c.database]; ok || c.database == "" || c.database == ConsoleDatabase {
		return c.database
	}
	return "unknown"
}

// refuse sends a FATAL for err, unless err asks for a silent close, and
// records the result.
func (c *clientConn) refuse(err error, reason string) {
	cfg := &c.srv.cfg
	if !errors.Is(err, errSilentClose) {
		_ = c.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_ = sendFatal(c.w, err)
	}
	if errors.Is(err, errNoStartup) {
		return // not an attempt: nothing to count or log
	}
	cfg.Observer.AuthResult(c.dbLabel(), c.level, reason)
	level := slog.LevelInfo
	if pgerror.Code(err) == pgerror.InternalError && !errors.Is(err, errSilentClose) {
		level = slog.LevelError
	}
	attrs := []any{"remote", c.remote, "reason", reason, "sqlstate", errorResponse("FATAL", err).Code, "error", err}
	if c.id != nil {
		attrs = append(attrs, "subject", c.id.Subject)
	}
	if c.database != "" {
		attrs = append(attrs, "database", pgerror.Clip(c.database), "level", c.level)
	}
	cfg.Logger.Log(context.Background(), level, "connection refused", attrs...)
}

// identify checks the startup packet, asks for the token and verifies it:
// what every login does, to a database or to the console.
func (c *clientConn) identify(ctx context.Context, sm *pgproto3.StartupMessage) (token string, settings [][2]string, err error) {
	cfg := &c.srv.cfg
	params := sm.Parameters
	user := params["user"]
	if user == "" {
		return "", nil, pgerror.New(pgerror.InvalidAuthorization, "no PostgreSQL user name specified in startup packet").
			WithHint("Set the user to an access level, such as reader.")
	}
	if c.database == "" {
		c.database = params["database"]
	}
	if c.database == "" {
		c.database = user
	}
	if r, ok := params["replication"]; ok && r != "false" && r != "0" && r != "off" && r != "no" {
		return "", nil, pgerror.New(pgerror.FeatureNotSupported, "replication connections are not supported by pgwarden")
	}
	settings, err = startupSettings(params)
	if err != nil {
		return "", nil, err
	}
	if err := c.negotiateProtocol(sm); err != nil {
		return "", nil, err
	}
	if !c.tls && !cfg.AllowCleartextUntrusted && !cfg.trusted(c.raw.RemoteAddr()) {
		return "", nil, pgerror.Newf(pgerror.InvalidAuthorization,
			"pgwarden requires an encrypted connection from %s", hostOf(c.remote)).
			WithHint("Connect with sslmode=require (or verify-full); your token is not sent over an unencrypted connection from an untrusted network.")
	}
	token, err = c.readPassword(cfg.MaxTokenBytes)
	if err != nil {
		return "", nil, err
	}
	id, err := cfg.Verifier.Verify(ctx, token)
	if err != nil {
		return "", nil, err
	}
	c.id = id
	if c.srv.deniedToken(id) {
		return "", nil, errKilled
	}
	if !id.Expiry.IsZero() && !cfg.Now().Before(id.Expiry) {
		// Inside the verifier's leeway for clock skew, but the session
		// would end before its first query, and its credential with it.
		return "", nil, &pgerror.Error{Code: pgerror.InvalidPassword, Message: "token rejected: it has expired",
			Hint: "Send a current token from the configured identity provider as the password.",
			Err:  &authn.TokenError{Reason: authn.ReasonExpired, Err: errors.New("past exp, inside the clock-skew leeway")}}
	}
	return token, settings, nil
}

// authenticate asks for the token, verifies it, decides the level, obtains
// credentials and an upstream session. It returns the client's settings for
// that session.
func (c *clientConn) authenticate(ctx context.Context, sm *pgproto3.StartupMessage) (*pool.Server, [][2]string, error) {
	cfg := &c.srv.cfg
	token, settings, err := c.identify(ctx, sm)
	if err != nil {
		return nil, nil, err
	}
	id, user := c.id, sm.Parameters["user"]
	level, err := c.rc.Authorizer.Decide(id, c.database, user)
	if err != nil {
		return nil, nil, err
	}
	c.level = level
	route, ok := c.rc.Routes[c.database]
	role := route.VaultRoles[level]
	if !ok || role == "" {
		return nil, nil, pgerror.Newf(pgerror.InvalidCatalogName, "database %q has no route for level %q", c.database, level).
			WithHint("pgwarden's configuration grants this level but does not say where it goes; tell its operator.")
	}
	if !c.srv.holdSubject(id.Subject) {
		e := pgerror.Newf(pgerror.TooManyConnections, "too many connections for %q", id.Subject).
			WithDetail(fmt.Sprintf("Each identity may hold %d sessions at once (max_subject_connections).", cfg.MaxSubjectConnections)).
			WithHint("Close a session you no longer use, or share one connection pool in your application.")
		e.Err = errSubjectLimit
		return nil, nil, e
	}
	req := broker.Request{Token: token, TokenExpiry: id.Expiry, Subject: id.Subject, Database: c.database,
		VaultRole: role, Scope: route.Scopes[level], Static: route.Static[level]}
	c.req, c.mode = req, route.Modes[level]
	if c.mode == "" {
		c.mode = PoolSession
	}
	up, err := c.upstream(ctx, req, level)
	if err != nil {
		c.srv.releaseSubject(id.Subject)
		return nil, nil, err
	}
	c.holdsSubject = true // serve releases it when the session ends
	return up, append(settings, identitySettings(id, level)...), nil
}

// upstream gets a credential and lends a session of (database, level) under
// it. When PostgreSQL refuses the credential (28xxx) it was revoked early or a
// session of the shared user changed its password: the credential source
// forgets it, and the client gets a session under a fresh one (once).
func (c *clientConn) upstream(ctx context.Context, req broker.Request, level string) (*pool.Server, error) {
	cfg := &c.srv.cfg
	for attempt := 0; ; attempt++ {
		cred, err := cfg.Credentials.Credential(ctx, req)
		if err != nil {
			return nil, err
		}
		// Held while the session is found or opened, so the broker cannot
		// finish (revoke) the lease under the dial.
		cred.Hold()
		up, err := c.srv.pools.Acquire(ctx, c.database, level, cred)
		cred.Release()
		if err == nil && cred.Stale() && attempt == 0 {
			// It retired or was superseded meanwhile: a session under it
			// would end at once. Take a fresh credential.
			c.srv.pools.Discard(up)
			continue
		}
		var pgErr *pgconn.PgError
		if attempt > 0 || !errors.As(err, &pgErr) || !strings.HasPrefix(pgErr.Code, "28") {
			return up, err
		}
		cfg.Logger.Warn("PostgreSQL refused a credential Vault issued (revoked, or its password changed by a session of it); reading a new one",
			"database", c.database, "level", level, "db_user", cred.Username, "lease_id", cred.LeaseID, "error", err)
		cfg.Credentials.Forget(cred)
	}
}

// negotiateProtocol answers a client that asks for a newer minor version or
// for protocol options: pgwarden speaks 3.0 and no _pq_ options.
func (c *clientConn) negotiateProtocol(sm *pgproto3.StartupMessage) error {
	var opts []string
	for k := range sm.Parameters {
		if strings.HasPrefix(k, "_pq_.") {
			opts = append(opts, k)
		}
	}
	if sm.ProtocolVersion == pgproto3.ProtocolVersion30 && len(opts) == 0 {
		return nil
	}
	buf, err := (&pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0, UnrecognizedOptions: opts}).Encode(nil)
	if err != nil {
		return err
	}
	_, err = c.w.Write(buf)
	return err
}

// readPassword requests a cleartext password and returns it: the token.
func (c *clientConn) readPassword(maxBytes int) (string, error) {
	buf, _ := (&pgproto3.AuthenticationCleartextPassword{}).Encode(nil)
	if _, err := c.w.Write(buf); err != nil {
		return "", err
	}
	if err := c.w.Flush(); err != nil {
		return "", err
	}
	typ, body, _, err := wire.ReadMessage(c.r, nil, maxBytes)
	if err != nil {
		if errors.Is(err, wire.ErrFraming) {
			return "", pgerror.Wrap(err, pgerror.ProtocolViolation, "password packet too large or malformed")
		}
		// A client that hangs up here (psql does, to prompt for a password)
		// gets no answer.
		return "", errAbandoned
	}
	if typ != 'p' {
		return "", pgerror.Newf(pgerror.ProtocolViolation, "expected password response, got message type %q", typ)
	}
	var pm pgproto3.PasswordMessage
	if err := pm.Decode(body); err != nil {
		return "", pgerror.Wrap(err, pgerror.ProtocolViolation, "invalid password packet")
	}
	if pm.Password == "" {
		return "", pgerror.New(pgerror.InvalidPassword, "empty password: send a token from the identity provider as the password")
	}
	return pm.Password, nil
}

// greet applies the client's settings upstream and sends AuthenticationOk,
// the session's parameters, pgwarden's own BackendKeyData and ReadyForQuery.
func (c *clientConn) greet(ctx context.Context, up *pool.Server, settings [][2]string, pid uint32, secret [4]byte) error {
	// The server may come from the pool with another client's settings
	// (checked in without a reset, in either mode): apply sets the client's
	// and resets the rest, so the ParameterStatus below are the client's.
	cs := newClientSettings(c, settings)
	if err := cs.apply(ctx, c, up); err != nil {
		return pool.UpstreamFailure(err) // PostgreSQL's refusal of a setting passes through
	}
	buf, _ := (&pgproto3.AuthenticationOk{}).Encode(nil)
	for k, v := range up.Params {
		buf, _ = (&pgproto3.ParameterStatus{Name: k, Value: v}).Encode(buf)
	}
	buf, _ = (&pgproto3.BackendKeyData{ProcessID: pid, SecretKey: secret[:]}).Encode(buf)
	buf, _ = (&pgproto3.ReadyForQuery{TxStatus: 'I'}).Encode(buf)
	if _, err := c.w.Write(buf); err != nil {
		return err
	}
	return c.w.Flush()
}

// errSubjectLimit marks a refusal by max_subject_connections.
var errSubjectLimit = errors.New("subject connection limit reached")

// authReason maps a refusal to a bounded metric label.
func authReason(err error) string {
	if errors.Is(err, errSubjectLimit) {
		return "subject_limit"
	}
	var te *authn.TokenError
	if errors.As(err, &te) {
		return te.Reason
	}
	if errors.Is(err, errAbandoned) {
		return "abandoned"
	}
	var ve *broker.VaultError
	if errors.As(err, &ve) {
		if ve.Denied() {
			return "vault_denied"
		}
		return "vault_error"
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		if strings.HasPrefix(pgErr.Code, "28") {
			return "upstream_auth" // the database refused the credential itself
		}
		return "upstream_refused" // e.g. a startup setting PostgreSQL rejects
	}
	switch pgerror.Code(err) {
	case pgerror.InvalidCatalogName:
		return "unknown_database"
	case pgerror.InsufficientPrivilege:
		return "no_grant"
	case pgerror.InvalidAuthorization:
		return "refused"
	case pgerror.TooManyConnections:
		return "pool_full"
	case pgerror.ProtocolViolation, pgerror.FeatureNotSupported:
		return "protocol"
	}
	if errors.Is(err, errSilentClose) {
		return "protocol"
	}
	return "upstream"
}

func hostOf(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}
