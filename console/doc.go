// Package console is pgwarden's admin database: the virtual database
// "pgwarden" that psql (or pgbouncer_exporter-style tooling) connects to.
// The proxy authenticates the client, checks the admin grant, sends the
// greeting and hands the connection to Serve; the console reads and acts on
// the proxy only through the Backend interface declared here, and imports
// nothing of the proxy's. Data the Backend returns is already safe to show:
// settings redacted, lease ids truncated.
//
// # Protocol
//
// The console speaks the simple query protocol, as PgBouncer's does. One
// Query holds one command: keywords are case-insensitive, whitespace,
// comments and trailing semicolons are ignored. A Query holding several
// commands ("SHOW POOLS; RELOAD") is refused as a whole with 0A000 and
// nothing of it runs, so a batch of actions never half-happens. An empty
// Query gets EmptyQueryResponse. An unknown command gets 42601 with a hint
// listing the commands; the session goes on. Parse, Bind, Describe, Execute
// and Close get 0A000 ("speaks the simple query protocol only; use psql"),
// then everything up to Sync is discarded and the Sync gets ReadyForQuery, as
// PostgreSQL does after an extended-protocol error; a lone Sync gets
// ReadyForQuery and Flush does nothing; FunctionCall gets 0A000 and
// ReadyForQuery. A Backend error becomes an ErrorResponse with the SQLSTATE
// of the *pgerror.Error (or PostgreSQL error) in its chain, else XX000 with a
// generic message. Each command is logged at info with the admin's subject,
// the command word and its target (database, client id, subject), never a
// SHOW's output.
//
// SHOW answers have text (OID 25) and int8 (OID 20) columns in text format
// and the command tag SHOW. Columns named as in PgBouncer mean what they mean
// there; pgwarden's own columns come last in a row. "user" is the access
// level (reader, writer, admin...). Times are "2006-01-02 15:04:05 UTC";
// durations are microseconds unless a column says seconds; an absent value
// is NULL.
//
// # Commands
//
// SHOW POOLS — one row per pool (database, level, credential):
// database, user, cl_active (clients holding a server or idle), cl_waiting
// (clients queued for a server), sv_active (servers lent), sv_idle (ready),
// sv_used (being reset), sv_login (being opened), maxwait (seconds the oldest
// waiting client has waited), maxwait_us (its microsecond part), pool_mode
// (session or transaction); pgwarden: db_user (PostgreSQL role of the pool's
// credential).
//
// SHOW CLIENTS — one row per client connection: type (C), user, database,
// state (active, idle, waiting), addr, port, local_addr, local_port,
// connect_time, request_time, wait and wait_us (current wait for a server),
// close_needed (always 0), ptr (the client id), link (id of the server it
// holds), remote_pid (peer's OS pid over a unix socket, else 0), tls,
// application_name; pgwarden: id (what KILL takes), subject (the token's),
// backend_pid (PostgreSQL pid of the server it holds, 0 if none).
//
// SHOW SERVERS — one row per connection to PostgreSQL: type (S), user,
// database, state (active, idle, used, new), addr, port, local_addr,
// local_port, connect_time, request_time, wait and wait_us (always 0),
// close_needed (1: its credential retires, it closes when released), ptr
// (the server id), link (id of the client it is lent to), remote_pid
// (PostgreSQL backend pid), tls, application_name; pgwarden: id, db_user
// (PostgreSQL role), lease (Vault lease id, truncated).
//
// SHOW STATS — one row per database: database, total_xact_count,
// total_query_count, total_received, total_sent (bytes), total_xact_time,
// total_query_time, total_wait_time (µs since start); avg_xact_count,
// avg_query_count (per second), avg_recv, avg_sent (bytes per second),
// avg_xact_time, avg_query_time, avg_wait_time (µs), averaged since start.
// pgwarden counts a session's queries and bytes when it ends, and the times
// for clients in transaction mode, as each transaction ends.
//
// SHOW DATABASES — one row per database clients may ask for: name, host,
// port, database (name upstream), pool_size, pool_mode, max_connections
// (0: no limit), current_connections, paused, disabled (0/1); pgwarden:
// levels (access levels granted on it, comma-separated).
//
// SHOW CONFIG — key, value, default, changeable (yes: RELOAD applies it).
// Secrets never reach the console.
//
// SHOW LEASES (pgwarden's own) — one row per Vault credential lease:
// database, level, db_user (the role Vault created), lease_id (truncated),
// scope (identity: one subject's; role: shared), state, expires, retire_at
// (when new sessions stop using it; NULL: not scheduled), sessions (server
// connections using it), subject (owner in identity scope, else NULL).
//
// SHOW HELP — a NOTICE listing the commands, as in PgBouncer.
//
// RELOAD — re-reads the configuration (Backend.Reload); tag RELOAD.
//
// PAUSE [db] — pauses the database, or every database, and answers once
// Backend.Pause says it is paused; tag PAUSE. A name
// with characters other than letters, digits, _ and $ is double-quoted
// ("my-db"); a bare name is taken as written, case included.
//
// RESUME [db] — undoes PAUSE (Backend.Resume); tag RESUME.
//
// KILL <client id> — ends the client connection with that id (SHOW
// CLIENTS, column id) and its server session; tag KILL, or 42704 when there
// is no such client. KILL_CLIENT <id> (PgBouncer's spelling) is the same.
// PgBouncer's KILL <db> is not supported.
//
// KILL SUBJECT '<subject>' — ends every session of that token subject; a
// standard SQL string literal (a quote inside is doubled, a backslash is literal); tag KILL
// and a NOTICE saying how many sessions ended.
package console
