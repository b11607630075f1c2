package app_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/testenv"
)

// series is one scraped sample: its labels and value.
type series struct {
	labels map[string]string
	value  float64
}

// scrape is /metrics parsed: samples by name (a histogram's _count and _sum
// under their own names).
type scrape map[string][]series

// scrapeMetrics GETs /metrics from addr and parses the text exposition
// format (only what pgwarden's own metrics use: label values without
// escapes).
func scrapeMetrics(t *testing.T, addr string) scrape {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	out := scrape{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		sp := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[sp+1:], 64)
		if err != nil {
			t.Fatalf("/metrics line %q: %v", line, err)
		}
		name, labels := line[:sp], map[string]string{}
		if i := strings.IndexByte(name, '{'); i >= 0 {
			for _, kv := range strings.Split(strings.TrimSuffix(name[i+1:], "}"), ",") {
				if k, val, ok := strings.Cut(kv, "="); ok {
					labels[k] = strings.Trim(val, `"`)
				}
			}
			name = name[:i]
		}
		out[name] = append(out[name], series{labels: labels, value: v})
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// get is the value of the one series of name whose labels include want
// ("k=v" each); a series that is absent reads as 0 (a labelled counter or
// gauge nothing has touched yet).
func (s scrape) get(t *testing.T, name string, want ...string) float64 {
	t.Helper()
	var found []float64
series:
	for _, sr := range s[name] {
		for _, kv := range want {
			k, v, _ := strings.Cut(kv, "=")
			if sr.labels[k] != v {
				continue series
			}
		}
		found = append(found, sr.value)
	}
	switch len(found) {
	case 0:
		return 0
	case 1:
		return found[0]
	}
	t.Fatalf("%s%v matches %d series", name, want, len(found))
	return 0
}

// mustHave fails t unless name is exported at all.
func (s scrape) mustHave(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if len(s[n]) == 0 {
			t.Errorf("/metrics has no %s", n)
		}
	}
}

// A scripted workload against a real pgwarden (real PostgreSQL, Vault and
// OIDC issuer; pgconn as the client), then /metrics: each metric moved as
// much as the workload implies — counts, not mere presence.
func TestMetricsFollowAScriptedWorkload(t *testing.T) {
	dir := t.TempDir()
	st := testenv.NewStack(t, testenv.StackOptions{Dir: dir, Configure: func(c *config.Config) {
		// One server for the reader pool, so a second client must queue; the
		// waits are bounded generously, as other tests share the machine.
		c.Pool.MaxPerPool = 1
		c.Pool.AcquireTimeout = config.Duration(2 * time.Minute)
		c.AuthTimeout = config.Duration(3 * time.Minute)
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	maddr := st.App.MetricsAddr()

	alice, err := st.Token("alice", "analyst")
	if err != nil {
		t.Fatal(err)
	}
	bob, err := st.Token("bob", "nobody") // grants no level
	if err != nil {
		t.Fatal(err)
	}

	// What the workload implies, counted as it runs.
	var (
		logins, refusedTokens, connections int
		statements, xacts                  int
		received                           int // bytes of the client's Query messages
	)
	connect := func() *pgconn.PgConn {
		t.Helper()
		c, err := pgconn.Connect(ctx, st.ConnString("reader", alice))
		if err != nil {
			t.Fatalf("alice as reader: %v", err)
		}
		logins++
		connections++
		return c
	}
	// exec runs one simple Query; ends says whether it ends a transaction
	// (ReadyForQuery 'I').
	exec := func(c *pgconn.PgConn, sql string, ends bool) error {
		t.Helper()
		_, err := c.Exec(ctx, sql).ReadAll()
		statements++
		received += 1 + 4 + len(sql) + 1
		if ends {
			xacts++
		}
		return err
	}
	closeConn := func(c *pgconn.PgConn) {
		t.Helper()
		if err := c.Close(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// settle waits for every client connection to have ended inside
	// pgwarden: its traffic counted, its server back in the pool.
	settle := func() scrape {
		t.Helper()
		deadline := time.Now().Add(time.Minute)
		for {
			s := scrapeMetrics(t, maddr)
			if s.get(t, "pgwarden_client_connections") == 0 && s.get(t, "pgwarden_pool_connections", "state=active") == 0 {
				return s
			}
			if time.Now().After(deadline) {
				t.Fatal("client connections still open inside pgwarden a minute after they closed")
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	before := scrapeMetrics(t, maddr)
	before.mustHave(t, "pgwarden_client_connections", "pgwarden_client_connections_total",
		"pgwarden_token_verify_duration_seconds_count", "pgwarden_cancel_requests_total",
		"pgwarden_lease_events_total", "pgwarden_leases", "pgwarden_transactions_total", "pgwarden_queries_total",
		"pgwarden_client_received_bytes_total", "pgwarden_client_sent_bytes_total", "go_goroutines", "process_cpu_seconds_total")
	for _, name := range []string{"pgwarden_transactions_total", "pgwarden_queries_total",
		"pgwarden_client_received_bytes_total", "pgwarden_client_sent_bytes_total"} {
		if v := before.get(t, name, "database=app"); v != 0 {
			t.Fatalf("%s before any client = %v", name, v)
		}
	}

	// Three sessions one after the other: an autocommit statement and an
	// explicit transaction each.
	for range 3 {
		c := connect()
		for _, q := range []struct {
			sql  string
			ends bool
		}{{"select 1", true}, {"begin", false}, {"select count(*) from items", false}, {"commit", true}} {
			if err := exec(c, q.sql, q.ends); err != nil {
				t.Fatalf("%s: %v", q.sql, err)
			}
		}
		closeConn(c)
		settle()
	}

	// Refused: two malformed tokens (28P01), a token that grants no level
	// (42501, verified first).
	for _, try := range []struct{ password, code string }{{"not-a-token", "28P01"}, {"nor-this", "28P01"}, {bob, "42501"}} {
		_, err := pgconn.Connect(ctx, st.ConnString("reader", try.password))
		connections++
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != try.code {
			t.Fatalf("a refused login: %v, want SQLSTATE %s", err, try.code)
		}
		if try.code == "28P01" {
			refusedTokens++
		}
	}
	settle()

	// Queued: one client holds the only server inside a transaction; the
	// second waits for it.
	holder := connect()
	if err := exec(holder, "begin", false); err != nil {
		t.Fatal(err)
	}
	if err := exec(holder, "select 1", false); err != nil {
		t.Fatal(err)
	}
	queued := make(chan *pgconn.PgConn, 1)
	queueErr := make(chan error, 1)
	go func() {
		c, err := pgconn.Connect(ctx, st.ConnString("reader", alice))
		if err != nil {
			queueErr <- err
			return
		}
		queued <- c
	}()
	deadline := time.Now().Add(time.Minute)
	for {
		s := scrapeMetrics(t, maddr)
		if s.get(t, "pgwarden_pool_waiting_clients", "database=app", "level=reader") == 1 {
			if n := s.get(t, "pgwarden_pool_wait_duration_seconds_count", "database=app"); n != 0 {
				t.Fatalf("a wait observed (%v) before it ended", n)
			}
			break
		}
		select {
		case err := <-queueErr:
			t.Fatalf("the second client: %v", err)
		case c := <-queued:
			c.Close(ctx)
			t.Fatal("the second client got a server while the only one was lent")
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("pgwarden_pool_waiting_clients never showed the queued client")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := exec(holder, "commit", true); err != nil {
		t.Fatal(err)
	}
	closeConn(holder)
	var second *pgconn.PgConn
	select {
	case second = <-queued:
	case err := <-queueErr:
		t.Fatalf("the queued client: %v", err)
	case <-ctx.Done():
		t.Fatal("the queued client was never served")
	}
	logins++
	connections++
	if err := exec(second, "select 1", true); err != nil {
		t.Fatal(err)
	}
	closeConn(second)
	settle()

	// Cancelled: a long query, cancelled through pgwarden; and a cancel
	// request with a key pgwarden never gave out.
	sleeper := connect()
	sleepDone := make(chan error, 1)
	go func() { sleepDone <- exec(sleeper, "select pg_sleep(30)", true) }()
	running := time.Now().Add(time.Minute)
	for {
		var n int
		if err := superuserCount(ctx, st, "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'", &n); err != nil {
			t.Fatal(err)
		}
		if n == 1 {
			break
		}
		if time.Now().After(running) {
			t.Fatal("pg_sleep(30) never started")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := sleeper.CancelRequest(ctx); err != nil {
		t.Fatal(err)
	}
	connections++ // the cancel request's own connection
	var pgErr *pgconn.PgError
	if err := <-sleepDone; !errors.As(err, &pgErr) || pgErr.Code != "57014" {
		t.Fatalf("the cancelled query: %v, want 57014", err)
	}
	closeConn(sleeper)
	bogusCancel(t, st.App.Addr())
	connections++

	// Reloads: the same file again (applied), then a broken one (rejected).
	if err := st.App.Reload(ctx, "test"); err != nil {
		t.Fatalf("reload: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "pgwarden.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := st.App.Reload(ctx, "test"); err == nil {
		t.Fatal("a broken configuration file was reloaded")
	}

	after := settle()
	verified := logins + 1 // bob's token verifies; his level is what is refused
	sent := after.get(t, "pgwarden_client_sent_bytes_total", "database=app")
	for _, c := range []struct {
		what      string
		got, want float64
	}{
		{"connections accepted", after.get(t, "pgwarden_client_connections_total"), float64(connections)},
		{"logins ok", after.get(t, "pgwarden_auth_total", "database=app", "level=reader", "result=ok"), float64(logins)},
		{"logins refused: malformed token", after.get(t, "pgwarden_auth_total", "database=app", "result=malformed"), float64(refusedTokens)},
		{"logins refused: no grant", after.get(t, "pgwarden_auth_total", "database=app", "result=no_grant"), 1},
		{"token verifications ok", after.get(t, "pgwarden_token_verify_duration_seconds_count", "result=ok"), float64(verified)},
		{"token verifications refused", after.get(t, "pgwarden_token_verify_duration_seconds_count", "result=refused"), float64(refusedTokens)},
		{"transactions", after.get(t, "pgwarden_transactions_total", "database=app"), float64(xacts)},
		{"queries", after.get(t, "pgwarden_queries_total", "database=app"), float64(statements)},
		{"bytes received from clients", after.get(t, "pgwarden_client_received_bytes_total", "database=app"), float64(received)},
		{"clients that queued", after.get(t, "pgwarden_pool_wait_duration_seconds_count", "database=app"), 1},
		{"clients queued now", after.get(t, "pgwarden_pool_waiting_clients", "database=app", "level=reader"), 0},
		{"idle servers", after.get(t, "pgwarden_pool_connections", "database=app", "level=reader", "state=idle"), 1},
		{"cancels forwarded", after.get(t, "pgwarden_cancel_requests_total", "result=forwarded"), 1},
		{"cancels with an unknown key", after.get(t, "pgwarden_cancel_requests_total", "result=unknown"), 1},
		{"cancels failed", after.get(t, "pgwarden_cancel_requests_total", "result=failed"), 0},
		// One person, one token: one Vault login, one lease, still in use
		// by the pooled server.
		{"Vault logins", after.get(t, "pgwarden_vault_request_duration_seconds_count", "op=login"), 1},
		{"Vault credential reads", after.get(t, "pgwarden_vault_request_duration_seconds_count", "op=creds"), 1},
		{"leases issued", after.get(t, "pgwarden_lease_events_total", "event=issued"), 1},
		{"leases revoked", after.get(t, "pgwarden_lease_events_total", "event=revoked"), 0},
		{"leases expired", after.get(t, "pgwarden_lease_events_total", "event=expired"), 0},
		{"leases active", after.get(t, "pgwarden_leases", "state=active"), 1},
		{"leases retired", after.get(t, "pgwarden_leases", "state=retired"), 0},
		{"reloads applied", after.get(t, "pgwarden_config_reloads_total", "result=ok"), 1},
		{"reloads rejected", after.get(t, "pgwarden_config_reloads_total", "result=rejected"), 1},
	} {
		if c.got != c.want {
			t.Errorf("%s: %v, want %v", c.what, c.got, c.want)
		}
	}
	// Every statement is answered with a ReadyForQuery (6 bytes) at least.
	if sent < float64(6*statements) {
		t.Errorf("bytes sent to clients: %v, want at least %d for %d statements", sent, 6*statements, statements)
	}
	if w := after.get(t, "pgwarden_pool_wait_duration_seconds_sum", "database=app"); w <= 0 {
		t.Errorf("the queued client's wait summed to %v", w)
	}
	// No label carries a subject or token.
	for name, ss := range after {
		for _, sr := range ss {
			for k, v := range sr.labels {
				if strings.Contains(v, "alice") || strings.Contains(v, "bob") || (len(v) > 20 && strings.Contains(alice, v)) {
					t.Errorf("%s has label %s=%q", name, k, v)
				}
			}
		}
	}
}

// superuserCount runs a count query on the app database as PostgreSQL's
// superuser, beside pgwarden.
func superuserCount(ctx context.Context, st *testenv.Stack, sql string, n *int) error {
	c, err := pgconn.Connect(ctx, st.PG.DSN("app"))
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	res, err := c.Exec(ctx, sql).ReadAll()
	if err != nil {
		return err
	}
	if len(res) != 1 || len(res[0].Rows) != 1 {
		return fmt.Errorf("%s: unexpected result", sql)
	}
	*n, err = strconv.Atoi(string(res[0].Rows[0][0]))
	return err
}

// bogusCancel sends pgwarden a CancelRequest with a key it never gave out
// and waits for it to close the connection, as PostgreSQL does.
func bogusCancel(t *testing.T, addr string) {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	buf, err := (&pgproto3.CancelRequest{ProcessID: 1, SecretKey: []byte{1, 2, 3, 4}}).Encode(nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = nc.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := nc.Write(buf); err != nil {
		t.Fatal(err)
	}
	if n, err := io.Copy(io.Discard, nc); err != nil || n != 0 {
		t.Fatalf("after a cancel request pgwarden sent %d bytes (%v); want none, then close", n, err)
	}
}
