// Package proxy is pgwarden's client side: it speaks Backend to clients and
// Frontend to PostgreSQL, over upstream sessions it borrows from package
// pool. It accepts a connection, negotiates TLS, asks for a
// cleartext password — the client's token — and hands it to a
// TokenVerifier, an Authorizer and a CredentialSource (interfaces declared
// here; authn and broker implement them). It then takes an upstream session
// from the pool for (database, access level), greets the client and relays
// frames until either side ends.
//
// Its neighbours: package pool owns the upstream sessions (pool.Server:
// opening them with pgconn, lending them, resetting them, prepared
// statements per server, limits and the wait queue, cancel requests to the
// postmaster, the upstream connection-string policy); package
// Package wire has the framing and socket plumbing both sides use (the
// frame copier, the write deadline, raw socket I/O). proxy imports both;
// neither imports proxy.
//
//	client                 pgwarden                      Vault              PostgreSQL
//	  |-- SSLRequest -------->|                             |                    |
//	  |<-------- 'S' ---------|  (bytes sent behind the     |                    |
//	  |== TLS handshake ======|   request: connection closed)                    |
//	  |-- StartupMessage ---->|  user = access level, database                   |
//	  |<- AuthCleartextPwd ---|  only over TLS, a unix socket or a trusted net   |
//	  |-- Password(JWT) ----->|  verify: JWKS signature, alg allow-list,         |
//	  |                       |          iss, aud, exp, nbf; grants -> level     |
//	  |                       |-- login(jwt, role) -------->|  (cached per token)|
//	  |                       |<------- Vault token --------|                    |
//	  |                       |-- read creds/<role> ------->|  (shared per role, |
//	  |                       |<-- user, password, lease ---|   one call at once)|
//	  |                       |-- pool: idle session, or pgconn connect -------->|
//	  |                       |<------------------ SCRAM, ReadyForQuery ---------|
//	  |                       |-- set_config(client settings) ------------------>|
//	  |<- AuthenticationOk ---|                                                  |
//	  |<- ParameterStatus* ---|                                                  |
//	  |<- BackendKeyData -----|  pgwarden's own key, mapped to the backend's     |
//	  |<- ReadyForQuery ------|                                                  |
//	  |== frames, relayed as raw bytes; only ReadyForQuery's status is read =====|
//	  |-- Terminate --------->|  idle: DISCARD ALL, back to the pool;            |
//	  |                       |  in a transaction or broken: closed              |
//
// Refusals are ErrorResponses with severity FATAL and a SQLSTATE, built in one
// place (errorResponse) from the *pgerror.Error or *pgconn.PgError in the
// error chain; malformed framing before the startup packet completes is
// closed without a word, as PostgreSQL does. The authentication timeout is one
// deadline from accept to AuthenticationOk.
//
// Who owns what. A client connection is owned by its serve goroutine, which
// reads and writes it until the relay starts, waits for the relay and closes
// it; anything else may only kill it (close the socket). In transaction mode
// an idle plain-socket client parks (txnSession.park): its goroutine ends and
// the Server's wire.Parker owns the connection until it is readable or
// nudged (a timer, a lease cut, KILL, shutdown), then runs it again in a new
// goroutine, which from then on owns it and ends it (clientConn.close). An upstream session
// is owned by the pool (pool.Set): it opens it, lends it to one client at a
// time (Acquire), takes it back (Release resets it with DISCARD ALL; Checkin
// keeps it as it is, in transaction mode; Discard closes it) and reaps it
// when idle too long or when its credential retires. The relay may close a
// session it is ending (pool.Server.Close, to unblock its other goroutine),
// but only the pool lets go of the session and its slot, when the relay
// gives it back. While lent, the relay's two goroutines use it — the
// client-to-server one writes it, the server-to-client one reads it — and the
// client's cancel target points at it; the client gives it back only after a
// cancel in flight has landed. A credential's lease is the broker's: the
// pool says which sessions hold it (Credential.Hold at dial, Release at
// close), and the relay learns of its retirement and end from the broker
// (OnRetire, OnEnd); it keeps no timer of its own for a lease. The client's
// token is the client's: the relay times its NOTICE, its end at an idle
// point after exp, and its cut after the grace.
//
// The relay never loses its place in a message. The server-to-client side is
// interrupted only by a read deadline on the upstream, after a flag that says
// why (the client side ended, the credential retires, its lease ended); the
// frame copier resumes a message the deadline caught half-copied. pgwarden
// adds a message of its own to the client's stream (FATAL 57P01 or 08006) only
// when that stream is between messages. Every write to either side is bounded
// by WriteTimeout, so a peer that stops reading frees what its session holds.
// On plain sockets the reads and writes are made as raw system calls
// (wire.WithRawIO): a relay sits idle between every two messages, and the first
// ordinary system call after an idle moment wakes the Go runtime's monitor
// thread, two context switches per round trip. The steady state allocates
// nothing per message (wire's TestCopyFrameDoesNotAllocate and
// TestRawIODoesNotAllocate).
//
// An upstream session never outlives its credential: when the credential
// retires the client gets FATAL 57P01 at its next idle point, at its lease's
// end the session is ended, and idle pooled sessions are closed before either
// (a static role's credential retires at each rotation of its password but
// never ends: open sessions are not touched). A session is lent only under
// the very credential the client's request returned, so one person's lease
// (identity scope) never serves another. Vault drops a role when its lease
// ends, and a session of a dropped role still answers `select 1` while
// failing every privilege check; liveness is checked before an idle session
// is lent — PostgreSQL may have ended it (restart, pg_terminate_backend,
// idle_session_timeout), the network may have gone silent, or its role may
// be gone (a lease revoked behind pgwarden's back): the ping of a session
// idle longer than PingAfterIdle asks whether its role still exists.
//
// Pool modes. In session mode (relay.go) a client holds an upstream session
// from its first message until it leaves; the login borrows one only to
// check the credential and greet, and gives it back (clientSettings.apply
// makes a server the client's, whoever held it before). In transaction mode (txn.go) it holds a
// session only from the first message of a transaction to the
// ReadyForQuery that ends it: the login's session goes back to the pool
// after the greeting, and each transaction attaches one, with the client's
// settings and identity applied where the server's differ; named prepared
// statements are carried across (txn.go rewrites the messages; the
// statements and each server's cache are pool's, see pool/prepared.go),
// and SQL that would change
// session state marks its server for a reset (sqlscan.go). In both modes
// pgwarden sets the client's identity (pgwarden.subject, .groups, .issuer,
// .level) on the server for row-level security, and refuses SQL that would
// forge it (identity.go).
//
// The admin console (admin.go) is the virtual database "pgwarden": a login
// like any other, then a check that the token's groups include a console
// group, then package console answers the commands over admin, the
// read-only views (and the few actions: PAUSE, RESUME, KILL, RELOAD) this
// package exposes.
package proxy
