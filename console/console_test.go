package console

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/pgerror"
)

// fakeBackend serves fixed rows and records the actions asked of it.
type fakeBackend struct {
	pools     []Pool
	clients   []Client
	servers   []Server
	stats     []Stat
	databases []Database
	config    []Setting
	leases    []Lease

	err      error // returned by every action
	found    bool  // Kill's answer
	sessions int   // KillSubject's answer

	mu    sync.Mutex
	calls []string // guarded by mu
}

var _ Backend = (*fakeBackend)(nil)

func (f *fakeBackend) record(call string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, call)
}

func (f *fakeBackend) called() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func (f *fakeBackend) Pools() []Pool         { return f.pools }
func (f *fakeBackend) Clients() []Client     { return f.clients }
func (f *fakeBackend) Servers() []Server     { return f.servers }
func (f *fakeBackend) Stats() []Stat         { return f.stats }
func (f *fakeBackend) Databases() []Database { return f.databases }
func (f *fakeBackend) Config() []Setting     { return f.config }
func (f *fakeBackend) Leases() []Lease       { return f.leases }

func (f *fakeBackend) Reload(context.Context) error { f.record("Reload"); return f.err }

func (f *fakeBackend) Pause(_ context.Context, db string) error {
	f.record("Pause(" + db + ")")
	return f.err
}

func (f *fakeBackend) Resume(db string) error { f.record("Resume(" + db + ")"); return f.err }

func (f *fakeBackend) Kill(id uint64) (bool, error) {
	f.record(fmt.Sprintf("Kill(%d)", id))
	return f.found, f.err
}

func (f *fakeBackend) KillSubject(sub string) (int, error) {
	f.record("KillSubject(" + sub + ")")
	return f.sessions, f.err
}

// null stands for SQL NULL in a result's rows.
const null = "<NULL>"

// result is what the console answered to one query, copied out of the
// Frontend's reused messages.
type result struct {
	kinds   []string // message types in order
	cols    []string
	oids    []uint32
	rows    [][]string
	tag     string
	err     pgproto3.ErrorResponse
	notices []pgproto3.NoticeResponse
	status  byte // ReadyForQuery's
}

// peer is the client end of a Serve running over net.Pipe.
type peer struct {
	t    *testing.T
	fe   *pgproto3.Frontend
	conn net.Conn
	done chan error
}

func start(t *testing.T, b Backend) *peer {
	return startWith(t, context.Background(), b, nil)
}

func startWith(t *testing.T, ctx context.Context, b Backend, log *slog.Logger) *peer {
	t.Helper()
	client, server := net.Pipe()
	p := &peer{t: t, fe: pgproto3.NewFrontend(client, client), conn: client, done: make(chan error, 1)}
	go func() { p.done <- Serve(ctx, server, server, b, "admin@example.org", log) }()
	if err := client.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return p
}

func (p *peer) send(msgs ...pgproto3.FrontendMessage) {
	p.t.Helper()
	for _, m := range msgs {
		p.fe.Send(m)
	}
	if err := p.fe.Flush(); err != nil {
		p.t.Fatalf("send: %v", err)
	}
}

// read collects messages up to and including ReadyForQuery.
func (p *peer) read() result {
	p.t.Helper()
	var r result
	for {
		msg, err := p.fe.Receive()
		if err != nil {
			p.t.Fatalf("receive: %v (so far %v)", err, r.kinds)
		}
		r.kinds = append(r.kinds, strings.TrimPrefix(fmt.Sprintf("%T", msg), "*pgproto3."))
		switch m := msg.(type) {
		case *pgproto3.RowDescription:
			for _, f := range m.Fields {
				r.cols = append(r.cols, string(f.Name))
				r.oids = append(r.oids, f.DataTypeOID)
			}
		case *pgproto3.DataRow:
			row := make([]string, len(m.Values))
			for i, v := range m.Values {
				row[i] = null
				if v != nil {
					row[i] = string(v)
				}
			}
			r.rows = append(r.rows, row)
		case *pgproto3.CommandComplete:
			r.tag = string(m.CommandTag)
		case *pgproto3.ErrorResponse:
			r.err = *m
		case *pgproto3.NoticeResponse:
			r.notices = append(r.notices, *m)
		case *pgproto3.ReadyForQuery:
			r.status = m.TxStatus
			return r
		}
	}
}

func (p *peer) query(sql string) result {
	p.t.Helper()
	p.send(&pgproto3.Query{String: sql})
	return p.read()
}

// terminate ends the session and checks that Serve returned nil.
func (p *peer) terminate() {
	p.t.Helper()
	p.send(&pgproto3.Terminate{})
	if err := p.wait(); err != nil {
		p.t.Fatalf("Serve after Terminate = %v, want nil", err)
	}
}

func (p *peer) wait() error {
	p.t.Helper()
	select {
	case err := <-p.done:
		return err
	case <-time.After(10 * time.Second):
		p.t.Fatal("Serve did not return")
		return nil
	}
}

var (
	t0 = time.Date(2025, 3, 4, 5, 6, 7, 0, time.UTC)
	t1 = t0.Add(90 * time.Second)
)

func populated() *fakeBackend {
	return &fakeBackend{
		pools: []Pool{{
			Database: "app", User: "reader", ClActive: 3, ClWaiting: 1, SvActive: 2, SvIdle: 4,
			SvUsed: 1, SvLogin: 1, MaxWait: 2*time.Second + 1500*time.Microsecond,
			PoolMode: "transaction", DBUser: "v-jwt-reader-abc",
		}},
		clients: []Client{{
			ID: 7, User: "writer", Database: "app", State: "active", Addr: "10.0.0.5", Port: 51234,
			LocalAddr: "10.0.0.1", LocalPort: 6432, ConnectTime: t0, Wait: 0, Link: 12,
			TLS: "TLSv1.3/TLS_AES_128_GCM_SHA256", ApplicationName: "psql", Subject: "alice",
			BackendPID: 4242,
		}},
		servers: []Server{{
			ID: 12, User: "writer", Database: "app", State: "active", Addr: "127.0.0.1", Port: 5432,
			LocalAddr: "127.0.0.1", LocalPort: 40000, ConnectTime: t0, RequestTime: t1,
			CloseNeeded: true, Link: 7, RemotePID: 4242, ApplicationName: "psql",
			DBUser: "v-jwt-writer-xyz", Lease: "database/creds/writer/AbC…",
		}},
		stats: []Stat{{
			Database: "app", TotalXactCount: 10, TotalQueryCount: 20, TotalReceived: 300, TotalSent: 4000,
			TotalXactTime: 5 * time.Millisecond, TotalQueryTime: 4 * time.Millisecond, TotalWaitTime: time.Microsecond,
			AvgXactCount: 1, AvgQueryCount: 2, AvgRecv: 30, AvgSent: 400,
			AvgXactTime: 500 * time.Microsecond, AvgQueryTime: 200 * time.Microsecond, AvgWaitTime: 0,
		}},
		databases: []Database{{
			Name: "app", Host: "db.internal", Port: 5432, DBName: "app_prod", PoolSize: 20,
			PoolMode: "session", MaxConnections: 100, CurrentConnections: 6, Paused: true,
			Levels: []string{"reader", "writer"},
		}},
		config: []Setting{
			{Key: "listen_addr", Value: "0.0.0.0:6432", Default: "127.0.0.1:6432"},
			{Key: "pool_size", Value: "20", Default: "10", Changeable: true},
		},
		leases: []Lease{
			{Database: "app", Level: "reader", DBUser: "v-jwt-reader-abc", LeaseID: "database/creds/reader/x1…",
				Scope: "identity", State: "active", Expires: t1, Sessions: 2, Subject: "alice"},
			{Database: "app", Level: "writer", DBUser: "v-writer-def", LeaseID: "database/creds/writer/y2…",
				Scope: "role", State: "retiring", Expires: t1, RetireAt: t0, Sessions: 0},
		},
	}
}

func TestShowAnswersEachViewWithPgBouncerColumns(t *testing.T) {
	t.Parallel()
	const i8, tx = int8OID, textOID
	tests := []struct {
		query string
		cols  []string
		oids  []uint32
		rows  [][]string
	}{
		{
			query: "SHOW POOLS",
			cols: []string{"database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle",
				"sv_used", "sv_login", "maxwait", "maxwait_us", "pool_mode", "db_user"},
			oids: []uint32{tx, tx, i8, i8, i8, i8, i8, i8, i8, i8, tx, tx},
			rows: [][]string{{"app", "reader", "3", "1", "2", "4", "1", "1", "2", "1500", "transaction", "v-jwt-reader-abc"}},
		},
		{
			query: "show clients;",
			cols: []string{"type", "user", "database", "state", "addr", "port", "local_addr", "local_port",
				"connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr", "link",
				"remote_pid", "tls", "application_name", "id", "subject", "backend_pid"},
			oids: []uint32{tx, tx, tx, tx, tx, i8, tx, i8, tx, tx, i8, i8, i8, tx, tx, i8, tx, tx, i8, tx, i8},
			rows: [][]string{{"C", "writer", "app", "active", "10.0.0.5", "51234", "10.0.0.1", "6432",
				"2025-03-04 05:06:07 UTC", null, "0", "0", "0", "7", "12", "0",
				"TLSv1.3/TLS_AES_128_GCM_SHA256", "psql", "7", "alice", "4242"}},
		},
		{
			query: "  Show Servers ; ",
			cols: []string{"type", "user", "database", "state", "addr", "port", "local_addr", "local_port",
				"connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr", "link",
				"remote_pid", "tls", "application_name", "id", "db_user", "lease"},
			oids: []uint32{tx, tx, tx, tx, tx, i8, tx, i8, tx, tx, i8, i8, i8, tx, tx, i8, tx, tx, i8, tx, tx},
			rows: [][]string{{"S", "writer", "app", "active", "127.0.0.1", "5432", "127.0.0.1", "40000",
				"2025-03-04 05:06:07 UTC", "2025-03-04 05:07:37 UTC", "0", "0", "1", "12", "7", "4242",
				"", "psql", "12", "v-jwt-writer-xyz", "database/creds/writer/AbC…"}},
		},
		{
			query: "SHOW STATS",
			cols: []string{"database", "total_xact_count", "total_query_count", "total_received", "total_sent",
				"total_xact_time", "total_query_time", "total_wait_time", "avg_xact_count", "avg_query_count",
				"avg_recv", "avg_sent", "avg_xact_time", "avg_query_time", "avg_wait_time"},
			oids: []uint32{tx, i8, i8, i8, i8, i8, i8, i8, i8, i8, i8, i8, i8, i8, i8},
			rows: [][]string{{"app", "10", "20", "300", "4000", "5000", "4000", "1", "1", "2", "30", "400", "500", "200", "0"}},
		},
		{
			query: "SHOW DATABASES",
			cols: []string{"name", "host", "port", "database", "pool_size", "pool_mode", "max_connections",
				"current_connections", "paused", "disabled", "levels"},
			oids: []uint32{tx, tx, i8, tx, i8, tx, i8, i8, i8, i8, tx},
			rows: [][]string{{"app", "db.internal", "5432", "app_prod", "20", "session", "100", "6", "1", "0", "reader,writer"}},
		},
		{
			query: "SHOW CONFIG",
			cols:  []string{"key", "value", "default", "changeable"},
			oids:  []uint32{tx, tx, tx, tx},
			rows: [][]string{
				{"listen_addr", "0.0.0.0:6432", "127.0.0.1:6432", "no"},
				{"pool_size", "20", "10", "yes"},
			},
		},
		{
			query: "SHOW LEASES",
			cols: []string{"database", "level", "db_user", "lease_id", "scope", "state", "expires",
				"retire_at", "sessions", "subject"},
			oids: []uint32{tx, tx, tx, tx, tx, tx, tx, tx, i8, tx},
			rows: [][]string{
				{"app", "reader", "v-jwt-reader-abc", "database/creds/reader/x1…", "identity", "active",
					"2025-03-04 05:07:37 UTC", null, "2", "alice"},
				{"app", "writer", "v-writer-def", "database/creds/writer/y2…", "role", "retiring",
					"2025-03-04 05:07:37 UTC", "2025-03-04 05:06:07 UTC", "0", null},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.query, func(t *testing.T) {
			t.Parallel()
			p := start(t, populated())
			got := p.query(tt.query)
			if got.err.Code != "" {
				t.Fatalf("error %s: %s", got.err.Code, got.err.Message)
			}
			if !slices.Equal(got.cols, tt.cols) {
				t.Errorf("columns\n got %q\nwant %q", got.cols, tt.cols)
			}
			if !slices.Equal(got.oids, tt.oids) {
				t.Errorf("types\n got %v\nwant %v", got.oids, tt.oids)
			}
			if !slices.EqualFunc(got.rows, tt.rows, slices.Equal) {
				t.Errorf("rows\n got %q\nwant %q", got.rows, tt.rows)
			}
			if got.tag != "SHOW" || got.status != 'I' {
				t.Errorf("tag %q status %q, want SHOW and I", got.tag, got.status)
			}
			p.terminate()
		})
	}
}

func TestShowWithNoRowsStillNamesColumns(t *testing.T) {
	t.Parallel()
	p := start(t, &fakeBackend{})
	got := p.query("SHOW CLIENTS")
	if len(got.cols) == 0 || len(got.rows) != 0 || got.tag != "SHOW" {
		t.Fatalf("got %v columns %q, %d rows, tag %q", got.kinds, got.cols, len(got.rows), got.tag)
	}
	p.terminate()
}

func TestShowHelpIsANoticeListingCommands(t *testing.T) {
	t.Parallel()
	p := start(t, &fakeBackend{})
	got := p.query("SHOW HELP")
	want := []string{"NoticeResponse", "CommandComplete", "ReadyForQuery"}
	if !slices.Equal(got.kinds, want) || got.tag != "SHOW" {
		t.Fatalf("got %v tag %q, want %v", got.kinds, got.tag, want)
	}
	for _, cmd := range []string{"SHOW POOLS", "LEASES", "RELOAD", "PAUSE", "RESUME", "KILL <client id>", "KILL SUBJECT"} {
		if !strings.Contains(got.notices[0].Detail, cmd) {
			t.Errorf("help lacks %q:\n%s", cmd, got.notices[0].Detail)
		}
	}
	p.terminate()
}

func TestActionsCallTheBackendWithTheirArgument(t *testing.T) {
	t.Parallel()
	tests := []struct {
		query, call, tag string
	}{
		{"RELOAD", "Reload", "RELOAD"},
		{"pause;", "Pause()", "PAUSE"},
		{"PAUSE app", "Pause(app)", "PAUSE"},
		{`PAUSE "My ""Big"" DB"`, `Pause(My "Big" DB)`, "PAUSE"},
		{"RESUME", "Resume()", "RESUME"},
		{"resume App", "Resume(App)", "RESUME"},
		{"KILL 42", "Kill(42)", "KILL"},
		{"KILL_CLIENT 43", "Kill(43)", "KILL"},
		{"KILL SUBJECT 'o''brien'", "KillSubject(o'brien)", "KILL"},
		{"kill subject 'back\\slash' ;", `KillSubject(back\slash)`, "KILL"},
	}
	for _, tt := range tests {
		t.Run(tt.query, func(t *testing.T) {
			t.Parallel()
			b := &fakeBackend{found: true, sessions: 3}
			p := start(t, b)
			got := p.query(tt.query)
			if got.err.Code != "" {
				t.Fatalf("error %s: %s", got.err.Code, got.err.Message)
			}
			if got.tag != tt.tag || got.status != 'I' {
				t.Errorf("tag %q status %q, want %q and I", got.tag, got.status, tt.tag)
			}
			if calls := b.called(); !slices.Equal(calls, []string{tt.call}) {
				t.Errorf("backend calls %q, want [%q]", calls, tt.call)
			}
			p.terminate()
		})
	}
}

func TestKillSubjectNoticesHowManySessionsEnded(t *testing.T) {
	t.Parallel()
	p := start(t, &fakeBackend{sessions: 3})
	got := p.query("KILL SUBJECT 'o''brien'")
	want := []string{"NoticeResponse", "CommandComplete", "ReadyForQuery"}
	if !slices.Equal(got.kinds, want) {
		t.Fatalf("got %v, want %v", got.kinds, want)
	}
	if msg := got.notices[0].Message; !strings.Contains(msg, "3 session") || !strings.Contains(msg, "o'brien") {
		t.Errorf("notice %q does not say 3 sessions of o'brien", msg)
	}
	p.terminate()
}

func TestKillOfUnknownClientIsUndefinedObject(t *testing.T) {
	t.Parallel()
	p := start(t, &fakeBackend{found: false})
	got := p.query("KILL 99")
	if got.err.Code != undefinedObject || !strings.Contains(got.err.Message, "no such client") || got.tag != "" {
		t.Fatalf("got %s %q tag %q", got.err.Code, got.err.Message, got.tag)
	}
	p.terminate()
}

func TestBackendErrorsBecomeErrorResponsesAndTheSessionGoesOn(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		err      error
		code     string
		message  string
		mustHide string
	}{
		{"tagged error keeps its code", fmt.Errorf("pause: %w", pgerror.New(pgerror.InvalidCatalogName, `database "nope" does not exist`)),
			pgerror.InvalidCatalogName, `database "nope" does not exist`, ""},
		{"untagged error is internal and hides its text", errors.New("dial 10.1.2.3: refused"),
			pgerror.InternalError, "pgwarden internal error", "10.1.2.3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p := start(t, &fakeBackend{err: tt.err, databases: []Database{{Name: "app"}}})
			got := p.query("PAUSE nope")
			if got.err.Code != tt.code || got.err.Message != tt.message || got.tag != "" || got.status != 'I' {
				t.Fatalf("got %s %q tag %q status %q", got.err.Code, got.err.Message, got.tag, got.status)
			}
			if tt.mustHide != "" && strings.Contains(fmt.Sprint(got.err), tt.mustHide) {
				t.Fatalf("error response leaks %q: %+v", tt.mustHide, got.err)
			}
			if again := p.query("SHOW DATABASES"); len(again.rows) != 1 {
				t.Fatalf("session did not go on: %v", again.kinds)
			}
			p.terminate()
		})
	}
}

func TestRefusedQueriesGetASQLSTATEAndTheSessionGoesOn(t *testing.T) {
	t.Parallel()
	tests := []struct {
		query, code, hint string
	}{
		{"SELECT 1", syntaxError, "KILL SUBJECT '<subject>'"},
		{"SHOW", syntaxError, "SHOW POOLS|CLIENTS"},
		{"SHOW TABLES", syntaxError, "POOLS, CLIENTS"},
		{"KILL app", syntaxError, "PgBouncer's KILL <db> is not supported"},
		{"KILL SUBJECT alice", syntaxError, "SUBJECT '<subject>'"},
		{"KILL SUBJECT ''", pgerror.InvalidParameterValue, ""},
		{"KILL 99999999999999999999", pgerror.InvalidParameterValue, ""},
		{"RELOAD now", syntaxError, "RELOAD;"},
		{"SHOW POOLS; RELOAD", pgerror.FeatureNotSupported, "nothing of this one ran"},
		{"RELOAD /* unterminated", syntaxError, ""},
	}
	for _, tt := range tests {
		t.Run(tt.query, func(t *testing.T) {
			t.Parallel()
			b := &fakeBackend{}
			p := start(t, b)
			got := p.query(tt.query)
			want := []string{"ErrorResponse", "ReadyForQuery"}
			if !slices.Equal(got.kinds, want) || got.err.Code != tt.code || got.status != 'I' {
				t.Fatalf("got %v %s %q, want %v with %s", got.kinds, got.err.Code, got.err.Message, want, tt.code)
			}
			if !strings.Contains(got.err.Hint, tt.hint) {
				t.Errorf("hint %q lacks %q", got.err.Hint, tt.hint)
			}
			if calls := b.called(); len(calls) != 0 {
				t.Errorf("a refused query called the backend: %q", calls)
			}
			if again := p.query("RELOAD"); again.tag != "RELOAD" {
				t.Fatalf("session did not go on: %v", again.kinds)
			}
			p.terminate()
		})
	}
}

func TestEmptyQueryGetsEmptyQueryResponse(t *testing.T) {
	t.Parallel()
	for _, q := range []string{"", "   ", ";", " ; ;", "-- nothing\n", "/* a /* nested */ one */"} {
		t.Run(fmt.Sprintf("%q", q), func(t *testing.T) {
			t.Parallel()
			p := start(t, &fakeBackend{})
			got := p.query(q)
			want := []string{"EmptyQueryResponse", "ReadyForQuery"}
			if !slices.Equal(got.kinds, want) || got.status != 'I' {
				t.Fatalf("got %v status %q, want %v", got.kinds, got.status, want)
			}
			p.terminate()
		})
	}
}

func TestExtendedProtocolIsRefusedUntilSync(t *testing.T) {
	t.Parallel()
	b := &fakeBackend{}
	p := start(t, b)
	p.send(
		&pgproto3.Parse{Query: "SHOW POOLS"},
		&pgproto3.Bind{},
		&pgproto3.Describe{ObjectType: 'P'},
		&pgproto3.Execute{},
		&pgproto3.Query{String: "RELOAD"}, // discarded: PostgreSQL skips to Sync
		&pgproto3.Close{ObjectType: 'S'},
		&pgproto3.Flush{},
		&pgproto3.Sync{},
	)
	got := p.read()
	want := []string{"ErrorResponse", "ReadyForQuery"}
	if !slices.Equal(got.kinds, want) || got.err.Code != pgerror.FeatureNotSupported || got.status != 'I' {
		t.Fatalf("got %v %s, want %v with 0A000", got.kinds, got.err.Code, want)
	}
	if !strings.Contains(got.err.Message, "simple query protocol") {
		t.Errorf("message %q does not say why", got.err.Message)
	}
	if calls := b.called(); len(calls) != 0 {
		t.Errorf("a discarded query ran: %q", calls)
	}
	if again := p.query("RELOAD"); again.tag != "RELOAD" {
		t.Fatalf("simple protocol after Sync: %v", again.kinds)
	}
	p.terminate()
}

func TestLoneSyncAndFunctionCallGetReadyForQuery(t *testing.T) {
	t.Parallel()
	p := start(t, &fakeBackend{})
	p.send(&pgproto3.Sync{})
	if got := p.read(); !slices.Equal(got.kinds, []string{"ReadyForQuery"}) {
		t.Fatalf("Sync: got %v", got.kinds)
	}
	p.send(&pgproto3.FunctionCall{Function: 1})
	got := p.read()
	if !slices.Equal(got.kinds, []string{"ErrorResponse", "ReadyForQuery"}) || got.err.Code != pgerror.FeatureNotSupported {
		t.Fatalf("FunctionCall: got %v %s", got.kinds, got.err.Code)
	}
	p.terminate()
}

func TestTerminateWhileDiscardingEndsServe(t *testing.T) {
	t.Parallel()
	p := start(t, &fakeBackend{})
	p.send(&pgproto3.Parse{Query: "x"}, &pgproto3.Flush{})
	if got, err := p.fe.Receive(); err != nil {
		t.Fatal(err)
	} else if _, ok := got.(*pgproto3.ErrorResponse); !ok {
		t.Fatalf("got %T, want ErrorResponse", got)
	}
	p.terminate()
}

func TestUnexpectedMessageIsFatalProtocolViolation(t *testing.T) {
	t.Parallel()
	p := start(t, &fakeBackend{})
	p.send(&pgproto3.PasswordMessage{Password: "token"})
	msg, err := p.fe.Receive()
	if err != nil {
		t.Fatal(err)
	}
	er, ok := msg.(*pgproto3.ErrorResponse)
	if !ok || er.Severity != "FATAL" || er.Code != pgerror.ProtocolViolation {
		t.Fatalf("got %#v, want FATAL 08P01", msg)
	}
	if err := p.wait(); err == nil {
		t.Fatal("Serve = nil, want an error")
	}
}

func TestMalformedFramingEndsServeWithAnError(t *testing.T) {
	t.Parallel()
	tests := map[string][]byte{
		"unknown type":     {'?', 0, 0, 0, 4},
		"length below 4":   {'Q', 0, 0, 0, 3},
		"body over limit":  {'Q', 0, 2, 0, 0},
		"query without 0":  {'Q', 0, 0, 0, 6, 'h', 'i'},
		"cut off mid-body": {'Q', 0, 0, 0, 9, 'S'},
	}
	for name, raw := range tests {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			p := start(t, &fakeBackend{})
			if _, err := p.conn.Write(raw); err != nil {
				t.Fatal(err)
			}
			if name == "cut off mid-body" {
				p.conn.Close()
			}
			if err := p.wait(); err == nil {
				t.Fatal("Serve = nil, want an error")
			}
		})
	}
}

func TestContextEndInterruptsABlockedRead(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	p := startWith(t, ctx, &fakeBackend{}, nil)
	if got := p.query("RELOAD"); got.tag != "RELOAD" {
		t.Fatalf("got %v", got.kinds)
	}
	cancel()
	if err := p.wait(); !errors.Is(err, context.Canceled) {
		t.Fatalf("Serve = %v, want context.Canceled", err)
	}
}

func TestLogNamesAdminAndCommandButNoConfigValue(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	var mu sync.Mutex
	log := slog.New(slog.NewTextHandler(lockedWriter{&mu, &buf}, nil))
	b := &fakeBackend{config: []Setting{{Key: "vault_addr", Value: "https://vault.secret-host.example"}}, found: true}
	p := startWith(t, context.Background(), b, log)
	p.query("SHOW CONFIG")
	p.query("KILL 5")
	p.terminate()
	mu.Lock()
	out := buf.String()
	mu.Unlock()
	for _, want := range []string{"subject=admin@example.org", "command=SHOW", "view=config", "command=KILL", "client=5"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "secret-host") {
		t.Errorf("log holds a SHOW CONFIG value:\n%s", out)
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
