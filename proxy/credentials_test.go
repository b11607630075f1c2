package proxy_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/testenv"
)

// Credentials pgwarden owns: each test uses the "solo" level (identity
// scope, used by no other test) so lease counts are its own.

// leaseIDs lists Vault's leases of a database role.
func leaseIDs(t *testing.T, st *testenv.Stack, role string) []string {
	t.Helper()
	vc, err := st.Vault.Client()
	if err != nil {
		t.Fatal(err)
	}
	sec, err := vc.Logical().List("sys/leases/lookup/database/creds/" + role + "/")
	if err != nil {
		t.Fatal(err)
	}
	if sec == nil {
		return nil
	}
	var out []string
	for _, k := range sec.Data["keys"].([]any) {
		out = append(out, k.(string))
	}
	return out
}

// roleExists reports whether PostgreSQL still has the login role user.
func roleExists(t *testing.T, st *testenv.Stack, user string) bool {
	t.Helper()
	var n int
	if err := superuserQuery(context.Background(), st, "select count(*) from pg_roles where rolname = '"+user+"'", &n); err != nil {
		t.Fatal(err)
	}
	return n == 1
}

// In identity scope (the default) each person gets a lease of their own,
// read with their own Vault login, and the database user names them; one
// person's connections share it.
func TestIdentityScopeGivesEachPersonTheirOwnDatabaseUser(t *testing.T) {
	st := needStack(t)
	before := len(leaseIDs(t, st, "app-solo"))
	olga := token(t, "olga", "analyst")
	o1, o2 := connect(t, "solo", olga), connect(t, "solo", olga)
	p := connect(t, "solo", token(t, "pete", "analyst"))
	u1, u2, up := queryString(t, o1, "select current_user"), queryString(t, o2, "select current_user"), queryString(t, p, "select current_user")
	if u1 != u2 {
		t.Errorf("olga's two sessions run as %s and %s: one person's connections share their lease", u1, u2)
	}
	if u1 == up {
		t.Errorf("olga and pete both run as %s: identity scope gives each person their own", u1)
	}
	if !strings.Contains(u1, "olga") || !strings.Contains(up, "pete") {
		t.Errorf("database users %s (olga) and %s (pete) do not name their person", u1, up)
	}
	if got := len(leaseIDs(t, st, "app-solo")) - before; got != 2 {
		t.Errorf("Vault holds %d new leases for two people, want 2", got)
	}
}

// A session whose token expires gets a NOTICE before, finishes the
// transaction it has open, and is ended at that boundary with 57P01; the
// person's lease is revoked afterwards (Vault drops the role).
func TestTokenExpiryEndsTheSessionAtTheNextBoundary(t *testing.T) {
	st := needStack(t)
	ctx := context.Background()
	tok, err := st.Issuer.Mint(testenv.Claims{Subject: "tess", Groups: []string{"analyst"}, TTL: 6 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := pgx.ParseConfig(st.ConnString("solo", tok))
	if err != nil {
		t.Fatal(err)
	}
	notices := make(chan *pgconn.Notice, 4)
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) { notices <- n }
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	user := queryString(t, c, "select current_user")
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(8 * time.Second) // past exp, inside the transaction
	var n int
	if err := tx.QueryRow(ctx, "select count(*) from items").Scan(&n); err != nil {
		t.Fatalf("a transaction open when the token expired could not finish: %v", err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatalf("commit after the token expired, inside the grace: %v", err)
	}
	select {
	case n := <-notices:
		if !strings.Contains(n.Message, "token expires") {
			t.Errorf("notice %q does not say the token expires", n.Message)
		}
	default:
		t.Error("no NOTICE before the token expired")
	}
	_, err = c.Exec(ctx, "select 1")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "57P01" || !strings.Contains(pgErr.Message, "token expired") {
		t.Fatalf("after the boundary: %v, want FATAL 57P01 saying the token expired", err)
	}
	eventually(t, 15*time.Second, func() bool { return !roleExists(t, st, user) },
		"the expired person's lease was not revoked: %s still exists", user)
}

// A lease revoked behind pgwarden's back (vault lease revoke -prefix during
// an incident) costs the next connection nothing: it gets fresh credentials
// at once, not at the old lease's retirement hours later, even when an
// idle pooled session of the dropped role is waiting.
func TestRevokedLeaseIsReplacedAtTheNextConnection(t *testing.T) {
	st := needStack(t)
	ctx := context.Background()
	tok := token(t, "rhea", "analyst")
	c := connect(t, "solo", tok)
	old := queryString(t, c, "select current_user")
	c.Close(ctx) // its session waits in the pool
	vc, err := st.Vault.Client()
	if err != nil {
		t.Fatal(err)
	}
	if err := vc.Sys().RevokePrefixWithContext(ctx, "database/creds/app-solo"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, func() bool { return !roleExists(t, st, old) }, "Vault did not drop %s", old)
	time.Sleep(1100 * time.Millisecond) // past pool.ping_after_idle: the pooled session is asked about its role
	next := connect(t, "solo", tok)
	var n int
	if err := next.QueryRow(ctx, "select count(*) from items").Scan(&n); err != nil {
		t.Fatalf("the first connection after the revocation: %v", err)
	}
	if u := queryString(t, next, "select current_user"); u == old {
		t.Fatalf("still %s, whose lease was revoked", u)
	}
}
