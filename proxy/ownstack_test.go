package proxy_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/testenv"
)

// The tests in this file stop Vault or pgwarden, so each starts a stack of
// its own.

func ownStack(t *testing.T, configure func(*config.Config)) *testenv.Stack {
	t.Helper()
	testenv.Integration(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := testenv.StartStack(ctx, testenv.StackOptions{
		Configure: func(c *config.Config) {
			c.Databases[0].Levels = append(c.Databases[0].Levels, roleLevel("shared"))
			if configure != nil {
				configure(c)
			}
		},
	})
	testenv.Check(t, err)
	t.Cleanup(st.Close)
	return st
}

func connectTo(t *testing.T, st *testenv.Stack, level, tok string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, st.ConnString(level, tok))
	if err != nil {
		t.Fatalf("connect as %s: %v", level, err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func mint(t *testing.T, st *testenv.Stack, sub string) string {
	t.Helper()
	tok, err := st.Token(sub, "analyst")
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// Vault stops answering mid-run (its process stopped: connections are
// accepted, nothing answers). Sessions and pools with valid credentials
// keep serving; a new identity, which needs Vault, gets 08006 naming Vault
// within vault.timeout, never a hang; /readyz says so; and when Vault
// answers again pgwarden recovers without a restart.
func TestVaultOutageIsBoundedAndRecovered(t *testing.T) {
	const wait = 2 * time.Second
	st := ownStack(t, func(c *config.Config) { c.Vault.Timeout = config.Duration(wait) })
	ctx := context.Background()
	alice := mint(t, st, "alice")
	open := connectTo(t, st, "reader", alice)
	pooled := connectTo(t, st, "shared", mint(t, st, "sam"))
	pooled.Close(ctx) // its session waits in the pool, its login and lease cached

	if err := st.Vault.Pause(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = st.Vault.Resume() }()

	if got := queryString(t, open, "select count(*)::text from items"); got == "" {
		t.Fatal("an open session stopped serving while Vault is down")
	}
	again := connectTo(t, st, "reader", alice) // same token: login and credential cached
	queryString(t, again, "select 1::text")

	start := time.Now()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, err := pgx.Connect(cctx, st.ConnString("reader", mint(t, st, "carol")))
	took := time.Since(start)
	if sqlstate(err) != "08006" || !strings.Contains(err.Error(), "Vault") {
		t.Fatalf("a new identity during the outage: %v, want 08006 naming Vault", err)
	}
	// A bound, not a benchmark: the wait plus vault/api's last retry and
	// scheduling slack, far below the 30s authentication timeout.
	if took > wait+5*time.Second {
		t.Fatalf("the refusal took %v with vault.timeout %v", took, wait)
	}
	if code := readyz(t, st); code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz during the outage: %d, want 503", code)
	}
	if m := metricIn(t, st, "pgwarden_vault_request_errors_total", map[string]string{"op": "login"}); m == nil || m.GetCounter().GetValue() < 1 {
		t.Fatal("the failed Vault login was not counted in pgwarden_vault_request_errors_total")
	}

	if err := st.Vault.Resume(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, func() bool {
		c, err := pgx.Connect(cctx, st.ConnString("reader", mint(t, st, "carol")))
		if err != nil {
			return false
		}
		c.Close(ctx)
		return true
	}, "no recovery after Vault came back")
	// /readyz answers from a check at most a second old.
	eventually(t, 10*time.Second, func() bool { return readyz(t, st) == http.StatusOK }, "/readyz after the outage: not 200")
}

func readyz(t *testing.T, st *testenv.Stack) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+st.App.MetricsAddr()+"/readyz", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// With vault.revoke_on_shutdown (the default), pgwarden leaves nothing
// behind in Vault when it stops: no lease of either scope, and no Vault
// token of a client login.
func TestShutdownRevokesLeasesAndTokens(t *testing.T) {
	st := ownStack(t, nil)
	ctx := context.Background()
	for _, sub := range []string{"uma", "vic"} {
		c := connectTo(t, st, "reader", mint(t, st, sub))
		queryString(t, c, "select 1::text")
		c.Close(ctx)
		s := connectTo(t, st, "shared", mint(t, st, sub))
		queryString(t, s, "select 1::text")
		s.Close(ctx)
	}
	vc, err := st.Vault.Client()
	if err != nil {
		t.Fatal(err)
	}
	count := func() (leases, logins int) {
		for _, role := range []string{"app-reader", "app-shared"} {
			sec, err := vc.Logical().List("sys/leases/lookup/database/creds/" + role + "/")
			if err != nil {
				t.Fatal(err)
			}
			if sec != nil {
				leases += len(sec.Data["keys"].([]any))
			}
		}
		acc, err := vc.Logical().List("auth/token/accessors")
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range acc.Data["keys"].([]any) {
			sec, err := vc.Auth().Token().LookupAccessor(a.(string))
			if err == nil && sec != nil && sec.Data["path"] == "auth/jwt/login" {
				logins++
			}
		}
		return leases, logins
	}
	if l, n := count(); l != 3 || n != 4 {
		t.Fatalf("before shutdown: %d leases, %d client logins; want 3 (two people, one shared) and 4", l, n)
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := st.App.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	// Vault revokes a token's leases in the background, a moment after the
	// token itself.
	eventually(t, 10*time.Second, func() bool { l, n := count(); return l == 0 && n == 0 },
		"leases or client logins left in Vault after shutdown")
}

// Role scope under continuous load: 16 clients run transactions for 60s
// on a level whose leases cannot live past 20s. pgwarden renews each lease
// as far as Vault allows, reads the next one before the old ends
// (make-before-break), and moves sessions at idle points: no transaction
// that started fails; the leases created match the rotations the clients
// saw; none outlives the run.
func TestRoleScopeRotatesUnderLoadWithoutFailedTransactions(t *testing.T) {
	const (
		clients = 16
		maxTTL  = 20 * time.Second
		run     = 60 * time.Second
	)
	st := ownStack(t, func(c *config.Config) {
		l := roleLevel("spin")
		l.DefaultTTL, l.MaxTTL = config.Duration(maxTTL), config.Duration(maxTTL)
		c.Databases[0].Levels = append(c.Databases[0].Levels, l)
	})
	ctx := context.Background()
	type result struct {
		txns, failed, reconnects int
		users                    map[string]bool
		err                      error
	}
	results := make(chan result, clients)
	before := vaultCallsOf(t, st, "creds")
	stop := time.Now().Add(run)
	for i := range clients {
		tok := mint(t, st, fmt.Sprintf("worker-%02d", i))
		go func() {
			r := result{users: map[string]bool{}}
			defer func() { results <- r }()
			var c *pgx.Conn
			defer func() {
				if c != nil {
					c.Close(ctx)
				}
			}()
			for time.Now().Before(stop) {
				if c == nil {
					var err error
					if c, err = pgx.Connect(ctx, st.ConnString("spin", tok)); err != nil {
						r.err = fmt.Errorf("connect: %w", err)
						return
					}
				}
				tx, err := c.Begin(ctx)
				if err != nil {
					// Ended at an idle point (57P01): reconnect. Nothing had started.
					if code := sqlstate(err); code != "57P01" && !c.IsClosed() {
						r.err = fmt.Errorf("begin: %w", err)
						return
					}
					c.Close(ctx)
					c = nil
					r.reconnects++
					continue
				}
				var user string
				err = tx.QueryRow(ctx, "select current_user").Scan(&user)
				if err == nil {
					err = tx.Commit(ctx)
				}
				if err != nil {
					r.failed++
					t.Logf("a transaction that started failed: %v", err)
					c.Close(ctx)
					c = nil
					continue
				}
				r.txns++
				r.users[user] = true
			}
		}()
	}
	users := map[string]bool{}
	var txns, failed, reconnects int
	for range clients {
		r := <-results
		if r.err != nil {
			t.Error(r.err)
		}
		txns, failed, reconnects = txns+r.txns, failed+r.failed, reconnects+r.reconnects
		for u := range r.users {
			users[u] = true
		}
	}
	created := int(vaultCallsOf(t, st, "creds") - before)
	t.Logf("%d transactions, %d failed, %d reconnects at idle points, %d database users, %d leases read", txns, failed, reconnects, len(users), created)
	if failed != 0 {
		t.Errorf("%d transactions that started failed", failed)
	}
	if len(users) < int(run/maxTTL) {
		t.Errorf("%d database users in %v of %v leases: the credential did not rotate", len(users), run, maxTTL)
	}
	if created != len(users) {
		t.Errorf("%d leases read during the run for %d users seen: every lease read serves, none is wasted", created, len(users))
	}
	for u := range users {
		if !strings.HasPrefix(u, "pgwarden-") {
			t.Errorf("shared user %q does not name pgwarden", u)
		}
	}
	vc, err := st.Vault.Client()
	if err != nil {
		t.Fatal(err)
	}
	spinLeases := func() int {
		sec, err := vc.Logical().List("sys/leases/lookup/database/creds/app-spin/")
		if err != nil {
			t.Fatal(err)
		}
		if sec == nil {
			return 0
		}
		return len(sec.Data["keys"].([]any))
	}
	// Rotated-out leases were revoked as their last session went: only the
	// current one is left (two, in the moment of a rotation).
	if n := spinLeases(); n > 2 {
		t.Errorf("%d leases in Vault after the run, with pgwarden still up: rotated-out leases were not revoked", n)
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := st.App.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, func() bool { return spinLeases() == 0 }, "a lease of the run outlived it")
}

// vaultCallsOf is how many Vault calls of op st's pgwarden made.
func vaultCallsOf(t *testing.T, st *testenv.Stack, op string) float64 {
	t.Helper()
	if m := metricIn(t, st, "pgwarden_vault_request_duration_seconds", map[string]string{"op": op}); m != nil {
		return float64(m.GetHistogram().GetSampleCount())
	}
	return 0
}

// A static role (one existing database user whose password Vault rotates):
// clients keep running transactions and reconnecting while Vault rotates
// the password, on its schedule and on demand. Open sessions are not
// touched by a rotation; new ones log in with the new password; no query
// fails.
func TestStaticRoleRotationFailsNoQuery(t *testing.T) {
	st := ownStack(t, func(c *config.Config) {
		c.Databases[0].Levels = append(c.Databases[0].Levels, config.Level{Name: "report", Groups: []string{"analyst"},
			Scope: config.ScopeRole, Static: &config.StaticRole{Username: "app_report", RotationPeriod: config.Duration(5 * time.Second)}})
	})
	ctx := context.Background()
	vc, err := st.Vault.Client()
	if err != nil {
		t.Fatal(err)
	}
	password := func() string {
		sec, err := vc.Logical().Read("database/static-creds/app-report")
		if err != nil || sec == nil {
			t.Fatalf("static creds: %v", err)
		}
		return sec.Data["password"].(string)
	}
	const workers = 4
	stop := time.Now().Add(20 * time.Second)
	type result struct {
		txns, reconnects int
		err              error
	}
	results := make(chan result, workers)
	for i := range workers {
		tok := mint(t, st, fmt.Sprintf("reporter-%d", i))
		go func() {
			var r result
			defer func() { results <- r }()
			for time.Now().Before(stop) {
				c, err := pgx.Connect(ctx, st.ConnString("report", tok))
				if err != nil {
					r.err = fmt.Errorf("connect after %d transactions: %w", r.txns, err)
					return
				}
				r.reconnects++
				for range 200 { // a while on one session, across rotations
					var user string
					if err := c.QueryRow(ctx, "select current_user").Scan(&user); err != nil {
						r.err = fmt.Errorf("query: %w", err)
						c.Close(ctx)
						return
					}
					if user != "app_report" {
						r.err = fmt.Errorf("ran as %s", user)
					}
					r.txns++
					time.Sleep(5 * time.Millisecond)
				}
				c.Close(ctx)
			}
		}()
	}
	seen := map[string]bool{password(): true}
	for time.Now().Before(stop) {
		time.Sleep(3 * time.Second)
		if _, err := vc.Logical().Write("database/rotate-role/app-report", nil); err != nil {
			t.Fatal(err)
		}
		seen[password()] = true
	}
	var txns, reconnects int
	for range workers {
		r := <-results
		if r.err != nil {
			t.Error(r.err)
		}
		txns, reconnects = txns+r.txns, reconnects+r.reconnects
	}
	t.Logf("%d queries over %d connections while Vault used %d passwords", txns, reconnects, len(seen))
	if len(seen) < 5 {
		t.Fatalf("only %d passwords: the rotation did not happen", len(seen))
	}
}

// The NOTICE comes token_expiry_notice before the token expires, not
// before: a session well inside its token's life hears nothing.
func TestTokenExpiryNoticeComesAtItsLeadTime(t *testing.T) {
	st := ownStack(t, func(c *config.Config) { c.TokenExpiryNotice = config.Duration(3 * time.Second) })
	ctx := context.Background()
	tok, err := st.Issuer.Mint(testenv.Claims{Subject: "nora", Groups: []string{"analyst"}, TTL: 9 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := pgx.ParseConfig(st.ConnString("reader", tok))
	if err != nil {
		t.Fatal(err)
	}
	var notices atomic.Int32
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
		if strings.Contains(n.Message, "token expires") {
			notices.Add(1)
		}
	}
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	time.Sleep(2 * time.Second) // ~7s left: no notice yet
	queryString(t, c, "select 1::text")
	if n := notices.Load(); n != 0 {
		t.Fatalf("%d notices with ~7s of the token left and a 3s lead", n)
	}
	time.Sleep(5 * time.Second) // ~2s left: inside the lead
	queryString(t, c, "select 1::text")
	if n := notices.Load(); n != 1 {
		t.Fatalf("%d notices inside the lead time, want 1", n)
	}
}

// A shared (role-scoped) lease revoked behind pgwarden's back while
// clients use it: the revocation ends its sessions (the level's revocation
// statements terminate them), and the very next new connection gets fresh
// credentials, under load, without waiting for anything.
func TestRevokedSharedLeaseUnderLoad(t *testing.T) {
	st := ownStack(t, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	first := connectTo(t, st, "shared", mint(t, st, "load-0"))
	old := queryString(t, first, "select current_user")
	first.Close(ctx)
	var wg sync.WaitGroup
	for i := range 4 {
		tok := mint(t, st, fmt.Sprintf("load-%d", i+1))
		wg.Add(1)
		go func() { // busy sessions of the shared lease, reconnecting when ended
			defer wg.Done()
			for ctx.Err() == nil {
				c, err := pgx.Connect(ctx, st.ConnString("shared", tok))
				if err != nil {
					continue
				}
				for ctx.Err() == nil {
					if _, err := c.Exec(ctx, "select 1"); err != nil {
						break
					}
				}
				c.Close(context.Background())
			}
		}()
	}
	time.Sleep(time.Second)
	vc, err := st.Vault.Client()
	if err != nil {
		t.Fatal(err)
	}
	if err := vc.Sys().RevokePrefixWithContext(ctx, "database/creds/app-shared"); err != nil {
		t.Fatal(err)
	}
	next := connectTo(t, st, "shared", mint(t, st, "after"))
	var n int
	if err := next.QueryRow(ctx, "select count(*) from items").Scan(&n); err != nil {
		t.Fatalf("the first connection after the revocation: %v", err)
	}
	if u := queryString(t, next, "select current_user"); u == old {
		t.Fatalf("still %s, whose lease was revoked", u)
	}
	cancel()
	wg.Wait()
}
