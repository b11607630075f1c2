package proxy_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/proxy"
	"github.com/pgwarden/pgwarden/testenv"
)

// The tests in this file run proxy.Server against the real PostgreSQL of the
// shared stack, with fakes at the proxy's own boundary: the token is taken as
// the subject, the user as the level, and the test decides which database
// credentials (real roles it creates) the CredentialSource hands out and
// when they retire. That is how a test controls retirement, the credential a
// pooled session was opened under, or an upstream reached through a
// testenv.Forwarder.

// subjectVerifier takes the token itself as the subject.
type subjectVerifier struct{}

func (subjectVerifier) Verify(_ context.Context, tok string) (*authn.Identity, error) {
	return &authn.Identity{Subject: tok, Name: tok, Expiry: time.Now().Add(time.Hour)}, nil
}

// anyLevel grants the level asked for.
type anyLevel struct{}

func (anyLevel) Decide(_ *authn.Identity, _, user string) (string, error) { return user, nil }

// credFunc hands out what the test says.
type credFunc func(broker.Request) (*broker.Credential, error)

func (f credFunc) Credential(_ context.Context, r broker.Request) (*broker.Credential, error) {
	return f(r)
}

func (credFunc) Forget(*broker.Credential) {}

func fixedCred(c *broker.Credential) credFunc {
	return func(broker.Request) (*broker.Credential, error) { return c, nil }
}

var (
	_ proxy.TokenVerifier    = subjectVerifier{}
	_ proxy.Authorizer       = anyLevel{}
	_ proxy.CredentialSource = credFunc(nil)
)

// pgRole creates a login role in the stack's PostgreSQL that may read the
// app database, and returns it as a credential valid for an hour. It is
// dropped when the test ends.
func pgRole(t *testing.T, st *testenv.Stack) *broker.Credential {
	t.Helper()
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	name, pw := "t_"+hex.EncodeToString(b), hex.EncodeToString(append(b, b...))
	ctx := context.Background()
	if err := st.PG.Exec(ctx, "postgres", fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD '%s' IN ROLE app_read", name, pw)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = st.PG.Exec(ctx, "postgres", fmt.Sprintf("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '%s'", name))
		_ = st.PG.Exec(ctx, "postgres", "DROP ROLE IF EXISTS "+name)
	})
	return roleCred(name, pw, time.Hour, time.Hour)
}

// roleCred is a credential for an existing role that retires and ends when
// the test says, from now.
func roleCred(name, pw string, retireIn, endIn time.Duration) *broker.Credential {
	now := time.Now()
	return broker.Fixed(name, pw, "test/"+name, now.Add(retireIn), now.Add(endIn))
}

// appRoute routes database app, levels reader and writer, to the stack's
// PostgreSQL over TCP (or to addr, "host:port", when not empty).
func appRoute(st *testenv.Stack, addr string) map[string]proxy.Route {
	host, port := "127.0.0.1", fmt.Sprint(st.PG.Port)
	if addr != "" {
		host, port, _ = net.SplitHostPort(addr)
	}
	return map[string]proxy.Route{"app": {
		Upstream:   fmt.Sprintf("host=%s port=%s dbname=app sslmode=disable", host, port),
		VaultRoles: map[string]string{"reader": "r", "writer": "w"},
	}}
}

// startProxy serves cfg (filled in with the fakes above unless set) on
// 127.0.0.1 and returns the server and its address.
func startProxy(t *testing.T, cfg proxy.Config) (*proxy.Server, string) {
	t.Helper()
	if cfg.Verifier == nil {
		cfg.Verifier = subjectVerifier{}
	}
	if cfg.Authorizer == nil {
		cfg.Authorizer = anyLevel{}
	}
	if cfg.Logger == nil {
		cfg.Logger = newJSONLogger(logs)
	}
	s, err := proxy.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	t.Cleanup(func() { s.Close() })
	return s, ln.Addr().String()
}

// dial connects to a startProxy server as subject at level.
func dial(t *testing.T, addr, level, subject string) *pgconn.PgConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := pgconn.ConnectConfig(ctx, harnessConfig(t, addr, level, subject))
	if err != nil {
		t.Fatalf("connect %s as %s: %v", level, subject, err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func harnessConfig(t *testing.T, addr, level, subject string) *pgconn.Config {
	t.Helper()
	host, port, _ := net.SplitHostPort(addr)
	cfg, err := pgconn.ParseConfig(fmt.Sprintf("host=%s port=%s dbname=app user=%s password=%s sslmode=disable", host, port, level, subject))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// query1 runs sql and returns the first column of the first row of its last result.
func query1(ctx context.Context, c *pgconn.PgConn, sql string) (string, error) {
	res, err := c.Exec(ctx, sql).ReadAll()
	if err != nil {
		return "", err
	}
	for i := len(res) - 1; i >= 0; i-- {
		if len(res[i].Rows) > 0 && len(res[i].Rows[0]) > 0 {
			return string(res[i].Rows[0][0]), nil
		}
	}
	return "", nil
}

// forwarder puts a testenv.Forwarder in front of the stack's PostgreSQL for
// the test.
func forwarder(t *testing.T, st *testenv.Stack) *testenv.Forwarder {
	t.Helper()
	fwd, err := testenv.StartForwarder(st.PG.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fwd.Close)
	return fwd
}

// rawLogin logs in with pgproto3 over a plain socket and returns the
// connection, after ReadyForQuery, for tests that must misbehave as a client.
func rawLogin(t *testing.T, addr, level, subject string) (net.Conn, *pgproto3.Frontend) {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	_ = nc.SetDeadline(time.Now().Add(20 * time.Second))
	fe := pgproto3.NewFrontend(nc, nc)
	fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{"user": level, "database": "app"}})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatalf("login: %v", err)
		}
		switch m := m.(type) {
		case *pgproto3.AuthenticationCleartextPassword:
			fe.Send(&pgproto3.PasswordMessage{Password: subject})
			if err := fe.Flush(); err != nil {
				t.Fatal(err)
			}
		case *pgproto3.ErrorResponse:
			t.Fatalf("login refused: %s %s", m.Code, m.Message)
		case *pgproto3.ReadyForQuery:
			_ = nc.SetDeadline(time.Time{})
			return nc, fe
		}
	}
}

// poolActive is the number of upstream sessions lent out for (app, level).
func poolActive(s *proxy.Server, level string) (idle, active int) {
	for _, p := range s.PoolStats() {
		if p.Database == "app" && p.Level == level {
			return p.Idle, p.Active
		}
	}
	return 0, 0
}

// eventually polls cond every 50ms for up to d, and fails with msg if it
// never holds. It waits for a state, it does not time anything.
func eventually(t *testing.T, d time.Duration, cond func() bool, msg string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf(msg, args...)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// slowConn reads at most chunk bytes per Read and pauses after each: a
// client that consumes a result slowly.
type slowConn struct {
	net.Conn
	chunk int
	pause time.Duration
}

func (c slowConn) Read(p []byte) (int, error) {
	if len(p) > c.chunk {
		p = p[:c.chunk]
	}
	n, err := c.Conn.Read(p)
	time.Sleep(c.pause)
	return n, err
}

// backendPids lists the PostgreSQL backends of database user.
func backendPids(t *testing.T, st *testenv.Stack, user string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := pgconn.Connect(ctx, st.PG.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	res, err := c.Exec(ctx, fmt.Sprintf("SELECT pid FROM pg_stat_activity WHERE usename = '%s'", user)).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range res[0].Rows {
		out = append(out, string(r[0]))
	}
	return out
}

// pgErrCode is the SQLSTATE of err, or "" when err is not a PostgreSQL error.
func pgErrCode(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}
