package proxy_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/proxy"
)

// The tests in this file run clients in transaction mode against the real
// PostgreSQL of the shared stack: more clients than servers, so each
// transaction may land on another server.

// txnProxy serves database app with level reader in mode, at most servers
// upstream sessions, all under one credential (so clients share servers).
func txnProxy(t *testing.T, mode string, servers int) (*proxy.Server, string) {
	t.Helper()
	st := needStack(t)
	cred := pgRole(t, st)
	routes := appRoute(st, "")
	r := routes["app"]
	r.Modes = map[string]string{"reader": mode, "writer": mode}
	routes["app"] = r
	return startProxy(t, proxy.Config{Routes: routes, Credentials: fixedCred(cred),
		Pool: pool.Config{MaxPerPool: servers, MaxTotal: servers}})
}

func pgxConnect(t *testing.T, addr, subject string, mode pgx.QueryExecMode) *pgx.Conn {
	t.Helper()
	host, port, _ := net.SplitHostPort(addr)
	cfg, err := pgx.ParseConfig(fmt.Sprintf("host=%s port=%s dbname=app user=reader password=%s sslmode=disable", host, port, subject))
	if err != nil {
		t.Fatal(err)
	}
	cfg.DefaultQueryExecMode = mode
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// TestTxnPgxStatementCacheAcrossServers: pgx with its default statement
// cache, 8 clients over 2 servers, thousands of queries: every answer right,
// no "prepared statement does not exist".
func TestTxnPgxStatementCacheAcrossServers(t *testing.T) {
	_, addr := txnProxy(t, proxy.PoolTransaction, 2)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		c := pgxConnect(t, addr, fmt.Sprintf("user%d", i), pgx.QueryExecModeCacheStatement)
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := context.Background()
			for j := range 300 {
				var got int
				var s string
				switch j % 3 {
				case 0:
					if err := c.QueryRow(ctx, "SELECT $1::int + 1", j).Scan(&got); err != nil || got != j+1 {
						errs <- fmt.Errorf("client %d query %d: %v (got %d)", i, j, err, got)
						return
					}
				case 1:
					if err := c.QueryRow(ctx, "SELECT $1::text || 'x'", fmt.Sprint(j)).Scan(&s); err != nil || s != fmt.Sprint(j)+"x" {
						errs <- fmt.Errorf("client %d query %d: %v (got %q)", i, j, err, s)
						return
					}
				case 2:
					if err := c.QueryRow(ctx, "SELECT count(*)::int FROM items WHERE id > $1", -j).Scan(&got); err != nil || got < 2 {
						errs <- fmt.Errorf("client %d query %d: %v (got %d)", i, j, err, got)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// pgbenchScript runs without pgbench's tables: one parameterised SELECT.
const pgbenchScript = "\\set v random(1, 100000)\nSELECT :v::int + 1, current_setting('pgwarden.subject');\n"

// TestTxnPgbenchEveryProtocol: pgbench through pgwarden in both modes with
// -M simple, extended and prepared at 1, 8, 32 and 64 clients: no errors.
func TestTxnPgbenchEveryProtocol(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "select.sql")
	if err := os.WriteFile(script, []byte(pgbenchScript), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{proxy.PoolTransaction, proxy.PoolSession} {
		servers := 4
		if mode == proxy.PoolSession {
			servers = 64
		}
		_, addr := txnProxy(t, mode, servers)
		host, port, _ := net.SplitHostPort(addr)
		for _, proto := range []string{"simple", "extended", "prepared"} {
			for _, clients := range []int{1, 8, 32, 64} {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				cmd := exec.CommandContext(ctx, "pgbench", "-n", "-h", host, "-p", port, "-U", "reader",
					"-M", proto, "-c", fmt.Sprint(clients), "-j", "2", "-t", "50", "-f", script, "app")
				cmd.Env = append(os.Environ(), "PGPASSWORD=bench", "PGSSLMODE=disable")
				out, err := cmd.CombinedOutput()
				cancel()
				if err != nil || !strings.Contains(string(out), "number of failed transactions: 0") {
					t.Errorf("%s mode, -M %s, %d clients: %v\n%s", mode, proto, clients, err, out)
				}
			}
		}
	}
}

// rlsTable creates app.rls_notes with a policy on pgwarden.subject, once.
var rlsOnce sync.Once

func rlsTable(t *testing.T) {
	t.Helper()
	st := needStack(t)
	var err error
	rlsOnce.Do(func() {
		err = st.PG.Exec(context.Background(), "app", `
CREATE TABLE rls_notes (owner text NOT NULL, body text NOT NULL);
ALTER TABLE rls_notes OWNER TO app_owner;
ALTER TABLE rls_notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON rls_notes USING (owner = current_setting('pgwarden.subject', true));
GRANT SELECT ON rls_notes TO app_read;
INSERT INTO rls_notes VALUES ('alice', 'a1'), ('alice', 'a2'), ('bob', 'b1');`)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestRLSSubjectsSharingACredentialSeeTheirOwnRows: two people on one
// database user, in both modes, one server in transaction mode so their
// transactions take turns on it.
func TestRLSSubjectsSharingACredentialSeeTheirOwnRows(t *testing.T) {
	rlsTable(t)
	for _, mode := range []string{proxy.PoolTransaction, proxy.PoolSession} {
		t.Run(mode, func(t *testing.T) {
			servers := 1
			if mode == proxy.PoolSession {
				servers = 2
			}
			_, addr := txnProxy(t, mode, servers)
			ctx := context.Background()
			alice := pgxConnect(t, addr, "alice", pgx.QueryExecModeCacheStatement)
			bob := pgxConnect(t, addr, "bob", pgx.QueryExecModeSimpleProtocol)
			for i := range 20 {
				for _, c := range []struct {
					conn *pgx.Conn
					want int
				}{{alice, 2}, {bob, 1}} {
					var n int
					if i%2 == 0 {
						if err := c.conn.QueryRow(ctx, "SELECT count(*)::int FROM rls_notes").Scan(&n); err != nil {
							t.Fatal(err)
						}
					} else {
						tx, err := c.conn.Begin(ctx)
						if err != nil {
							t.Fatal(err)
						}
						if err := tx.QueryRow(ctx, "SELECT count(*)::int FROM rls_notes WHERE body <> $1", "none").Scan(&n); err != nil {
							t.Fatal(err)
						}
						if err := tx.Commit(ctx); err != nil {
							t.Fatal(err)
						}
					}
					if n != c.want {
						t.Fatalf("round %d: %s sees %d rows, want %d", i, c.conn.Config().Password, n, c.want)
					}
				}
			}
			var sub, level, groups string
			if err := alice.QueryRow(ctx, "SELECT current_setting('pgwarden.subject'), current_setting('pgwarden.level'), current_setting('pgwarden.groups')").Scan(&sub, &level, &groups); err != nil {
				t.Fatal(err)
			}
			if sub != "alice" || level != "reader" || groups != "{}" {
				t.Fatalf("identity settings: subject %q level %q groups %q", sub, level, groups)
			}
		})
	}
}

// TestForgedIdentityIsRefused: SET, set_config (simple and extended), a DO
// block and a startup option naming pgwarden.* are refused with 42501, in
// both modes, and the identity stays.
func TestForgedIdentityIsRefused(t *testing.T) {
	rlsTable(t)
	for _, mode := range []string{proxy.PoolTransaction, proxy.PoolSession} {
		t.Run(mode, func(t *testing.T) {
			_, addr := txnProxy(t, mode, 2)
			ctx := context.Background()
			alice := pgxConnect(t, addr, "alice", pgx.QueryExecModeCacheStatement)
			for _, q := range []string{
				"SET pgwarden.subject = 'bob'",
				"SELECT set_config('pgwarden.subject', 'bob', false)",
				"BEGIN; SET LOCAL pgwarden.subject = 'bob'; SELECT count(*) FROM rls_notes; COMMIT",
				"DO $$BEGIN PERFORM set_config('pgwarden.subject', 'bob', false); END$$",
				"EXPLAIN ANALYZE UPDATE pg_settings SET setting = 'bob' WHERE name = 'pgwarden.subject'",
				"SELECT set_config('pgwar' || 'den.subject', 'bob', false)",
			} {
				_, err := alice.Exec(ctx, q, pgx.QueryExecModeSimpleProtocol)
				if pgErrCode(err) != "42501" {
					t.Errorf("%s: got %v, want 42501", q, err)
				}
			}
			var s string
			err := alice.QueryRow(ctx, "SELECT set_config('pgwarden.subject', $1, false)", "bob").Scan(&s)
			if pgErrCode(err) != "42501" {
				t.Errorf("extended set_config: got %v, want 42501", err)
			}
			err = alice.QueryRow(ctx, "SELECT set_config($1, $2, false)", "pgwarden.subject", "bob").Scan(&s)
			if pgErrCode(err) != "42501" {
				t.Errorf("extended set_config with the name as a parameter: got %v, want 42501", err)
			}
			var n int
			if err := alice.QueryRow(ctx, "SELECT count(*)::int FROM rls_notes").Scan(&n); err != nil || n != 2 {
				t.Fatalf("after the attempts alice sees %d rows (%v), want 2", n, err)
			}
			host, port, _ := net.SplitHostPort(addr)
			cfg, _ := pgx.ParseConfig(fmt.Sprintf("host=%s port=%s dbname=app user=reader password=alice sslmode=disable", host, port))
			cfg.RuntimeParams["options"] = "-c pgwarden.subject=bob"
			if c, err := pgx.ConnectConfig(ctx, cfg); pgErrCode(err) != "42501" {
				if c != nil {
					c.Close(ctx)
				}
				t.Errorf("startup option pgwarden.subject: got %v, want 42501", err)
			}
		})
	}
}

// TestTxnListenIsRefused: LISTEN cannot work when the server changes.
func TestTxnListenIsRefused(t *testing.T) {
	_, addr := txnProxy(t, proxy.PoolTransaction, 1)
	c := pgxConnect(t, addr, "alice", pgx.QueryExecModeSimpleProtocol)
	_, err := c.Exec(context.Background(), "LISTEN jobs")
	if pgErrCode(err) != "0A000" || !strings.Contains(err.Error(), "LISTEN is not supported in transaction pooling mode") {
		t.Fatalf("LISTEN: %v", err)
	}
	var one int
	if err := c.QueryRow(context.Background(), "SELECT 1").Scan(&one); err != nil {
		t.Fatalf("the session goes on after the refusal: %v", err)
	}
}

// TestTxnClientLeavingMidTransactionLeavesNothing: a client that vanishes
// inside a transaction, holding a session advisory lock, a temp table, a
// session SET and an SQL-level prepared statement: its work is rolled back
// and the next client on the one server sees none of it.
func TestTxnClientLeavingMidTransactionLeavesNothing(t *testing.T) {
	st := needStack(t)
	_, addr := txnProxy(t, proxy.PoolTransaction, 1)
	ctx := context.Background()
	if err := st.PG.Exec(ctx, "postgres", "GRANT TEMPORARY ON DATABASE app TO app_read"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.PG.Exec(ctx, "postgres", "REVOKE TEMPORARY ON DATABASE app FROM app_read") })
	nc, fe := rawLogin(t, addr, "reader", "mallory")
	fe.Send(&pgproto3.Query{String: "SET search_path = pg_catalog; PREPARE leak AS SELECT 1; SELECT pg_advisory_lock(42); " +
		"BEGIN; CREATE TEMP TABLE leftover (a int); SET LOCAL work_mem = '77MB'; SELECT pg_backend_pid()"})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	var pid string
	for pid == "" {
		m, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		switch m := m.(type) {
		case *pgproto3.ErrorResponse:
			t.Fatalf("%s: %s", m.Code, m.Message)
		case *pgproto3.DataRow:
			if len(m.Values) == 1 && len(m.Values[0]) > 0 && m.Values[0][0] != 't' {
				pid = string(m.Values[0])
			}
		}
	}
	nc.Close() // gone, inside the transaction

	next := pgxConnect(t, addr, "alice", pgx.QueryExecModeSimpleProtocol)
	var path, prepared, temp, newPid string
	var locked bool
	eventually(t, 10*time.Second, func() bool {
		err := next.QueryRow(ctx, "SELECT current_setting('search_path'), (SELECT count(*) FROM pg_prepared_statements WHERE name = 'leak')::text, "+
			"(SELECT count(*) FROM pg_class WHERE relname = 'leftover' AND relpersistence = 't')::text, pg_try_advisory_lock(42), pg_backend_pid()::text").
			Scan(&path, &prepared, &temp, &locked, &newPid)
		return err == nil
	}, "the next client could not query")
	if path == "pg_catalog" || prepared != "0" || temp != "0" || !locked || newPid == pid {
		t.Fatalf("the next client inherited state: search_path %q, prepared %s, temp tables %s, lock free %v, same backend %v",
			path, prepared, temp, locked, newPid == pid)
	}
}

// TestTxnSessionStateIsResetBeforeTheNextClient: a session SET outside a
// transaction (unsupported in transaction mode) does not reach the next
// client on that server.
func TestTxnSessionStateIsResetBeforeTheNextClient(t *testing.T) {
	_, addr := txnProxy(t, proxy.PoolTransaction, 1)
	ctx := context.Background()
	a := pgxConnect(t, addr, "alice", pgx.QueryExecModeSimpleProtocol)
	if _, err := a.Exec(ctx, "SET search_path = pg_catalog"); err != nil {
		t.Fatal(err)
	}
	b := pgxConnect(t, addr, "bob", pgx.QueryExecModeSimpleProtocol)
	var path string
	if err := b.QueryRow(ctx, "SELECT current_setting('search_path')").Scan(&path); err != nil {
		t.Fatal(err)
	}
	if path == "pg_catalog" {
		t.Fatal("bob's transaction ran with alice's search_path")
	}
}

// TestTxnPgjdbcServerPrepared: pgjdbc with server-prepared statements
// (prepareThreshold=1), 8 connections over 2 servers, 1,000 statements
// each: no "prepared statement does not exist", no wrong answer.
func TestTxnPgjdbcServerPrepared(t *testing.T) {
	const jar = "/usr/share/java/postgresql.jar"
	_, addr := txnProxy(t, proxy.PoolTransaction, 2)
	java, err := exec.LookPath("java")
	if err != nil {
		t.Fatal("java is missing: make deps installs it")
	}
	if _, err := os.Stat(jar); err != nil {
		t.Fatal("pgjdbc is missing at " + jar + ": make deps installs Debian's libpostgresql-jdbc-java")
	}
	host, port, _ := net.SplitHostPort(addr)
	url := fmt.Sprintf("jdbc:postgresql://%s:%s/app?user=reader&sslmode=disable&prepareThreshold=1", host, port)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, java, "-cp", jar, "testdata/TxnJdbc.java", url, "8", "1000").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "ok") {
		t.Fatalf("pgjdbc in transaction mode: %v\n%s", err, out)
	}
}

// TestTxnCancelReachesTheAttachedServerOnly: in transaction mode a cancel
// reaches the server running the client's query; sent while the client
// holds no server, it reaches nobody (the other client's query on the one
// server runs on).
func TestTxnCancelReachesTheAttachedServerOnly(t *testing.T) {
	st := needStack(t)
	_, addr := txnProxy(t, proxy.PoolTransaction, 1)
	ctx := context.Background()
	a := dial(t, addr, "reader", "ann")
	b := dial(t, addr, "reader", "ben")
	if _, err := query1(ctx, a, "select 1"); err != nil { // a is idle now, holding nothing
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := query1(ctx, b, "select pg_sleep(3)")
		done <- err
	}()
	eventually(t, 10*time.Second, func() bool {
		var n int
		_ = superuserQuery(ctx, st, "select count(*) from pg_stat_activity where query = 'select pg_sleep(3)'", &n)
		return n == 1
	}, "pg_sleep never started")
	if err := a.CancelRequest(ctx); err != nil { // a's key: a holds no server
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("ben's query was cancelled by ann's cancel request: %v", err)
	}
	go func() {
		_, err := query1(ctx, b, "select pg_sleep(30)")
		done <- err
	}()
	eventually(t, 10*time.Second, func() bool {
		var n int
		_ = superuserQuery(ctx, st, "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)'", &n)
		return n == 1
	}, "pg_sleep(30) never started")
	if err := b.CancelRequest(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if pgErrCode(err) != "57014" {
			t.Fatalf("cancelled query: %v, want 57014", err)
		}
	case <-time.After(15 * time.Second):
		_ = b.Conn().Close()
		<-done
		t.Fatal("pg_sleep(30) still running 15s after the cancel")
	}
}

// TestTxnClientMovesToTheNextCredentialAtATransactionBoundary: when its
// credential retires, a client in transaction mode is not ended: its next
// transaction runs under the credential the broker gives now.
func TestTxnClientMovesToTheNextCredentialAtATransactionBoundary(t *testing.T) {
	st := needStack(t)
	first, second := pgRole(t, st), pgRole(t, st)
	first = roleCred(first.Username, first.Password, 2*time.Second, time.Hour)
	var mu sync.Mutex
	creds := func(r broker.Request) (*broker.Credential, error) {
		mu.Lock()
		defer mu.Unlock()
		if first.Stale() {
			return second, nil
		}
		return first, nil
	}
	routes := appRoute(st, "")
	r := routes["app"]
	r.Modes = map[string]string{"reader": proxy.PoolTransaction}
	routes["app"] = r
	_, addr := startProxy(t, proxy.Config{Routes: routes, Credentials: credFunc(creds), Pool: pool.Config{MaxPerPool: 2, MaxTotal: 2}})
	c := dial(t, addr, "reader", "cal")
	ctx := context.Background()
	user, err := query1(ctx, c, "select current_user")
	if err != nil || user != first.Username {
		t.Fatalf("first transaction ran as %q (%v), want %s", user, err, first.Username)
	}
	eventually(t, 10*time.Second, func() bool { return first.Stale() }, "the first credential never retired")
	user, err = query1(ctx, c, "select current_user")
	if err != nil || user != second.Username {
		t.Fatalf("after the retirement the transaction ran as %q (%v), want %s", user, err, second.Username)
	}
}

// sinkTable is app.copy_sink, which readers may insert into (for the COPY
// and Terminate tests).
var sinkOnce sync.Once

func sinkTable(t *testing.T) {
	t.Helper()
	st := needStack(t)
	var err error
	sinkOnce.Do(func() {
		err = st.PG.Exec(context.Background(), "app", `CREATE TABLE copy_sink (a int, tag text);
ALTER TABLE copy_sink OWNER TO app_owner; GRANT SELECT, INSERT ON copy_sink TO app_read;`)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestTxnReviewFindings: sequences a review found breaking transaction
// mode, each with what must hold.
func TestTxnReviewFindings(t *testing.T) {
	sinkTable(t)
	st := needStack(t)
	ctx := context.Background()

	t.Run("prepared statement with a session effect resets its server", func(t *testing.T) {
		_, addr := txnProxy(t, proxy.PoolTransaction, 1)
		a := pgxConnect(t, addr, "alice", pgx.QueryExecModeCacheStatement)
		b := pgxConnect(t, addr, "bob", pgx.QueryExecModeSimpleProtocol)
		for range 2 { // the second run is a Bind of the cached statement only
			var s string
			if err := a.QueryRow(ctx, "SELECT set_config('app.tenant', $1, false)", "acme").Scan(&s); err != nil {
				t.Fatal(err)
			}
			var got *string
			if err := b.QueryRow(ctx, "SELECT current_setting('app.tenant', true)").Scan(&got); err != nil {
				t.Fatal(err)
			}
			if got != nil && *got != "" {
				t.Fatalf("bob's transaction saw alice's app.tenant %q", *got)
			}
		}
	})

	t.Run("WITH HOLD cursor does not reach the next client", func(t *testing.T) {
		_, addr := txnProxy(t, proxy.PoolTransaction, 1)
		a := pgxConnect(t, addr, "alice", pgx.QueryExecModeSimpleProtocol)
		if _, err := a.Exec(ctx, `DECLARE "c" NO SCROLL CURSOR WITH HOLD FOR SELECT name FROM items`); err != nil {
			t.Fatal(err)
		}
		b := pgxConnect(t, addr, "bob", pgx.QueryExecModeSimpleProtocol)
		var n int
		if err := b.QueryRow(ctx, "SELECT count(*)::int FROM pg_cursors").Scan(&n); err != nil || n != 0 {
			t.Fatalf("bob sees %d cursors (%v), want 0", n, err)
		}
	})

	t.Run("RESET ALL and DISCARD ALL do not lose the identity", func(t *testing.T) {
		for _, mode := range []string{proxy.PoolTransaction, proxy.PoolSession} {
			_, addr := txnProxy(t, mode, 1)
			a := pgxConnect(t, addr, "alice", pgx.QueryExecModeSimpleProtocol)
			for _, q := range []string{"RESET ALL", "DISCARD ALL"} {
				if _, err := a.Exec(ctx, q); err != nil {
					t.Fatalf("%s mode, %s: %v", mode, q, err)
				}
				var sub string
				if err := a.QueryRow(ctx, "SELECT current_setting('pgwarden.subject')").Scan(&sub); err != nil || sub != "alice" {
					t.Fatalf("%s mode, after %s: pgwarden.subject %q (%v), want alice", mode, q, sub, err)
				}
			}
		}
	})

	t.Run("extended COPY FROM STDIN gives its server back", func(t *testing.T) {
		_, addr := txnProxy(t, proxy.PoolTransaction, 1)
		nc, fe := rawLogin(t, addr, "reader", "carl")
		fe.Send(&pgproto3.Parse{Query: "COPY copy_sink (a, tag) FROM STDIN"})
		fe.Send(&pgproto3.Bind{})
		fe.Send(&pgproto3.Describe{ObjectType: 'P'})
		fe.Send(&pgproto3.Execute{})
		fe.Send(&pgproto3.Sync{}) // ignored by PostgreSQL during the COPY, as libpq sends it
		fe.Send(&pgproto3.CopyData{Data: []byte("1\tcopy-ext\n")})
		fe.Send(&pgproto3.CopyDone{})
		fe.Send(&pgproto3.Sync{})
		if err := fe.Flush(); err != nil {
			t.Fatal(err)
		}
		readUntilReady(t, fe)
		_ = nc
		other := pgxConnect(t, addr, "dora", pgx.QueryExecModeSimpleProtocol)
		var n int
		if err := other.QueryRow(ctx, "SELECT count(*)::int FROM copy_sink WHERE tag = 'copy-ext'").Scan(&n); err != nil || n != 1 {
			t.Fatalf("after the COPY another client got %d rows (%v): the server was not given back", n, err)
		}
	})

	t.Run("a COMMIT sent with Terminate is committed", func(t *testing.T) {
		for _, mode := range []string{proxy.PoolTransaction, proxy.PoolSession} {
			_, addr := txnProxy(t, mode, 2)
			nc, _ := rawLogin(t, addr, "reader", "erin")
			tag := "terminate-" + mode
			q, _ := (&pgproto3.Query{String: "BEGIN; INSERT INTO copy_sink VALUES (2, '" + tag + "')"}).Encode(nil)
			q, _ = (&pgproto3.Query{String: "COMMIT"}).Encode(q)
			q, _ = (&pgproto3.Terminate{}).Encode(q)
			if _, err := nc.Write(q); err != nil {
				t.Fatal(err)
			}
			eventually(t, 10*time.Second, func() bool {
				var n int
				_ = superuserQuery(ctx, st, "select count(*) from copy_sink where tag = '"+tag+"'", &n)
				return n == 1
			}, "%s mode: the COMMIT sent with Terminate was lost", mode)
		}
	})

	t.Run("the unnamed statement follows its client across servers", func(t *testing.T) {
		_, addr := txnProxy(t, proxy.PoolTransaction, 1)
		var wg sync.WaitGroup
		errs := make(chan error, 2)
		for i, q := range []string{"SELECT $1::int + 1", "SELECT length($1::text)"} {
			c := pgxConnect(t, addr, fmt.Sprintf("u%d", i), pgx.QueryExecModeDescribeExec)
			wg.Add(1)
			go func() {
				defer wg.Done()
				for j := range 200 {
					var got int
					arg := any(j)
					if i == 1 {
						arg = strings.Repeat("x", j)
					}
					if err := c.QueryRow(ctx, q, arg).Scan(&got); err != nil || (i == 0 && got != j+1) || (i == 1 && got != j) {
						errs <- fmt.Errorf("client %d query %d: got %d (%v)", i, j, got, err)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})

	t.Run("FunctionCall of set_config is refused", func(t *testing.T) {
		for _, pad := range []int{0, 20 << 10} { // small, and larger than the read buffer
			_, addr := txnProxy(t, proxy.PoolTransaction, 1)
			nc, fe := rawLogin(t, addr, "reader", "fay")
			fe.Send(&pgproto3.FunctionCall{Function: 2078, ArgFormatCodes: []uint16{0},
				Arguments: [][]byte{[]byte("pgwarden.subject"), []byte("bob"), []byte("false" + strings.Repeat(" ", pad))}, ResultFormatCode: 0})
			if err := fe.Flush(); err != nil {
				t.Fatal(err)
			}
			_ = nc.SetReadDeadline(time.Now().Add(10 * time.Second))
			m, err := fe.Receive()
			if e, ok := m.(*pgproto3.ErrorResponse); err != nil || !ok || e.Code != "42501" {
				t.Fatalf("FunctionCall set_config (%d bytes of padding): %T %v %v, want ErrorResponse 42501", pad, m, m, err)
			}
		}
	})

	t.Run("the identity query's replies never reach the client", func(t *testing.T) {
		for _, mode := range []string{proxy.PoolTransaction, proxy.PoolSession} {
			_, addr := txnProxy(t, mode, 1)
			_, fe := rawLogin(t, addr, "reader", "gus")
			for _, reset := range []string{"RESET ALL", "DISCARD ALL"} {
				fe.Send(&pgproto3.Query{String: reset})
				if err := fe.Flush(); err != nil {
					t.Fatal(err)
				}
				readUntilReady(t, fe)
				fe.Send(&pgproto3.Query{String: "SELECT current_setting('pgwarden.subject') AS who"})
				if err := fe.Flush(); err != nil {
					t.Fatal(err)
				}
				var got []string
				for {
					m, err := fe.Receive()
					if err != nil {
						t.Fatal(err)
					}
					switch m := m.(type) {
					case *pgproto3.RowDescription:
						got = append(got, "T:"+string(m.Fields[0].Name))
					case *pgproto3.DataRow:
						got = append(got, "D:"+string(m.Values[0]))
					case *pgproto3.CommandComplete:
						got = append(got, "C")
					}
					if _, ok := m.(*pgproto3.ReadyForQuery); ok {
						break
					}
				}
				if strings.Join(got, " ") != "T:who D:gus C" {
					t.Fatalf("%s mode, after %s: the client got %v, want one row: gus", mode, reset, got)
				}
			}
		}
	})

	t.Run("DISCARD ALL through the extended protocol keeps the identity", func(t *testing.T) {
		for _, mode := range []string{proxy.PoolTransaction, proxy.PoolSession} {
			_, addr := txnProxy(t, mode, 1)
			_, fe := rawLogin(t, addr, "reader", "hal")
			fe.Send(&pgproto3.Parse{Query: "DISCARD ALL"})
			fe.Send(&pgproto3.Bind{})
			fe.Send(&pgproto3.Execute{})
			fe.Send(&pgproto3.Sync{})
			if err := fe.Flush(); err != nil {
				t.Fatal(err)
			}
			readUntilReady(t, fe)
			fe.Send(&pgproto3.Query{String: "SELECT current_setting('pgwarden.subject')"})
			if err := fe.Flush(); err != nil {
				t.Fatal(err)
			}
			var who string
			for {
				m, err := fe.Receive()
				if err != nil {
					t.Fatal(err)
				}
				if d, ok := m.(*pgproto3.DataRow); ok {
					who = string(d.Values[0])
				}
				if _, ok := m.(*pgproto3.ReadyForQuery); ok {
					break
				}
			}
			if who != "hal" {
				t.Fatalf("%s mode, after an extended DISCARD ALL: pgwarden.subject %q, want hal", mode, who)
			}
		}
	})

	t.Run("a COPY after a query in one write keeps its server", func(t *testing.T) {
		_, addr := txnProxy(t, proxy.PoolTransaction, 1)
		_, fe := rawLogin(t, addr, "reader", "ida")
		fe.Send(&pgproto3.Query{String: "SELECT 1"})
		fe.Send(&pgproto3.Parse{Query: "COPY copy_sink (a, tag) FROM STDIN"})
		fe.Send(&pgproto3.Bind{})
		fe.Send(&pgproto3.Execute{})
		fe.Send(&pgproto3.Sync{})
		if err := fe.Flush(); err != nil {
			t.Fatal(err)
		}
		readUntilReady(t, fe)              // the SELECT's
		time.Sleep(100 * time.Millisecond) // let the CopyInResponse arrive first: the order the review found
		fe.Send(&pgproto3.CopyData{Data: []byte("3\tcopy-after-query\n")})
		fe.Send(&pgproto3.CopyDone{})
		fe.Send(&pgproto3.Sync{})
		if err := fe.Flush(); err != nil {
			t.Fatal(err)
		}
		for { // through the CopyInResponse to the COPY's ReadyForQuery
			m, err := fe.Receive()
			if err != nil {
				t.Fatal(err)
			}
			if e, ok := m.(*pgproto3.ErrorResponse); ok {
				t.Fatalf("%s: %s", e.Code, e.Message)
			}
			if _, ok := m.(*pgproto3.ReadyForQuery); ok {
				break
			}
		}
		var n int
		if err := superuserQuery(ctx, st, "select count(*) from copy_sink where tag = 'copy-after-query'", &n); err != nil || n != 1 {
			t.Fatalf("the COPY's row: %d (%v), want 1", n, err)
		}
	})
}

// readUntilReady reads a raw client's messages up to ReadyForQuery and
// fails on an ErrorResponse.
func readUntilReady(t *testing.T, fe *pgproto3.Frontend) {
	t.Helper()
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		switch m := m.(type) {
		case *pgproto3.ErrorResponse:
			t.Fatalf("%s: %s", m.Code, m.Message)
		case *pgproto3.CopyInResponse:
			return // the caller sends the data
		case *pgproto3.ReadyForQuery:
			return
		}
	}
}

// TestTxnNamedStatementsPerClientAreCapped: a client's named statements
// cost pgwarden memory (REVIEW class 2): past maxClientStatements a Parse is
// refused with 54000 in its place, and the session goes on.
func TestTxnNamedStatementsPerClientAreCapped(t *testing.T) {
	_, addr := txnProxy(t, proxy.PoolTransaction, 1)
	nc, fe := rawLogin(t, addr, "reader", "max")
	const n = 10000
	for i := range n + 1 {
		fe.Send(&pgproto3.Parse{Name: fmt.Sprint("s", i), Query: fmt.Sprint("SELECT ", i)})
	}
	fe.Send(&pgproto3.Sync{})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	_ = nc.SetReadDeadline(time.Now().Add(60 * time.Second))
	parsed, code := 0, ""
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		switch m := m.(type) {
		case *pgproto3.ParseComplete:
			parsed++
		case *pgproto3.ErrorResponse:
			code = m.Code
		}
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			break
		}
	}
	if parsed != n || code != "54000" {
		t.Fatalf("%d statements parsed, error %q; want %d and 54000", parsed, code, n)
	}
	// The statements it has still work, on whatever server.
	fe.Send(&pgproto3.Bind{PreparedStatement: "s42"})
	fe.Send(&pgproto3.Execute{})
	fe.Send(&pgproto3.Sync{})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	var got string
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			t.Fatalf("%s: %s", e.Code, e.Message)
		}
		if d, ok := m.(*pgproto3.DataRow); ok {
			got = string(d.Values[0])
		}
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			break
		}
	}
	if got != "42" {
		t.Fatalf("s42 gave %q", got)
	}
}
