package proxy_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

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
	if code := readyz(t, st); code != http.StatusOK {
		t.Fatalf("/readyz after the outage: %d, want 200", code)
	}
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
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := st.App.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	vc, err := st.Vault.Client()
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, func() bool {
		sec, err := vc.Logical().List("sys/leases/lookup/database/creds/app-spin/")
		return err == nil && (sec == nil || len(sec.Data["keys"].([]any)) == 0)
	}, "a lease of the run outlived it")
}

// vaultCallsOf is how many Vault calls of op st's pgwarden made.
func vaultCallsOf(t *testing.T, st *testenv.Stack, op string) float64 {
	t.Helper()
	mfs, err := st.App.Metrics().Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "pgwarden_vault_request_duration_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "op" && l.GetValue() == op {
					return float64(m.GetHistogram().GetSampleCount())
				}
			}
		}
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
