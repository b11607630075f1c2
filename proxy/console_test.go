package proxy_test

import (
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// The admin console through psql, against the shared stack: the dev
// issuer's dba group may open it.

// psqlConsole runs one console command with psql as the holder of tok and
// returns psql's unaligned output.
func psqlConsole(t *testing.T, tok, command string) (string, error) {
	t.Helper()
	conn := strings.Replace(stack.ConnString("admin", tok), "dbname=app", "dbname=pgwarden", 1)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "psql", "-X", "-A", "-v", "ON_ERROR_STOP=1", "-d", conn, "-c", command).CombinedOutput()
	return string(out), err
}

func mustConsole(t *testing.T, tok, command string, want ...string) string {
	t.Helper()
	out, err := psqlConsole(t, tok, command)
	if err != nil {
		t.Fatalf("%s: %v\n%s", command, err, out)
	}
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Fatalf("%s: no %q in\n%s", command, w, out)
		}
	}
	return out
}

// clientID finds the console id of subject's client at level in SHOW
// CLIENTS.
func clientID(t *testing.T, admin, subject, level string) string {
	t.Helper()
	out := mustConsole(t, admin, "SHOW CLIENTS")
	lines := strings.Split(out, "\n")
	cols := strings.Split(lines[0], "|")
	idx := func(name string) int {
		for i, c := range cols {
			if c == name {
				return i
			}
		}
		t.Fatalf("SHOW CLIENTS has no column %s: %s", name, lines[0])
		return -1
	}
	for _, l := range lines[1:] {
		f := strings.Split(l, "|")
		if len(f) == len(cols) && f[idx("subject")] == subject && f[idx("user")] == level {
			return f[idx("id")]
		}
	}
	t.Fatalf("no client of %s at %s in\n%s", subject, level, out)
	return ""
}

func TestConsoleShowsPoolsClientsServersStatsDatabasesConfigLeases(t *testing.T) {
	st := needStack(t)
	admin := token(t, "root", "dba")
	ctx := context.Background()
	s := connect(t, "reader", token(t, "ivy", "analyst"))
	queryString(t, s, "select current_user")
	x := connect(t, "txn", token(t, "jon", "analyst"))
	queryString(t, x, "select current_user")

	mustConsole(t, admin, "SHOW POOLS", "database|user|cl_active|cl_waiting|sv_active|sv_idle|sv_used", "app|reader|", "app|txn|", "|transaction|")
	clients := mustConsole(t, admin, "SHOW CLIENTS", "type|user|database|state|addr|port", "|subject|backend_pid", "ivy", "jon")
	for _, l := range strings.Split(clients, "\n") {
		if strings.Contains(l, "|ivy|") && strings.HasSuffix(l, "|0") {
			t.Fatalf("a session-mode client shows no backend pid: %s", l)
		}
	}
	mustConsole(t, admin, "SHOW SERVERS", "type|user|database|state|addr|port", "|db_user|lease", "S|reader|app|active|")
	mustConsole(t, admin, "SHOW STATS", "database|total_xact_count|total_query_count", "\napp|")
	mustConsole(t, admin, "SHOW DATABASES", "name|host|port|database|pool_size|pool_mode", "app|127.0.0.1|", "|mixed|")
	cfg := mustConsole(t, admin, "SHOW CONFIG", "key|value|default|changeable", "pool.max_per_pool|", "console.groups|dba|")
	for _, secret := range []string{st.AdminPassword, admin} {
		if strings.Contains(cfg, secret) {
			t.Fatal("SHOW CONFIG shows a secret")
		}
	}
	leases := mustConsole(t, admin, "SHOW LEASES", "database|level|db_user|lease_id|scope|state", "app|reader|", "app|txn|", "…")
	if strings.Contains(leases, admin) {
		t.Fatal("SHOW LEASES shows a token")
	}
	mustConsole(t, admin, "RELOAD", "RELOAD")

	// Extended protocol is refused clearly.
	cfgx, _ := pgx.ParseConfig(strings.Replace(stack.ConnString("admin", admin), "dbname=app", "dbname=pgwarden", 1))
	c, err := pgx.ConnectConfig(ctx, cfgx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var v string
	if err := c.QueryRow(ctx, "SHOW POOLS").Scan(&v); pgErrCode(err) != "0A000" {
		t.Fatalf("extended protocol to the console: %v, want 0A000", err)
	}
}

// TestConsoleShowServersUnderTraffic: SHOW SERVERS while transaction-mode
// clients change what their servers report (run with -race).
func TestConsoleShowServersUnderTraffic(t *testing.T) {
	needStack(t)
	admin := token(t, "root", "dba")
	x := connect(t, "txn", token(t, "pat", "analyst"))
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 200 {
			if _, err := x.Exec(context.Background(), "SET application_name = 'app-"+strings.Repeat("x", i%7)+"'"); err != nil {
				return
			}
		}
	}()
	for range 5 {
		mustConsole(t, admin, "SHOW SERVERS", "type|user|database")
	}
	<-done
}

func TestConsoleRefusesNonAdmins(t *testing.T) {
	needStack(t)
	out, err := psqlConsole(t, token(t, "eve", "analyst", "engineer"), "SHOW POOLS")
	if err == nil || !strings.Contains(out, "grants no access to the pgwarden admin console") {
		t.Fatalf("a non-admin opened the console: %v\n%s", err, out)
	}
}

func TestConsolePauseResume(t *testing.T) {
	needStack(t)
	admin := token(t, "root", "dba")
	x := connect(t, "txn", token(t, "kim", "analyst"))
	queryString(t, x, "select 1::text")
	mustConsole(t, admin, "PAUSE app", "PAUSE")
	mustConsole(t, admin, "SHOW DATABASES", "app|127.0.0.1|")
	done := make(chan error, 1)
	go func() {
		var s string
		done <- x.QueryRow(context.Background(), "select 'after resume'").Scan(&s)
	}()
	eventually(t, 10*time.Second, func() bool {
		out, _ := psqlConsole(t, admin, "SHOW CLIENTS")
		return strings.Contains(out, "|waiting|")
	}, "a transaction-mode client did not wait while app was paused")
	select {
	case err := <-done:
		t.Fatalf("a query ran while its database was paused: %v", err)
	default:
	}
	mustConsole(t, admin, "RESUME app", "RESUME")
	if err := <-done; err != nil {
		t.Fatalf("after RESUME: %v", err)
	}
}

// TestConsoleKillSubjectEndsOnlyThatPerson: the offboarding button ends
// every session of one subject, in both modes, and nobody else's.
func TestConsoleKillSubjectEndsOnlyThatPerson(t *testing.T) {
	needStack(t)
	admin := token(t, "root", "dba")
	ctx := context.Background()
	var mine, theirs []*pgx.Conn
	for _, level := range []string{"reader", "txn"} {
		m := connect(t, level, token(t, "mallory", "analyst"))
		queryString(t, m, "select 1::text")
		mine = append(mine, m)
		o := connect(t, level, token(t, "oscar", "analyst"))
		queryString(t, o, "select 1::text")
		theirs = append(theirs, o)
	}
	malloryToken := token(t, "mallory", "analyst")
	m2 := connect(t, "reader", malloryToken)
	queryString(t, m2, "select 1::text")
	mine = append(mine, m2)
	mustConsole(t, admin, "KILL SUBJECT 'mallory'", "KILL")
	if c, err := pgx.Connect(ctx, stack.ConnString("reader", malloryToken)); err == nil {
		c.Close(ctx)
		t.Fatal("a token of a killed subject logged in again")
	}
	for _, m := range mine {
		var s string
		if err := m.QueryRow(ctx, "select 'still here'").Scan(&s); err == nil {
			t.Fatalf("mallory's %s session still answers after KILL SUBJECT", m.Config().User)
		}
	}
	for _, o := range theirs {
		queryString(t, o, "select 'oscar is fine'")
	}
	// KILL of one client.
	id := clientID(t, admin, "oscar", "txn")
	mustConsole(t, admin, "KILL "+id, "KILL")
	var s string
	if err := theirs[1].QueryRow(ctx, "select 1::text").Scan(&s); err == nil {
		t.Fatal("a killed client still answers")
	}
	queryString(t, theirs[0], "select 'the other session of oscar is fine'")
	if _, err := psqlConsole(t, admin, "KILL 999999999"); err == nil {
		t.Fatal("KILL of an unknown client succeeded")
	}
	_ = errors.New
}

// TestConsoleKillReachesAClientWaitingForAQuery: in transaction mode the
// client's goroutine waits for the server's replies itself; KILL must still
// end the session then, and let go of its server.
func TestConsoleKillReachesAClientWaitingForAQuery(t *testing.T) {
	needStack(t)
	admin := token(t, "root", "dba")
	x := connect(t, "txn", token(t, "quinn", "analyst"))
	done := make(chan error, 1)
	go func() {
		_, err := x.Exec(context.Background(), "select pg_sleep(30)")
		done <- err
	}()
	eventually(t, 10*time.Second, func() bool {
		out, _ := psqlConsole(t, admin, "SHOW CLIENTS")
		return strings.Contains(out, "|quinn|") && strings.Contains(out, "|active|")
	}, "the client never showed as active")
	mustConsole(t, admin, "KILL "+clientID(t, admin, "quinn", "txn"), "KILL")
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("the killed client's query succeeded")
		}
	case <-time.After(15 * time.Second):
		t.Fatal("KILL did not end a client waiting for its query")
	}
}
