package proxy_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/testenv"
)

// stack is shared by the integration tests of this package: one PostgreSQL,
// Vault and issuer, started by the first test that needs it.
var (
	stack     *testenv.Stack
	stackErr  error
	stackOnce sync.Once
)

// socketDir holds pgwarden's unix socket.
var socketDir string

// logs collects pgwarden's log output, to check that no token reaches it.
var logs = &testenv.LockedBuffer{}

const briefTTL = 20 * time.Second

func TestMain(m *testing.M) {
	code := m.Run()
	if stack != nil {
		stack.Close()
	}
	if socketDir != "" {
		os.RemoveAll(socketDir)
	}
	os.Exit(code)
}

// needStack skips under -short outside CI, starts the stack once, and fails
// the test when a component is missing.
func needStack(t *testing.T) *testenv.Stack {
	t.Helper()
	testenv.Integration(t)
	stackOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if socketDir, stackErr = os.MkdirTemp("", "pgwarden-sock-"); stackErr != nil {
			return
		}
		stack, stackErr = testenv.StartStack(ctx, testenv.StackOptions{
			UnixSocketDir: socketDir,
			Logger:        newJSONLogger(logs),
			ExtraLevels:   []config.Level{briefLevel(), roleLevel("crowd"), roleLevel("team"), soloLevel(), txnLevel()},
			// Only 127.0.0.1 is trusted, so a client from 127.0.0.2 counts as remote.
			TrustedNetworks: []string{"127.0.0.1/32"},
		})
	})
	testenv.Check(t, stackErr)
	return stack
}

// briefLevel's leases cannot be renewed past briefTTL: they end while a
// test watches.
func briefLevel() config.Level {
	l := testenv.ReadLevel("brief", briefTTL, "analyst")
	l.MaxTTL = config.Duration(briefTTL)
	return l
}

// roleLevel is a reader level whose lease everyone shares (role scope).
func roleLevel(name string) config.Level {
	l := testenv.ReadLevel(name, time.Hour, "analyst")
	l.Scope = config.ScopeRole
	return l
}

// soloLevel is identity-scoped, used by the credentials tests alone, and
// its revocation only drops the role (no pg_terminate_backend), so a
// revoked lease leaves pooled sessions of a dropped role for pgwarden to
// find.
func soloLevel() config.Level {
	l := testenv.ReadLevel("solo", time.Hour, "analyst")
	l.RevocationStatements = []string{`DROP ROLE IF EXISTS "{{name}}";`}
	return l
}

// txnLevel is a role-scoped reader level in transaction mode.
func txnLevel() config.Level {
	l := roleLevel("txn")
	l.PoolMode = config.PoolTransaction
	return l
}

func token(t *testing.T, sub string, groups ...string) string {
	t.Helper()
	tok, err := stack.Token(sub, groups...)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func connect(t *testing.T, user, tok string) *pgx.Conn {
	t.Helper()
	return connectTo(t, stack, user, tok)
}

func queryString(t *testing.T, c *pgx.Conn, sql string) string {
	t.Helper()
	var s string
	if err := c.QueryRow(context.Background(), sql).Scan(&s); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return s
}

func sqlstate(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

func TestReaderGetsDynamicRole(t *testing.T) {
	needStack(t)
	c := connect(t, "reader", token(t, "alice", "analyst"))
	user := queryString(t, c, "select current_user")
	if user == "reader" || user == "postgres" || user == "vault_admin" {
		t.Fatalf("current_user = %q, want a Vault-issued dynamic role", user)
	}
	var validUntil *time.Time
	if err := c.QueryRow(context.Background(), "select rolvaliduntil from pg_roles where rolname = current_user").Scan(&validUntil); err != nil {
		t.Fatal(err)
	}
	if validUntil == nil || validUntil.Before(time.Now()) {
		t.Fatalf("dynamic role VALID UNTIL = %v, want a time in the future", validUntil)
	}
}

func newJSONLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
