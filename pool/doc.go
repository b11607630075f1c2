// Package pool owns pgwarden's upstream PostgreSQL sessions: it opens them
// (pgconn, which does SCRAM and TLS, then Hijack), lends them, takes them
// back, resets them, bounds them and closes them. It speaks Frontend to
// PostgreSQL only for its own statements (DISCARD ALL, set_config, the
// liveness ping, role settings); a client's traffic is relayed by package
// proxy over the Server's buffered socket, framed by package wire.
//
// What it owns:
//
//   - Set: one pool per (database, access level), limits per pool and in
//     total (Config, replaced whole by RELOAD), a wait queue served in
//     order with a timeout, PAUSE/RESUME per database, and a reaper that
//     closes idle sessions past IdleTimeout or whose credential retires.
//   - Server: one upstream session — its socket, backend key, reported
//     parameters, the credential it logged in under, and in transaction
//     mode what pgwarden set on it and the statements prepared on it
//     (StmtCache).
//   - StmtRegistry: the statements clients prepared in transaction mode,
//     each under a server-side name never reused (see prepared.go).
//   - The upstream connection-string policy (ParseUpstream): verify-full TLS
//     off loopback unless allowed, SCRAM-SHA-256 only.
//   - Role-level settings of a shared database user: the first session
//     under a user records them; a later one that finds them changed
//     restores them and is replaced (see rolesettings.go).
//
// Who owns a Server, and when. The Set owns every Server from dial to close.
// A client borrows one with Set.Acquire — only one opened under the very
// credential it asks with, so one person's lease never serves another — and
// holds it until it gives it back: Release (DISCARD ALL, then idle: the end
// of a session-mode session), Checkin (idle as it is, optionally reset: the
// end of a transaction in transaction mode) or Discard (closed: a session
// ended mid-transaction, broken or of unknown state). In session mode a
// client holds its Server from its first message to its disconnect; in
// transaction mode from the first message of a transaction to the
// ReadyForQuery 'I' that ends it. While lent, only the borrower's
// goroutines touch the Server (one reads R, one writes W); while idle only
// the Set does, under its lock. A borrower may Close a Server to unblock
// its own goroutines when it ends a session, but only the Set lets go of a
// Server and its slot, when the Server is given back. A credential's lease
// is package broker's: a Server holds its credential (Credential.Hold at
// dial, Release at close), and the Set never lends one, nor keeps one idle,
// once the credential is stale; an idle Server is checked before it is lent
// (PostgreSQL may have ended it, the network gone silent, or its role been
// dropped).
//
// How the others learn a Server ended. The Set does not call back into its
// borrowers. A borrower learns of its Server's end from the Server itself —
// a read or write on R or W fails, or a FATAL ErrorResponse arrives — and
// of its credential's retirement and end from package broker
// (Credential.OnRetire, OnEnd); then it gives the Server back. The Set
// learns of a Server's end when it is given back (or when the reaper or a
// liveness check finds it dead while idle), and forgets it: Stats and
// Servers stop showing it.
//
// It imports broker's credential type, pgerror for SQLSTATEs, and wire; never
// proxy or console.
package pool
