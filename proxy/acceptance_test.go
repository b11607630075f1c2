package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/pgwarden/pgwarden/internal/app"
	"github.com/pgwarden/pgwarden/testenv"
)

func TestPsqlGetsDynamicRoleOverVerifiedTLS(t *testing.T) {
	st := needStack(t)
	psql, err := exec.LookPath("psql")
	if err != nil {
		t.Fatal("psql not found: install Debian's postgresql-client (make deps)")
	}
	_, port, _ := net.SplitHostPort(st.App.Addr())
	cmd := exec.Command(psql, "-X", "-A", "-t", "-U", "reader", "-c",
		"select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()")
	cmd.Env = append(os.Environ(), "PGHOST=localhost", "PGPORT="+port, "PGDATABASE=app",
		"PGSSLMODE=verify-full", "PGSSLROOTCERT="+st.Certs.CAFile, "PGPASSWORD="+token(t, "alice", "analyst"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("psql: %v\n%s", err, out)
	}
	user, _, _ := strings.Cut(strings.TrimSpace(string(out)), "|")
	if user == "" || user == "reader" {
		t.Fatalf("psql current_user = %q, want a dynamic role", out)
	}
}

func TestReaderCannotWrite(t *testing.T) {
	needStack(t)
	c := connect(t, "reader", token(t, "alice", "analyst"))
	ctx := context.Background()
	_, err := c.Exec(ctx, "insert into items (name) values ('nope')")
	if got := sqlstate(err); got != "42501" {
		t.Errorf("reader INSERT: err = %v (SQLSTATE %q), want 42501", err, got)
	}
	_, err = c.Exec(ctx, "create table reader_was_here (id int)")
	if got := sqlstate(err); got != "42501" {
		t.Errorf("reader CREATE TABLE: err = %v (SQLSTATE %q), want 42501", err, got)
	}
}

func TestWriterCommitIsSeenByAnotherIdentity(t *testing.T) {
	needStack(t)
	name := fmt.Sprintf("written-%d", time.Now().UnixNano())
	w := connect(t, "writer", token(t, "bob", "engineer"))
	if _, err := w.Exec(context.Background(), "insert into items (name) values ($1)", name); err != nil {
		t.Fatal(err)
	}
	w.Close(context.Background())

	r := connect(t, "reader", token(t, "carol", "analyst"))
	var n int
	if err := r.QueryRow(context.Background(), "select count(*) from items where name = $1", name).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Fatalf("reader sees %d rows named %q, want the writer's committed row", n, name)
	}
}

func TestUncommittedWorkIsNeverHandedToTheNextClient(t *testing.T) {
	needStack(t)
	ctx := context.Background()
	name := fmt.Sprintf("uncommitted-%d", time.Now().UnixNano())
	w := connect(t, "writer", token(t, "bob", "engineer"))
	if _, err := w.Exec(ctx, "begin"); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Exec(ctx, "insert into items (name) values ($1)", name); err != nil {
		t.Fatal(err)
	}
	w.Close(ctx) // Terminate inside a transaction: the upstream must be closed, not pooled.

	// Whichever upstream the next writers get, none is inside that transaction.
	for i := range 3 {
		c := connect(t, "writer", token(t, fmt.Sprintf("dave%d", i), "engineer"))
		var n int
		if err := c.QueryRow(ctx, "select count(*) from items where name = $1", name).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 0 {
			t.Fatalf("client %d sees %d uncommitted rows of another client", i, n)
		}
		// Not inside the abandoned transaction: BEGIN would warn, and
		// txStatus would be 'T' at the start.
		if st := c.PgConn().TxStatus(); st != 'I' {
			t.Fatalf("client %d starts with transaction status %q", i, st)
		}
		c.Close(ctx)
	}
}

func TestStartupParametersReachTheSession(t *testing.T) {
	st := needStack(t)
	cfg, err := pgx.ParseConfig(st.ConnString("reader", token(t, "alice", "analyst")) +
		" application_name=report-runner options='-c search_path=pg_catalog,public -c statement_timeout=1234'")
	if err != nil {
		t.Fatal(err)
	}
	c, err := pgx.ConnectConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	for setting, want := range map[string]string{
		"application_name": "report-runner", "search_path": "pg_catalog,public", "statement_timeout": "1234ms",
	} {
		if got := queryString(t, c, "select current_setting('"+setting+"')"); got != want {
			t.Errorf("%s = %q, want %q", setting, got, want)
		}
	}
	if got := c.PgConn().ParameterStatus("application_name"); got != "report-runner" {
		t.Errorf("ParameterStatus application_name = %q", got)
	}
}

// refusal connects and returns the server's error.
func refusal(t *testing.T, connStr string) *pgconn.PgError {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := pgconn.Connect(ctx, connStr)
	if err == nil {
		c.Close(ctx)
		t.Fatal("connection succeeded; want a refusal")
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		t.Fatalf("err = %v, want a PostgreSQL ErrorResponse", err)
	}
	if pgErr.Severity != "FATAL" {
		t.Errorf("severity = %q, want FATAL", pgErr.Severity)
	}
	return pgErr
}

func TestRefusals(t *testing.T) {
	st := needStack(t)
	is := st.Issuer
	mint := func(c testenv.Claims) string {
		t.Helper()
		tok, err := is.Mint(c)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	foreign, err := is.MintForeign(testenv.Claims{Subject: "mallory", Groups: []string{"analyst"}})
	if err != nil {
		t.Fatal(err)
	}
	analyst := testenv.Claims{Subject: "erin", Groups: []string{"analyst"}}
	with := func(f func(*testenv.Claims)) testenv.Claims { c := analyst; f(&c); return c }

	cases := []struct {
		name, user, db, tok string
		code                string
		msg                 []string // all must appear in message+detail+hint
	}{
		{"bad signature", "reader", "app", foreign, "28P01", []string{"signature"}},
		{"expired", "reader", "app", mint(with(func(c *testenv.Claims) { c.TTL = -time.Hour })), "28P01", []string{"expired"}},
		{"not yet valid", "reader", "app", mint(with(func(c *testenv.Claims) { c.NotYet = time.Hour })), "28P01", []string{"not valid yet"}},
		{"wrong audience", "reader", "app", mint(with(func(c *testenv.Claims) { c.Audience = "someone-else" })), "28P01", []string{"audience"}},
		{"wrong issuer", "reader", "app", mint(with(func(c *testenv.Claims) { c.Issuer = "https://evil.example" })), "28P01", []string{"issuer"}},
		{"alg none", "reader", "app", mint(with(func(c *testenv.Claims) { c.Alg = "none" })), "28P01", []string{"algorithm"}},
		{"not a token", "reader", "app", "hunter2", "28P01", []string{"well-formed"}},
		{"level not granted", "writer", "app", mint(analyst), "42501", []string{`"writer"`, "grants: reader, brief, crowd"}},
		{"no level at all", "reader", "app", mint(with(func(c *testenv.Claims) { c.Groups = []string{"marketing"} })), "42501", []string{"no access level"}},
		{"unknown level", "superuser", "app", mint(analyst), "28000", []string{`"superuser"`, "grants: reader, brief, crowd"}},
		{"unknown database", "reader", "payroll", mint(analyst), "3D000", []string{`"payroll"`, "grants access to: app"}},
	}
	host, port, _ := net.SplitHostPort(st.App.Addr())
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			conn := fmt.Sprintf("host=%s port=%s dbname=%s user=%s password=%s sslmode=verify-full sslrootcert=%s",
				host, port, tc.db, tc.user, tc.tok, st.Certs.CAFile)
			pe := refusal(t, conn)
			if pe.Code != tc.code {
				t.Errorf("SQLSTATE = %s (%s), want %s", pe.Code, pe.Message, tc.code)
			}
			text := pe.Message + " | " + pe.Detail + " | " + pe.Hint
			for _, m := range tc.msg {
				if !strings.Contains(text, m) {
					t.Errorf("error %q does not mention %q", text, m)
				}
			}
			assertNoSecret(t, text, tc.tok)
		})
	}
	assertNoSecret(t, logs.String(), foreign)
	for _, tc := range cases {
		assertNoSecret(t, logs.String(), tc.tok)
	}
}

func TestCleartextFromUntrustedAddressIsRefusedBeforeTheToken(t *testing.T) {
	st := needStack(t)
	tok := token(t, "frank", "analyst")
	host, port, _ := net.SplitHostPort(st.App.Addr())
	// The stack trusts only 127.0.0.1/32, so 127.0.0.2 is an untrusted network.
	cfg, err := pgconn.ParseConfig(fmt.Sprintf("host=%s port=%s dbname=app user=reader password=%s sslmode=disable", host, port, tok))
	if err != nil {
		t.Fatal(err)
	}
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}, Timeout: 5 * time.Second}
	cfg.DialFunc = d.DialContext
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = pgconn.ConnectConfig(ctx, cfg)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "28000" || !strings.Contains(pe.Message, "encrypted connection") {
		t.Fatalf("err = %v, want 28000 asking for an encrypted connection", err)
	}
	assertNoSecret(t, pe.Message+pe.Detail+pe.Hint, tok)

	// The same client over TLS is served.
	cfg.TLSConfig = st.Certs.ClientTLS()
	c, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("over TLS from 127.0.0.2: %v", err)
	}
	c.Close(ctx)
}

func TestConcurrentClientsShareOneLease(t *testing.T) {
	st := needStack(t)
	const clients = 50
	before := vaultCalls(t, "creds")
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	users := make(chan string, clients)
	start := make(chan struct{})
	for i := range clients {
		tok := token(t, fmt.Sprintf("crowd-%02d", i), "analyst")
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c, err := pgx.Connect(ctx, st.ConnString("crowd", tok))
			if err != nil {
				errs <- fmt.Errorf("connect: %w", err)
				return
			}
			defer c.Close(ctx)
			var u string
			if err := c.QueryRow(ctx, "select current_user").Scan(&u); err != nil {
				errs <- fmt.Errorf("query: %w", err)
				return
			}
			users <- u
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	close(users)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		dumpActivity(t, st)
	}
	distinct := map[string]bool{}
	for u := range users {
		distinct[u] = true
	}
	if len(distinct) != 1 {
		t.Errorf("%d clients ran as %d database users, want one shared dynamic role", clients, len(distinct))
	}
	// Shared by everyone, it is pgwarden's, and its name says so, never a person's.
	for u := range distinct {
		if !strings.HasPrefix(u, "pgwarden-") || regexp.MustCompile(`crowd-\d\d-`).MatchString(u) {
			t.Errorf("the shared database user is %q: it should name pgwarden and the level, not a person", u)
		}
	}
	// The crowd level is used by this test alone, so on a first run all 50
	// clients race for a credential nobody has read yet: one Vault call.
	if got := vaultCalls(t, "creds") - before; got != 1 {
		t.Errorf("Vault creds calls for %d concurrent clients = %v, want 1", clients, got)
	}
	// Vault itself holds exactly one lease for the role.
	vc, err := st.Vault.Client()
	if err != nil {
		t.Fatal(err)
	}
	sec, err := vc.Logical().List("sys/leases/lookup/database/creds/app-crowd/")
	if err != nil {
		t.Fatal(err)
	}
	if sec == nil || len(sec.Data["keys"].([]any)) != 1 {
		t.Errorf("Vault leases for app-crowd = %v, want exactly 1", sec)
	}
}

// idleSessions is how many upstream sessions of (app, level) the stack's
// pgwarden holds idle, from its metrics.
func idleSessions(t *testing.T, level string) int {
	t.Helper()
	m := metric(t, "pgwarden_pool_connections", map[string]string{"database": "app", "level": level, "state": "idle"})
	if m == nil {
		return 0
	}
	return int(m.GetGauge().GetValue())
}

// vaultCalls is how many Vault calls of op the stack's pgwarden made.
func vaultCalls(t *testing.T, op string) float64 {
	t.Helper()
	m := metric(t, "pgwarden_vault_request_duration_seconds", map[string]string{"op": op})
	if m == nil {
		return 0
	}
	return float64(m.GetHistogram().GetSampleCount())
}

// metric is the shared stack's pgwarden's series of name with labels, or nil.
func metric(t *testing.T, name string, labels map[string]string) *dto.Metric {
	t.Helper()
	return metricIn(t, stack, name, labels)
}

// metricIn is st's pgwarden's series of name with labels, or nil.
func metricIn(t *testing.T, st *testenv.Stack, name string, labels map[string]string) *dto.Metric {
	t.Helper()
	mfs, err := st.App.Metrics().Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if want, ok := labels[l.GetName()]; ok && want != l.GetValue() {
					continue series
				}
			}
			return m
		}
	}
	return nil
}

func TestCancelReachesTheRightBackend(t *testing.T) {
	needStack(t)
	c := connect(t, "reader", token(t, "grace", "analyst"))
	other := connect(t, "reader", token(t, "heidi", "analyst"))
	ctx := context.Background()
	done := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, "select pg_sleep(30)")
		done <- err
	}()
	// Wait until the sleep is running on the server.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int // another person's query text is for a superuser's eyes only
		if err := superuserQuery(ctx, stack, "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'", &n); err != nil {
			t.Fatal(err)
		}
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("pg_sleep never started")
		}
		time.Sleep(20 * time.Millisecond)
	}
	sent := time.Now()
	if err := c.PgConn().CancelRequest(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if sqlstate(err) != "57014" {
			t.Fatalf("cancelled query: err = %v, want 57014 query_canceled", err)
		}
		t.Logf("pg_sleep(30) cancelled through pgwarden %v after the CancelRequest", time.Since(sent).Round(time.Millisecond))
	case <-time.After(15 * time.Second):
		t.Fatal("pg_sleep(30) still running 15s after the cancel: the CancelRequest did not reach its backend")
	}
	// The session survives its cancel; the bystander was untouched.
	if got := queryString(t, c, "select 'alive'"); got != "alive" {
		t.Fatal(got)
	}
	if got := queryString(t, other, "select 'untouched'"); got != "untouched" {
		t.Fatal(got)
	}
}

func TestExpiredLeaseIsNeverReused(t *testing.T) {
	st := needStack(t)
	ctx := context.Background()
	first := connect(t, "brief", token(t, "ivan", "analyst"))
	oldUser := queryString(t, first, "select current_user")
	idle := connect(t, "brief", token(t, "judy", "analyst")) // stays open across the lease's end
	queryString(t, idle, "select current_user")              // attached: a session-mode client holds its server from its first message
	first.Close(ctx)                                         // its upstream goes back to the pool

	// Wait for the lease to end and Vault to drop the role.
	deadline := time.Now().Add(briefTTL + 30*time.Second)
	for {
		var n int
		if err := superuserQuery(ctx, st, "select count(*) from pg_roles where rolname = '"+oldUser+"'", &n); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Vault did not drop %s after its %v lease", oldUser, briefTTL)
		}
		time.Sleep(500 * time.Millisecond)
	}

	next := connect(t, "brief", token(t, "ivan", "analyst"))
	newUser := queryString(t, next, "select current_user")
	if newUser == oldUser {
		t.Fatalf("after the lease ended, a client got %s again: a pooled connection of a dropped role", oldUser)
	}
	var n int
	if err := next.QueryRow(ctx, "select count(*) from items").Scan(&n); err != nil {
		t.Fatalf("fresh credentials cannot read: %v", err)
	}
	// The session that stayed open past its credential's end was closed, not
	// left running as a dropped role.
	if _, err := idle.Exec(ctx, "select count(*) from items"); err == nil {
		t.Fatal("a session outlived its credential's lease")
	}
}

func superuserQuery(ctx context.Context, st *testenv.Stack, sql string, dst any) error {
	c, err := pgx.Connect(ctx, st.PG.DSN("app"))
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	return c.QueryRow(ctx, sql).Scan(dst)
}

func TestMetricsEndpointServesAuthResults(t *testing.T) {
	st := needStack(t)
	connect(t, "reader", token(t, "kim", "analyst")).Close(context.Background())
	if n := testutil.CollectAndCount(st.App.Metrics().Registry(), "pgwarden_auth_total"); n == 0 {
		t.Fatal("no pgwarden_auth_total series")
	}
	resp, err := http.Get("http://" + st.App.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	out, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", resp.StatusCode, err)
	}
	for _, want := range []string{`pgwarden_auth_total{database="app",level="reader",result="ok"}`, "pgwarden_pool_connections", "pgwarden_vault_request_duration_seconds_bucket"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

func assertNoSecret(t *testing.T, text, secret string) {
	t.Helper()
	if len(secret) < 8 {
		return
	}
	// A token's signature is its secret part; its payload alone is not a credential.
	parts := strings.Split(secret, ".")
	for _, p := range []string{secret, parts[len(parts)-1]} {
		if len(p) >= 8 && strings.Contains(text, p) {
			t.Fatalf("a token appears in client-visible text or logs")
		}
	}
}

// dumpActivity logs what every backend of the app database is doing, to
// diagnose a client that got no answer.
func dumpActivity(t *testing.T, st *testenv.Stack) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, st.PG.DSN("app"))
	if err != nil {
		t.Logf("pg_stat_activity: %v", err)
		return
	}
	defer c.Close(ctx)
	rows, err := c.Query(ctx, "select pid, usename, coalesce(state, ''), coalesce(wait_event_type, ''), coalesce(wait_event, ''), left(query, 60) from pg_stat_activity where datname = 'app' and pid <> pg_backend_pid()")
	if err != nil {
		t.Logf("pg_stat_activity: %v", err)
		return
	}
	defer rows.Close()
	for rows.Next() {
		var pid int
		var user, state, wt, we, q string
		_ = rows.Scan(&pid, &user, &state, &wt, &we, &q)
		t.Logf("backend %d %s %s %s/%s %q", pid, user, state, wt, we, q)
	}
}

func TestUnixSocketIsTrustedWithoutTLS(t *testing.T) {
	st := needStack(t)
	_, port, _ := net.SplitHostPort(st.App.Addr())
	c, err := pgx.Connect(context.Background(), fmt.Sprintf("host=%s port=%s dbname=app user=reader password=%s sslmode=disable",
		socketDir, port, token(t, "liam", "analyst")))
	if err != nil {
		t.Fatalf("over the unix socket: %v", err)
	}
	defer c.Close(context.Background())
	if u := queryString(t, c, "select current_user"); !strings.HasPrefix(u, "v-") {
		t.Fatalf("current_user = %q", u)
	}
}

func TestShutdownDrainsSessionsAndRefusesNewOnes(t *testing.T) {
	st := needStack(t)
	// A second pgwarden on the same components, so this test can stop it.
	cfg := *st.Config
	cfg.Listen, cfg.MetricsListen, cfg.UnixSocketDir = "127.0.0.1:0", "off", ""
	ctx := context.Background()
	a, err := app.New(ctx, &cfg, newJSONLogger(io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(a.Addr())
	conn := fmt.Sprintf("host=%s port=%s dbname=app user=reader password=%s sslmode=verify-full sslrootcert=%s",
		host, port, token(t, "mia", "analyst"), st.Certs.CAFile)
	c, err := pgx.Connect(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "begin"); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		done <- a.Shutdown(sctx)
	}()
	// New clients are refused while the open session keeps working.
	deadline := time.Now().Add(10 * time.Second)
	for {
		nc, err := net.DialTimeout("tcp", a.Addr(), time.Second)
		if err != nil {
			break
		}
		nc.Close()
		if time.Now().After(deadline) {
			t.Fatal("still accepting 10s after Shutdown began")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := c.Exec(ctx, "select count(*) from items"); err != nil {
		t.Fatalf("a draining session failed: %v", err)
	}
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned (%v) while a session was still open", err)
	default:
	}
	if _, err := c.Exec(ctx, "commit"); err != nil {
		t.Fatal(err)
	}
	c.Close(ctx)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Shutdown after the last session ended: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Shutdown did not return after the last session ended")
	}
}

// A startup setting PostgreSQL rejects is refused with PostgreSQL's own
// SQLSTATE and message, as a direct connection would be.
func TestRejectedStartupSettingPassesPostgresErrorThrough(t *testing.T) {
	st := needStack(t)
	pe := refusal(t, st.ConnString("reader", token(t, "nina", "analyst"))+" options='-c statement_timeout=banana'")
	if pe.Code != "22023" || !strings.Contains(pe.Message, "statement_timeout") {
		t.Fatalf("got %s %q, want PostgreSQL's 22023 about statement_timeout", pe.Code, pe.Message)
	}
	// The pool is not poisoned: the next client is served.
	if u := queryString(t, connect(t, "reader", token(t, "nina", "analyst")), "select current_user"); !strings.HasPrefix(u, "v-") {
		t.Fatalf("current_user = %q", u)
	}
}
