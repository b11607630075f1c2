package console

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/pgerror"
)

// Backend is what the console reads and acts on; the proxy implements it.
// Its methods may be called from several admin sessions at once.
type Backend interface {
	Pools() []Pool
	Clients() []Client
	Servers() []Server
	Stats() []Stat
	Databases() []Database
	Config() []Setting // already redacted by the provider; console never sees secrets
	Leases() []Lease   // lease ids already truncated by the provider
	Reload(ctx context.Context) error
	Pause(ctx context.Context, database string) error // "" = every database; returns when paused or ctx done
	Resume(database string) error                     // "" = every database
	Kill(clientID uint64) (bool, error)               // false: no such client
	KillSubject(subject string) (int, error)          // how many sessions ended
}

// MaxMessageLen bounds the body of a message the console reads. A console
// command is a few dozen bytes; 64 KiB leaves room for comments and long
// subjects while keeping a client from making the console allocate much.
const MaxMessageLen = 64 << 10

// errExtended answers every extended-protocol message.
var errExtended = pgerror.New(pgerror.FeatureNotSupported,
	"the pgwarden admin console speaks the simple query protocol only; use psql")

// Serve answers one authenticated admin session: it reads messages from r and writes
// replies to w (the caller has already sent the greeting ending with ReadyForQuery),
// until the client sends Terminate, the connection fails, or ctx is done.
// who is the admin's subject, for the log.
//
// Serve returns nil after Terminate, ctx.Err() when ctx ends (reads and
// writes are interrupted only when r and w have deadlines, as a net.Conn
// does; otherwise between messages), and otherwise the read, write or
// framing error; the caller then closes the connection. A message the
// console cannot take in this phase (a password, say) gets a FATAL 08P01
// first. Serve never closes r or w; a deadline it set to interrupt them is
// cleared before it returns. log may be nil.
func Serve(ctx context.Context, r io.Reader, w io.Writer, b Backend, who string, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	stop := interrupt(ctx, r, w)
	defer stop()
	be := pgproto3.NewBackend(r, w)
	be.SetMaxBodyLen(MaxMessageLen)
	s := &session{be: be, b: b, log: log.With("subject", who)}
	err := s.loop(ctx)
	if ctx.Err() != nil && err != nil {
		return ctx.Err()
	}
	return err
}

// session is one admin connection; it is used by Serve's goroutine only.
type session struct {
	be       *pgproto3.Backend
	b        Backend
	log      *slog.Logger
	skipping bool // an extended-protocol error was sent: discard until Sync
	pending  bool // messages wait in be's buffer
}

func (s *session) loop(ctx context.Context) error {
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		msg, err := s.be.Receive()
		if err != nil {
			return fmt.Errorf("console: read: %w", err)
		}
		done, err := s.handle(ctx, msg)
		if err == nil && s.pending {
			s.pending = false
			if ferr := s.be.Flush(); ferr != nil {
				err = fmt.Errorf("console: write: %w", ferr)
			}
		}
		if done || err != nil {
			return err
		}
	}
}

// handle answers one message. done is true after Terminate.
//
// Flow control follows PostgreSQL's postgres.c: after an error in an
// extended-protocol message the server discards everything up to Sync and
// answers the Sync with ReadyForQuery; a lone Sync gets ReadyForQuery and a
// Flush is harmless; FunctionCall is not part of the extended protocol, so
// its error is followed by ReadyForQuery at once; copy messages outside COPY
// are ignored. Terminate is honoured even while discarding.
func (s *session) handle(ctx context.Context, msg pgproto3.FrontendMessage) (done bool, err error) {
	switch m := msg.(type) {
	case *pgproto3.Terminate:
		return true, nil
	case *pgproto3.Sync:
		s.skipping = false
		s.ready()
	case *pgproto3.Flush, *pgproto3.CopyData, *pgproto3.CopyDone, *pgproto3.CopyFail:
	case *pgproto3.Parse, *pgproto3.Bind, *pgproto3.Describe, *pgproto3.Execute, *pgproto3.Close:
		if !s.skipping {
			s.skipping = true
			s.log.Info("admin console refused the extended protocol")
			s.send(errorResponse("ERROR", errExtended))
		}
	case *pgproto3.FunctionCall:
		if !s.skipping {
			s.send(errorResponse("ERROR", errExtended))
			s.ready()
		}
	case *pgproto3.Query:
		if !s.skipping {
			s.query(ctx, m.String)
			s.ready()
		}
	default:
		err := pgerror.Newf(pgerror.ProtocolViolation, "unexpected message %T in the admin console", msg)
		s.send(errorResponse("FATAL", err))
		if ferr := s.be.Flush(); ferr != nil {
			return false, errors.Join(err, ferr)
		}
		return false, err
	}
	return false, nil
}

func (s *session) send(msg pgproto3.BackendMessage) {
	s.be.Send(msg)
	s.pending = true
}

func (s *session) ready() { s.send(&pgproto3.ReadyForQuery{TxStatus: 'I'}) }

// query runs one Query message's statement; the caller sends ReadyForQuery.
func (s *session) query(ctx context.Context, sql string) {
	c, err := parse(sql)
	switch {
	case errors.Is(err, errEmpty):
		s.send(&pgproto3.EmptyQueryResponse{})
		return
	case err != nil:
		s.log.Info("admin command refused", "error", err)
		s.send(errorResponse("ERROR", err))
		return
	}
	s.log.Info("admin command", c.logAttrs()...)
	if err := s.run(ctx, c); err != nil {
		s.log.Warn("admin command failed", "command", c.verb(), "error", err)
		s.send(errorResponse("ERROR", err))
	}
}

// logAttrs names the command and its target; never a SHOW's output.
func (c command) logAttrs() []any {
	attrs := []any{"command", c.verb()}
	switch c.op {
	case opShow:
		attrs = append(attrs, "view", c.view)
	case opPause, opResume:
		attrs = append(attrs, "database", pgerror.Clip(c.database))
	case opKill:
		attrs = append(attrs, "client", c.client)
	case opKillSubject:
		attrs = append(attrs, "target_subject", pgerror.Clip(c.subject))
	}
	return attrs
}

func (s *session) run(ctx context.Context, c command) error {
	switch c.op {
	case opShow:
		return s.show(c.view)
	case opReload:
		return s.done(c, s.b.Reload(ctx))
	case opPause:
		return s.done(c, s.b.Pause(ctx, c.database))
	case opResume:
		return s.done(c, s.b.Resume(c.database))
	case opKill:
		return s.kill(c)
	case opKillSubject:
		return s.killSubject(c)
	}
	return fmt.Errorf("console: command %d not handled", c.op)
}

// done answers a successful action with its command word, as PgBouncer does.
func (s *session) done(c command, err error) error {
	if err == nil {
		s.send(&pgproto3.CommandComplete{CommandTag: []byte(c.verb())})
	}
	return err
}

func (s *session) kill(c command) error {
	found, err := s.b.Kill(c.client)
	if err == nil && !found {
		err = pgerror.Newf(undefinedObject, "no such client: %d", c.client).
			WithHint("SHOW CLIENTS lists the clients; KILL takes the id column.")
	}
	return s.done(c, err)
}

func (s *session) killSubject(c command) error {
	n, err := s.b.KillSubject(c.subject)
	if err != nil {
		return err
	}
	s.send(&pgproto3.NoticeResponse{
		Severity: "NOTICE", SeverityUnlocalized: "NOTICE", Code: pgerror.SuccessfulCompletion,
		Message: fmt.Sprintf("ended %d session(s) of subject %q", n, pgerror.Clip(c.subject)),
	})
	return s.done(c, nil)
}

func (s *session) show(view string) error {
	switch view {
	case "pools":
		sendTable(s, s.b.Pools())
	case "clients":
		sendTable(s, s.b.Clients())
	case "servers":
		sendTable(s, s.b.Servers())
	case "stats":
		sendTable(s, s.b.Stats())
	case "databases":
		sendTable(s, s.b.Databases())
	case "config":
		sendTable(s, s.b.Config())
	case "leases":
		sendTable(s, s.b.Leases())
	case "help":
		// PgBouncer answers SHOW HELP with a notice, not rows.
		s.send(&pgproto3.NoticeResponse{
			Severity: "NOTICE", SeverityUnlocalized: "NOTICE", Code: pgerror.SuccessfulCompletion,
			Message: "Console usage", Detail: helpDetail,
		})
	default:
		return fmt.Errorf("console: view %q not handled", view)
	}
	s.send(&pgproto3.CommandComplete{CommandTag: []byte("SHOW")})
	return nil
}

const helpDetail = `
	SHOW POOLS|CLIENTS|SERVERS|STATS|DATABASES|CONFIG|LEASES|HELP
	RELOAD
	PAUSE [db]
	RESUME [db]
	KILL <client id>
	KILL SUBJECT '<subject>'`

// row is a row type that lists its cells.
type row interface{ cells() []cell }

// sendTable sends RowDescription and one DataRow per row. The header comes
// from R's zero value, so an empty answer still names its columns.
func sendTable[R row](s *session, rows []R) {
	var zero R
	head := zero.cells()
	fields := make([]pgproto3.FieldDescription, len(head))
	for i, c := range head {
		fields[i] = pgproto3.FieldDescription{
			Name: []byte(c.name), DataTypeOID: c.oid, DataTypeSize: typeSize(c.oid),
			TypeModifier: -1, Format: pgproto3.TextFormat,
		}
	}
	s.send(&pgproto3.RowDescription{Fields: fields})
	for _, r := range rows {
		cells := r.cells()
		values := make([][]byte, len(cells))
		for i, c := range cells {
			values[i] = c.val
		}
		s.send(&pgproto3.DataRow{Values: values})
	}
}

// typeSize is pg_type.typlen: 8 for int8, -1 (variable) for text.
func typeSize(oid uint32) int16 {
	if oid == int8OID {
		return 8
	}
	return -1
}

// errorResponse is pgerror.Response.
func errorResponse(severity string, err error) *pgproto3.ErrorResponse {
	return pgerror.Response(severity, err)
}

// interrupt makes blocked reads of r and writes to w return when ctx ends,
// for those that have deadlines (a net.Conn has both). The returned func
// stops watching and clears a deadline it set, so the caller can still use
// the connection (to send a FATAL, say). It mirrors pgconn's
// DeadlineContextWatcherHandler.
func interrupt(ctx context.Context, r io.Reader, w io.Writer) (stop func()) {
	rd, _ := r.(interface{ SetReadDeadline(time.Time) error })
	wd, _ := w.(interface{ SetWriteDeadline(time.Time) error })
	if rd == nil && wd == nil {
		return func() {}
	}
	set := func(t time.Time) {
		if rd != nil {
			_ = rd.SetReadDeadline(t)
		}
		if wd != nil {
			_ = wd.SetWriteDeadline(t)
		}
	}
	fired := make(chan struct{})
	unwatch := context.AfterFunc(ctx, func() {
		set(time.Unix(1, 0))
		close(fired)
	})
	return func() {
		if !unwatch() {
			<-fired
			set(time.Time{})
		}
	}
}
