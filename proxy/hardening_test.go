package proxy_test

// Regression tests for the hardening issue, one per numbered defect; each
// name says which. They fail on the code before the fixes and pass after.

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/proxy"
	"github.com/pgwarden/pgwarden/testenv"
)

// 1. RetireAt fires while a client slowly reads a large row: the row arrives
// whole and intact, and the session then ends at its idle point with 57P01.
func TestItem01RetirementMidStreamKeepsTheRowIntact(t *testing.T) {
	st := needStack(t)
	cred := pgRole(t, st)
	// RetireAt is 2s after the credential is handed out, just before the
	// session opens; the row below takes ~5s to stream.
	_, addr := startProxy(t, proxy.Config{Routes: appRoute(st, ""),
		Credentials: credFunc(func(broker.Request) (*broker.Credential, error) {
			return roleCred(cred.Username, cred.Password, 2*time.Second, time.Hour), nil
		})})

	cfg := harnessConfig(t, addr, "reader", "alice")
	d := net.Dialer{}
	cfg.DialFunc = func(ctx context.Context, network, a string) (net.Conn, error) {
		nc, err := d.DialContext(ctx, network, a)
		if err != nil {
			return nil, err
		}
		return slowConn{Conn: nc, chunk: 32 << 10, pause: 10 * time.Millisecond}, nil // ~3 MB/s
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	const size = 16_000_000 // streams for ~5s: RetireAt passes in the middle
	row, err := query1(ctx, c, fmt.Sprintf("select repeat('x', %d)", size))
	if err != nil {
		t.Fatalf("streaming a large row across RetireAt: %v", err)
	}
	if len(row) != size || strings.Trim(row, "x") != "" {
		t.Fatalf("row of %d bytes arrived damaged (%d bytes)", size, len(row))
	}
	_, err = query1(ctx, c, "select 1")
	if code := pgErrCode(err); code != "57P01" {
		t.Fatalf("after the row, at its idle point: err = %v, want FATAL 57P01 (credential retired)", err)
	}
}

// 2a. A client that stops reading a huge result is cut after the write
// timeout, and its upstream session (a pool slot) is freed.
func TestItem02ClientThatStopsReadingIsCutAndFreesItsSlot(t *testing.T) {
	st := needStack(t)
	cred := pgRole(t, st)
	srv, addr := startProxy(t, proxy.Config{Credentials: fixedCred(cred), Routes: appRoute(st, ""), WriteTimeout: time.Second})
	nc, fe := rawLogin(t, addr, "reader", "bob")
	fe.Send(&pgproto3.Query{String: "select repeat('x', 1000000) from generate_series(1, 10000)"}) // 10 GB
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	_ = nc // never read again
	eventually(t, 30*time.Second, func() bool { _, a := poolActive(srv, "reader"); return a == 0 },
		"a client that reads nothing still holds its upstream session")
	eventually(t, 10*time.Second, func() bool { return len(backendPids(t, st, cred.Username)) == 0 },
		"the upstream backend of a cut session is still there")
}

// 2b. An upstream that stops reading (a stalled network) is cut after the
// write timeout: the client gets FATAL 08006 and the slot is freed.
func TestItem02UpstreamThatStopsReadingIsCutAndTheClientTold(t *testing.T) {
	st := needStack(t)
	fwd := forwarder(t, st)
	srv, addr := startProxy(t, proxy.Config{Credentials: fixedCred(pgRole(t, st)), Routes: appRoute(st, fwd.Addr), WriteTimeout: time.Second})
	nc, fe := rawLogin(t, addr, "reader", "carol")
	// Attached: a session-mode client holds a server from its first message.
	fe.Send(&pgproto3.Query{String: "select 1"})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	readUntilReady(t, fe)
	fwd.Stall()
	// A 64 MB statement: more than the socket buffers between pgwarden and
	// the stalled route can take.
	go func() {
		q := "select '" + strings.Repeat("y", 64<<20) + "'"
		fe.Send(&pgproto3.Query{String: q})
		_ = fe.Flush()
	}()
	_ = nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatalf("no FATAL before the connection ended: %v", err)
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			if e.Code != "08006" || e.Severity != "FATAL" {
				t.Fatalf("got %s %s %q, want FATAL 08006", e.Severity, e.Code, e.Message)
			}
			break
		}
	}
	eventually(t, 10*time.Second, func() bool { _, a := poolActive(srv, "reader"); return a == 0 },
		"a session whose upstream stopped reading still holds its slot")
}

// 3a. A pooled session the server ended while it sat idle
// (pg_terminate_backend; a restart or idle_session_timeout look the same) is
// not handed to the next client.
func TestItem03DeadPooledSessionIsNotHandedOut(t *testing.T) {
	st := needStack(t)
	cred := pgRole(t, st)
	srv, addr := startProxy(t, proxy.Config{Credentials: fixedCred(cred), Routes: appRoute(st, ""),
		Pool: pool.Config{PingAfterIdle: time.Hour}}) // only the no-round-trip check may catch it
	ctx := context.Background()
	first := dial(t, addr, "reader", "dan")
	pid, err := query1(ctx, first, "select pg_backend_pid()")
	if err != nil {
		t.Fatal(err)
	}
	first.Close(ctx)
	eventually(t, 10*time.Second, func() bool { i, _ := poolActive(srv, "reader"); return i == 1 }, "session not pooled")
	if err := st.PG.Exec(ctx, "postgres", "select pg_terminate_backend("+pid+")"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, func() bool { return len(backendPids(t, st, cred.Username)) == 0 }, "backend not terminated")

	next := dial(t, addr, "reader", "erin")
	got, err := query1(ctx, next, "select pg_backend_pid()")
	if err != nil {
		t.Fatalf("the next client's first query: %v (it was handed the dead session)", err)
	}
	if got == pid {
		t.Fatalf("served by the terminated backend %s", pid)
	}
}

// 3b. A pooled session behind a silent network cut is found by the ping
// after an idle period and replaced.
func TestItem03PooledSessionBehindANetworkCutIsReplaced(t *testing.T) {
	st := needStack(t)
	fwd := forwarder(t, st)
	srv, addr := startProxy(t, proxy.Config{Credentials: fixedCred(pgRole(t, st)), Routes: appRoute(st, fwd.Addr),
		Pool: pool.Config{PingAfterIdle: time.Millisecond, PingTimeout: 500 * time.Millisecond}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	dial(t, addr, "reader", "fay").Close(ctx)
	eventually(t, 10*time.Second, func() bool { i, _ := poolActive(srv, "reader"); return i == 1 }, "session not pooled")
	time.Sleep(10 * time.Millisecond) // idle longer than PingAfterIdle
	fwd.Stall()
	next := dial(t, addr, "reader", "gus")
	if got, err := query1(ctx, next, "select 'served'"); err != nil || got != "served" {
		t.Fatalf("the next client after a network cut: %q %v", got, err)
	}
}

// 3c. When the upstream dies mid-session without a word, the client gets
// FATAL 08006 before the connection closes.
func TestItem03UpstreamLostMidSessionIsReportedAs08006(t *testing.T) {
	st := needStack(t)
	fwd := forwarder(t, st)
	_, addr := startProxy(t, proxy.Config{Credentials: fixedCred(pgRole(t, st)), Routes: appRoute(st, fwd.Addr)})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c := dial(t, addr, "reader", "hal")
	if _, err := query1(ctx, c, "select 1"); err != nil {
		t.Fatal(err)
	}
	fwd.Cut()
	_, err := query1(ctx, c, "select 1")
	if code := pgErrCode(err); code != "08006" {
		t.Fatalf("after the upstream was lost: err = %v, want FATAL 08006", err)
	}

	// An idle client, so only the server-to-client side can notice: the
	// FATAL arrives unasked. (Attached first: a session-mode client holds a
	// server from its first message; before it, it has none to lose.)
	nc, fe := rawLogin(t, addr, "reader", "hal")
	fe.Send(&pgproto3.Query{String: "select 1"})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	readUntilReady(t, fe)
	fwd.Cut()
	_ = nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := fe.Receive()
	if e, ok := m.(*pgproto3.ErrorResponse); err != nil || !ok || e.Code != "08006" || e.Severity != "FATAL" {
		t.Fatalf("idle client after the upstream was lost: %#v, %v; want FATAL 08006", m, err)
	}
}

// 4. Database names from unauthenticated clients never become metric
// labels: 1,000 refused attempts with random 9 KB names add no series.
func TestItem04RandomDatabaseNamesAddNoMetricSeries(t *testing.T) {
	st := needStack(t)
	var name []byte
	attempt := func() {
		name = make([]byte, 9000)
		for i := range name {
			name[i] = 'a' + byte(rand.IntN(26))
		}
		nc, err := net.DialTimeout("tcp", st.App.Addr(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
		fe := pgproto3.NewFrontend(nc, nc)
		fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
			Parameters: map[string]string{"user": "reader", "database": string(name)}})
		fe.Send(&pgproto3.PasswordMessage{Password: "junk"})
		_ = fe.Flush()
		for {
			if _, err := fe.Receive(); err != nil {
				return
			}
		}
	}
	attempt() // the first may add the one "unknown" series
	// The series a refusal can add: other series may come and go meanwhile
	// (a Vault token revoked in the background when its JWT expires).
	reg := st.App.Metrics().Registry()
	const refusals = "pgwarden_auth_total"
	before := testutil.CollectAndCount(reg, refusals)
	for range 1000 {
		attempt()
	}
	if after := testutil.CollectAndCount(reg, refusals); after != before {
		t.Fatalf("1,000 attempts with random database names: %d series before, %d after", before, after)
	}
	// Nor do they fill the log: the refusal is logged with the name clipped
	// to its first 64 bytes (the client's error quotes it clipped too).
	eventually(t, 10*time.Second, func() bool { return strings.Contains(logs.String(), string(name[:64])) },
		"the last refusal was not logged")
	if strings.Contains(logs.String(), string(name[:65])) {
		t.Fatal("an unclipped database name reached the log")
	}
}

// 6. One identity cannot change another's sessions through role-level
// settings of the shared database user.
func TestItem06AlterRoleSetDoesNotReachAnotherIdentity(t *testing.T) {
	needStack(t) // team is role-scoped: one credential shared by everyone
	ctx := context.Background()
	alice := connect(t, "team", token(t, "alice-rs", "analyst"))
	user := queryString(t, alice, "select current_user")
	if _, err := alice.Exec(ctx, "ALTER ROLE CURRENT_USER SET search_path = evil, public"); err != nil {
		t.Fatalf("alice's ALTER ROLE (PostgreSQL lets a role set its own defaults): %v", err)
	}
	// alice keeps her session; so do the clients below, one per session
	// idle in the pool (opened before the ALTER, and so clean), so that bob's
	// needs a new upstream session of the same shared database user.
	for i := range idleSessions(t, "team") {
		connect(t, "team", token(t, fmt.Sprint("holder-", i), "analyst"))
	}
	bob := connect(t, "team", token(t, "bob-rs", "analyst"))
	if got := queryString(t, bob, "select current_user"); got != user {
		t.Fatalf("bob runs as %s, alice as %s: the test needs a shared credential", got, user)
	}
	if got := queryString(t, bob, "show search_path"); strings.Contains(got, "evil") {
		t.Fatalf("bob's session starts with alice's role setting: search_path = %s", got)
	}
	var n int
	if err := superuserQuery(ctx, stack, "select count(*) from pg_db_role_setting where setrole = (select oid from pg_roles where rolname = '"+user+"')", &n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("the role-level setting is still stored (%d rows)", n)
	}
}

// 7. A client refused for an unknown database is not shown every database
// pgwarden serves, only what its token grants.
func TestItem07UnknownDatabaseDoesNotListTheConfiguration(t *testing.T) {
	st := needStack(t)
	host, port, _ := net.SplitHostPort(st.App.Addr())
	conn := func(tok string) string {
		return fmt.Sprintf("host=%s port=%s dbname=payroll user=reader password=%s sslmode=verify-full sslrootcert=%s", host, port, tok, st.Certs.CAFile)
	}
	pe := refusal(t, conn(token(t, "ivy", "marketing"))) // a valid token that grants nothing
	if pe.Code != "3D000" {
		t.Fatalf("SQLSTATE %s, want 3D000", pe.Code)
	}
	if text := pe.Message + pe.Detail + pe.Hint; strings.Contains(text, "app") {
		t.Fatalf("a token that grants nothing is told the served databases: %q", text)
	}
	pe = refusal(t, conn(token(t, "ivy", "analyst")))
	if !strings.Contains(pe.Message+pe.Detail+pe.Hint, "app") {
		t.Fatalf("a token that grants app is not told so: %q / %q / %q", pe.Message, pe.Detail, pe.Hint)
	}
}

// 9. libpq with a Kerberos credential cache sends GSSENCRequest, takes 'N',
// then asks for TLS: that sequence logs in.
func TestItem09GSSENCThenSSLRequestLogsIn(t *testing.T) {
	st := needStack(t)
	cfg, err := pgx.ParseConfig(st.ConnString("reader", token(t, "jay", "analyst")))
	if err != nil {
		t.Fatal(err)
	}
	d := net.Dialer{Timeout: 5 * time.Second}
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		req, _ := (&pgproto3.GSSEncRequest{}).Encode(nil)
		var answer [1]byte
		if _, err := nc.Write(req); err == nil {
			_, err = nc.Read(answer[:])
		}
		if err != nil || answer[0] != 'N' {
			nc.Close()
			return nil, fmt.Errorf("GSSENCRequest: answer %q, %v", answer[0], err)
		}
		return nc, nil // pgx sends its SSLRequest next
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("GSSENCRequest → N → SSLRequest → S → TLS → login: %v", err)
	}
	defer c.Close(ctx)
	if _, ok := c.PgConn().Conn().(*tls.Conn); !ok {
		t.Fatalf("the session is not over TLS (%T)", c.PgConn().Conn())
	}
	if u := queryString(t, c, "select current_user"); !strings.HasPrefix(u, "v-") {
		t.Fatalf("current_user = %q, want a dynamic role", u)
	}
}

// 10a. A cancel reaches a backend behind a unix-socket upstream. The
// socket used is the one PostgreSQL binds by a relative path (its data
// directory's), whose peer name is therefore relative too.
func TestItem10CancelThroughAUnixSocketUpstream(t *testing.T) {
	st := needStack(t)
	cred := pgRole(t, st)
	routes := map[string]proxy.Route{"app": {
		Upstream:   fmt.Sprintf("host=%s/data port=%d dbname=app", st.PG.Dir, st.PG.Port),
		VaultRoles: map[string]string{"reader": "r"},
	}}
	_, addr := startProxy(t, proxy.Config{Credentials: fixedCred(cred), Routes: routes})
	c := dial(t, addr, "reader", "kay")
	ctx := context.Background()
	done := make(chan error, 1)
	go func() {
		_, err := query1(ctx, c, "select pg_sleep(30)")
		done <- err
	}()
	eventually(t, 10*time.Second, func() bool {
		var n int
		_ = superuserQuery(ctx, st, "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and usename = '"+cred.Username+"'", &n)
		return n == 1
	}, "pg_sleep never started")
	if err := c.CancelRequest(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if pgErrCode(err) != "57014" {
			t.Fatalf("cancelled query: %v, want 57014", err)
		}
	case <-time.After(15 * time.Second):
		_ = c.Conn().Close() // end the query before the test's cleanup closes c
		<-done
		t.Fatal("pg_sleep(30) still running 15s after the cancel: it did not reach a unix-socket upstream")
	}
}

// 11. The audit record names the database user the session actually ran
// as. A pooled session opened under an earlier credential of the level is
// not lent to a client whose request returned another (one person's lease
// never serves another; after a rotation new sessions use the new
// credential): the client gets a session under its own, and the audit says
// so.
func TestItem11AuditNamesTheSessionsOwnDatabaseUser(t *testing.T) {
	st := needStack(t)
	first, second := pgRole(t, st), pgRole(t, st)
	creds := []*broker.Credential{first, second}
	var out testenv.LockedBuffer
	srv, addr := startProxy(t, proxy.Config{
		Credentials: credFunc(func(broker.Request) (*broker.Credential, error) {
			c := creds[0]
			if len(creds) > 1 {
				creds = creds[1:]
			}
			return c, nil
		}),
		Routes: appRoute(st, ""), Logger: newJSONLogger(&out),
	})
	ctx := context.Background()
	dial(t, addr, "reader", "lee").Close(ctx)
	eventually(t, 10*time.Second, func() bool { i, _ := poolActive(srv, "reader"); return i == 1 }, "session not pooled")
	c := dial(t, addr, "reader", "max") // asks for `second`; the pooled `first` stays idle
	user, err := query1(ctx, c, "select current_user")
	if err != nil {
		t.Fatal(err)
	}
	c.Close(ctx)
	var audit struct {
		Subject string `json:"subject"`
		DBUser  string `json:"db_user"`
		LeaseID string `json:"lease_id"`
	}
	eventually(t, 10*time.Second, func() bool {
		for _, l := range strings.Split(out.String(), "\n") {
			if strings.Contains(l, `"msg":"session"`) && strings.Contains(l, `"subject":"max"`) {
				return json.Unmarshal([]byte(l), &audit) == nil
			}
		}
		return false
	}, "no audit record for max")
	if user != second.Username || audit.DBUser != user || audit.LeaseID != second.LeaseID {
		t.Fatalf("session ran as %s; audit says db_user %s lease %s", user, audit.DBUser, audit.LeaseID)
	}
}

// 12a. Idle sessions of one pool do not starve another: when the total is
// reached, an idle session elsewhere is closed to make room.
func TestItem12IdleSessionsOfOnePoolDoNotStarveAnother(t *testing.T) {
	st := needStack(t)
	reader, writer := pgRole(t, st), pgRole(t, st)
	srv, addr := startProxy(t, proxy.Config{
		Credentials: credFunc(func(r broker.Request) (*broker.Credential, error) {
			if r.VaultRole == "w" {
				return writer, nil
			}
			return reader, nil
		}),
		Routes: appRoute(st, ""),
		Pool:   pool.Config{MaxTotal: 2, MaxPerPool: 2, AcquireTimeout: 2 * time.Second},
	})
	ctx := context.Background()
	a, b := dial(t, addr, "reader", "nia"), dial(t, addr, "reader", "ned")
	for _, c := range []*pgconn.PgConn{a, b} { // attached: one server each, from the first message
		if _, err := query1(ctx, c, "select 1"); err != nil {
			t.Fatal(err)
		}
	}
	a.Close(ctx)
	b.Close(ctx)
	eventually(t, 10*time.Second, func() bool { i, _ := poolActive(srv, "reader"); return i == 2 }, "reader sessions not pooled")
	w, err := pgconn.ConnectConfig(ctx, harnessConfig(t, addr, "writer", "ola"))
	if err == nil {
		defer w.Close(ctx)
		_, err = query1(ctx, w, "select 1")
	}
	if err != nil {
		t.Fatalf("writer while the reader pool idles on every slot: %v", err)
	}
}

// 12b. max_subject_connections caps one identity's sessions with its own
// refusal; others are unaffected, and the cap frees when a session ends.
func TestItem12PerSubjectConnectionCap(t *testing.T) {
	st := needStack(t)
	_, addr := startProxy(t, proxy.Config{Credentials: fixedCred(pgRole(t, st)), Routes: appRoute(st, ""), MaxSubjectConnections: 2})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	one, two := dial(t, addr, "reader", "pat"), dial(t, addr, "reader", "pat")
	_, err := pgconn.ConnectConfig(ctx, harnessConfig(t, addr, "reader", "pat"))
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "53300" || !strings.Contains(pe.Message, `"pat"`) || !strings.Contains(pe.Detail, "max_subject_connections") {
		t.Fatalf("third session of one subject: %v, want 53300 naming the subject and the setting", err)
	}
	dial(t, addr, "reader", "quin") // another identity is not affected
	one.Close(ctx)
	eventually(t, 10*time.Second, func() bool { // the cap frees when pgwarden has seen the session end
		c, err := pgconn.ConnectConfig(ctx, harnessConfig(t, addr, "reader", "pat"))
		if err == nil {
			c.Close(ctx)
		}
		return err == nil
	}, "the cap did not free when a session ended")
	two.Close(ctx)
}

// 5. pgwarden never answers an upstream's request for a cleartext or MD5
// password: the dynamic credential must only ever travel inside SCRAM.
func TestItem05UpstreamMustAuthenticateWithSCRAM(t *testing.T) {
	for _, ask := range []pgproto3.BackendMessage{&pgproto3.AuthenticationCleartextPassword{}, &pgproto3.AuthenticationMD5Password{Salt: [4]byte{1, 2, 3, 4}}} {
		t.Run(fmt.Sprintf("%T", ask), func(t *testing.T) {
			mitm, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer mitm.Close()
			got := make(chan []byte, 1)
			go func() {
				nc, err := mitm.Accept()
				if err != nil {
					return
				}
				defer nc.Close()
				_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
				be := pgproto3.NewBackend(nc, nc)
				if _, err := be.ReceiveStartupMessage(); err != nil {
					return
				}
				be.Send(ask)
				_ = be.Flush()
				var buf bytes.Buffer
				b := make([]byte, 1024)
				for {
					n, err := nc.Read(b)
					buf.Write(b[:n])
					if err != nil {
						got <- buf.Bytes()
						return
					}
				}
			}()
			cred := roleCred("v-dynamic", "the-dynamic-secret", time.Hour, time.Hour)
			routes := map[string]proxy.Route{"app": {Upstream: "host=127.0.0.1 port=" + fmt.Sprint(mitm.Addr().(*net.TCPAddr).Port) + " dbname=app sslmode=disable",
				VaultRoles: map[string]string{"reader": "r"}}}
			_, addr := startProxy(t, proxy.Config{Credentials: fixedCred(cred), Routes: routes})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err = pgconn.ConnectConfig(ctx, harnessConfig(t, addr, "reader", "rae"))
			if code := pgErrCode(err); code != "08006" {
				t.Fatalf("client: %v, want 08006", err)
			}
			select {
			case b := <-got:
				if bytes.Contains(b, []byte("the-dynamic-secret")) || bytes.Contains(b, []byte{'p'}) && len(b) > 0 {
					t.Fatalf("pgwarden answered the password request: %q", b)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the fake upstream never saw pgwarden hang up")
			}
		})
	}
}

// 6b. A session that tampers with its shared user's role settings — the ones
// that would turn item 6's fix into a lock-out (read-only transactions, a
// 1ms statement_timeout) included — cannot reach the next identity's
// session, and a setting the operator's creation statements gave the level
// survives.
func TestItem06TamperedRoleSettingsAreRestored(t *testing.T) {
	st := needStack(t)
	cred := pgRole(t, st)
	ctx := context.Background()
	// What an operator's creation statements may do for a level.
	if err := st.PG.Exec(ctx, "postgres", "ALTER ROLE "+cred.Username+" SET statement_timeout = '5s'"); err != nil {
		t.Fatal(err)
	}
	_, addr := startProxy(t, proxy.Config{Credentials: fixedCred(cred), Routes: appRoute(st, "")})
	alice := dial(t, addr, "reader", "alice-t") // the credential's first session: its settings are recorded
	for _, q := range []string{
		"ALTER ROLE CURRENT_USER SET default_transaction_read_only = on",
		"ALTER ROLE CURRENT_USER SET statement_timeout = '1ms'",
		"ALTER ROLE CURRENT_USER SET lock_timeout = '1ms'",
		"ALTER ROLE CURRENT_USER IN DATABASE app SET search_path = evil, pg_catalog",
		"ALTER ROLE CURRENT_USER SET role = app_read",
	} {
		if _, err := query1(ctx, alice, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	bob := dial(t, addr, "reader", "bob-t") // alice holds hers: bob's session is new
	for q, want := range map[string]string{
		"show statement_timeout":             "5s",
		"show default_transaction_read_only": "off",
		"show lock_timeout":                  "0",
		"show search_path":                   `"$user", public`,
		"select current_user":                cred.Username,
	} {
		if got, err := query1(ctx, bob, q); err != nil || got != want {
			t.Errorf("bob's %s = %q (%v), want %q", q, got, err, want)
		}
	}
	var n int
	if err := superuserQuery(ctx, st, "select count(*) from pg_db_role_setting where setrole = (select oid from pg_roles where rolname = '"+cred.Username+"')", &n); err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Errorf("%d pg_db_role_setting rows for the role, want the operator's one", n)
	}
}

// rotatingCreds hands out creds[0] until it is forgotten, then the next.
type rotatingCreds struct {
	mu        sync.Mutex
	creds     []*broker.Credential
	forgotten []string
}

func (r *rotatingCreds) Credential(context.Context, broker.Request) (*broker.Credential, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.creds[0], nil
}

func (r *rotatingCreds) Forget(c *broker.Credential) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.forgotten = append(r.forgotten, c.Username)
	if len(r.creds) > 1 && r.creds[0] == c {
		r.creds = r.creds[1:]
	}
}

// 6c. PostgreSQL lets a role change its own password. A session that does so
// does not lock every other identity out of the shared credential: the
// refused credential is forgotten and the next session opens under a fresh
// one.
func TestItem06PasswordChangeDoesNotLockOutAnotherIdentity(t *testing.T) {
	st := needStack(t)
	first, second := pgRole(t, st), pgRole(t, st)
	src := &rotatingCreds{creds: []*broker.Credential{first, second}}
	_, addr := startProxy(t, proxy.Config{Credentials: src, Routes: appRoute(st, "")})
	ctx := context.Background()
	alice := dial(t, addr, "reader", "alice-p")
	if _, err := query1(ctx, alice, "ALTER ROLE CURRENT_USER PASSWORD 'chosen-by-alice'"); err != nil {
		t.Fatalf("a role changing its own password: %v", err)
	}
	bob := dial(t, addr, "reader", "bob-p") // alice holds hers: bob's session is new
	if got, err := query1(ctx, bob, "select current_user"); err != nil || got != second.Username {
		t.Fatalf("bob runs as %q (%v), want the fresh credential %s", got, err, second.Username)
	}
	src.mu.Lock()
	defer src.mu.Unlock()
	if len(src.forgotten) != 1 || src.forgotten[0] != first.Username {
		t.Fatalf("forgotten = %v, want the refused credential %s once", src.forgotten, first.Username)
	}
}

// 3d. After a silent network cut, a client pays for one ping, not one per
// idle session: the others idle as long are dropped with the first, and no
// ping outlasts the client's authentication deadline.
func TestItem03StalledPoolCostsTheClientOnePing(t *testing.T) {
	st := needStack(t)
	fwd := forwarder(t, st)
	srv, addr := startProxy(t, proxy.Config{Credentials: fixedCred(pgRole(t, st)), Routes: appRoute(st, fwd.Addr),
		AuthTimeout: 2500 * time.Millisecond,
		Pool:        pool.Config{PingAfterIdle: time.Millisecond, PingTimeout: time.Second}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var held []*pgconn.PgConn
	for i := range 4 {
		c := dial(t, addr, "reader", fmt.Sprint("stall-", i))
		if _, err := query1(ctx, c, "select 1"); err != nil { // attached: one server each
			t.Fatal(err)
		}
		held = append(held, c)
	}
	for _, c := range held {
		c.Close(ctx)
	}
	eventually(t, 10*time.Second, func() bool { i, _ := poolActive(srv, "reader"); return i == 4 }, "sessions not pooled")
	time.Sleep(10 * time.Millisecond) // idle longer than PingAfterIdle
	fwd.Stall()
	// Four pings of a second each would pass the 2.5s authentication deadline.
	next := dial(t, addr, "reader", "after-stall")
	if got, err := query1(ctx, next, "select 'served'"); err != nil || got != "served" {
		t.Fatalf("after the stall: %q %v", got, err)
	}
	if i, _ := poolActive(srv, "reader"); i != 0 {
		t.Fatalf("%d stale sessions still idle after one timed out", i)
	}
}
