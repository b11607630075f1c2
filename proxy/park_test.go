package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/proxy"
)

// Idle clients in transaction mode park: no goroutine each, woken by their
// next message, their hang-up, a timer or the server closing.

// TestTxnIdleClientsPark: twenty clients over two servers, each idle after
// its query, are all parked; each one's next query wakes it and is answered
// right; one that hangs up while parked is gone from the count.
func TestTxnIdleClientsPark(t *testing.T) {
	srv, addr := txnProxy(t, proxy.PoolTransaction, 2)
	const n = 20
	ctx := context.Background()
	conns := make([]*pgconn.PgConn, n)
	for i := range conns {
		conns[i] = dial(t, addr, "reader", fmt.Sprintf("parker-%d", i))
		if got, err := query1(ctx, conns[i], fmt.Sprintf("select %d", i)); err != nil || got != fmt.Sprint(i) {
			t.Fatalf("client %d: %q, %v", i, got, err)
		}
	}
	eventually(t, 10*time.Second, func() bool { return srv.ParkedClients() == n },
		"%d of %d idle clients parked", srv.ParkedClients(), n)
	for round := range 3 {
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for i, c := range conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				want := fmt.Sprint(round*100 + i)
				got, err := query1(ctx, c, "select "+want)
				if err == nil && got != want {
					err = fmt.Errorf("got %q, want %q", got, want)
				}
				if err != nil {
					errs <- fmt.Errorf("client %d, round %d: %w", i, round, err)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		eventually(t, 10*time.Second, func() bool { return srv.ParkedClients() == n },
			"after round %d: %d of %d idle clients parked", round, srv.ParkedClients(), n)
	}
	conns[0].Close(ctx)
	eventually(t, 10*time.Second, func() bool { return srv.ParkedClients() == n-1 },
		"a parked client that hung up is still counted: %d parked", srv.ParkedClients())
}

// TestTxnParkedClientWokenByTimers: a parked client still gets the NOTICE
// before its token expires and the FATAL 57P01 when it has.
func TestTxnParkedClientWokenByTimers(t *testing.T) {
	st := needStack(t)
	routes := appRoute(st, "")
	r := routes["app"]
	r.Modes = map[string]string{"reader": proxy.PoolTransaction}
	routes["app"] = r
	srv, addr := startProxy(t, proxy.Config{Routes: routes, Credentials: fixedCred(pgRole(t, st)),
		Verifier: expiringVerifier{ttl: 5 * time.Second}, TokenExpiryNotice: 3 * time.Second,
		Pool: pool.Config{MaxPerPool: 2, MaxTotal: 2}})
	c, notices := connectHearingNotices(t, addr, "brief")
	ctx := context.Background()
	if _, err := query1(ctx, c, "select 1"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, func() bool { return srv.ParkedClients() == 1 }, "the idle client did not park")
	time.Sleep(6 * time.Second) // past the notice and the expiry, parked throughout
	expectTokenExpiredWithOneNotice(t, c, notices)
	if n := srv.ParkedClients(); n != 0 {
		t.Fatalf("%d parked after the session ended", n)
	}
}

// TestTxnParkedClientsEndWithTheServer: Close wakes every parked client to
// find its connection closed, and each one's session is ended once: every
// connection counted in is counted out.
func TestTxnParkedClientsEndWithTheServer(t *testing.T) {
	st := needStack(t)
	routes := appRoute(st, "")
	r := routes["app"]
	r.Modes = map[string]string{"reader": proxy.PoolTransaction}
	routes["app"] = r
	obs := &connCounter{}
	srv, addr := startProxy(t, proxy.Config{Routes: routes, Credentials: fixedCred(pgRole(t, st)), Observer: obs,
		Pool: pool.Config{MaxPerPool: 2, MaxTotal: 2}})
	ctx := context.Background()
	var conns []*pgconn.PgConn
	for i := range 5 {
		c := dial(t, addr, "reader", fmt.Sprintf("closing-%d", i))
		if _, err := query1(ctx, c, "select 1"); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	eventually(t, 10*time.Second, func() bool { return srv.ParkedClients() == 5 }, "idle clients did not park")
	srv.Close()
	for i, c := range conns {
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := query1(qctx, c, "select 1")
		timedOut := qctx.Err() != nil
		cancel()
		if err == nil {
			t.Errorf("client %d: answered after the server closed", i)
		}
		if timedOut {
			t.Errorf("client %d: no answer at all, not even the close", i)
		}
	}
	if n := srv.ParkedClients(); n != 0 {
		t.Fatalf("%d parked after Close", n)
	}
	eventually(t, 10*time.Second, func() bool { return obs.closed.Load() == obs.connected.Load() },
		"%d connections counted in, %d counted out", obs.connected.Load(), obs.closed.Load())
	time.Sleep(200 * time.Millisecond) // a second end of one session would count out once more
	if in, out := obs.connected.Load(), obs.closed.Load(); in != 5 || out != 5 {
		t.Fatalf("%d connections counted in, %d out; want 5 and 5", in, out)
	}
}

// TestTxnClientParksAfterAnExplicitTransaction: a transaction whose server
// a server goroutine held (BEGIN … COMMIT) leaves its client parked too.
func TestTxnClientParksAfterAnExplicitTransaction(t *testing.T) {
	srv, addr := txnProxy(t, proxy.PoolTransaction, 2)
	ctx := context.Background()
	c := dial(t, addr, "reader", "orm")
	for _, q := range []string{"begin", "select 1", "commit"} {
		if _, err := query1(ctx, c, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	eventually(t, 10*time.Second, func() bool { return srv.ParkedClients() == 1 },
		"a client idle after BEGIN … COMMIT did not park")
	if got, err := query1(ctx, c, "select 2"); err != nil || got != "2" {
		t.Fatalf("after parking: %q %v", got, err)
	}
}

// TestGreetingCarriesTheClientsOwnSettings: with one server, shared under
// one credential, a client logging in after another one set its own
// application_name and TimeZone is told (ParameterStatus) and gets its own
// values, never the other client's — in both modes.
func TestGreetingCarriesTheClientsOwnSettings(t *testing.T) {
	for _, mode := range []string{proxy.PoolSession, proxy.PoolTransaction} {
		t.Run(mode, func(t *testing.T) {
			_, addr := txnProxy(t, mode, 1)
			ctx := context.Background()
			acfg := harnessConfig(t, addr, "reader", "alice-"+mode)
			acfg.RuntimeParams["application_name"] = "alice-payroll"
			acfg.RuntimeParams["TimeZone"] = "Pacific/Chatham"
			a, err := pgconn.ConnectConfig(ctx, acfg)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := query1(ctx, a, "select current_setting('TimeZone')"); err != nil || got != "Pacific/Chatham" {
				t.Fatalf("alice's TimeZone: %q %v", got, err)
			}
			a.Close(ctx)
			b := dial(t, addr, "reader", "bob-"+mode)
			if v := b.ParameterStatus("application_name"); v != "" {
				t.Errorf("bob is told application_name %q, want empty", v)
			}
			if v := b.ParameterStatus("TimeZone"); v == "Pacific/Chatham" {
				t.Errorf("bob is told alice's TimeZone %q", v)
			}
			got, err := query1(ctx, b, "select current_setting('application_name') || '|' || current_setting('TimeZone')")
			if err != nil {
				t.Fatal(err)
			}
			if want := "|" + b.ParameterStatus("TimeZone"); got != want {
				t.Errorf("bob's session has %q, he was told %q", got, want)
			}
		})
	}
}

// connCounter counts connections in and out.
type connCounter struct{ connected, closed atomic.Int32 }

func (o *connCounter) ClientConnected()                         { o.connected.Add(1) }
func (o *connCounter) ClientClosed()                            { o.closed.Add(1) }
func (o *connCounter) AuthResult(string, string, string)        {}
func (o *connCounter) PoolWaited(string, string, time.Duration) {}
func (o *connCounter) CancelRequest(string)                     {}

// expiringVerifier takes the token as the subject, valid for ttl from now.
type expiringVerifier struct{ ttl time.Duration }

func (v expiringVerifier) Verify(_ context.Context, tok string) (*authn.Identity, error) {
	return &authn.Identity{Subject: tok, Name: tok, Expiry: time.Now().Add(v.ttl)}, nil
}

// connectHearingNotices connects subject as reader and collects the
// NOTICEs it receives.
func connectHearingNotices(t *testing.T, addr, subject string) (*pgconn.PgConn, func() []string) {
	t.Helper()
	cfg := harnessConfig(t, addr, "reader", subject)
	var mu sync.Mutex
	var notices []string
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) { mu.Lock(); notices = append(notices, n.Message); mu.Unlock() }
	c, err := pgconn.ConnectConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c, func() []string { mu.Lock(); defer mu.Unlock(); return slices.Clone(notices) }
}

// expectTokenExpiredWithOneNotice: c's next query gets FATAL 57P01 saying
// its token expired, and c heard exactly one NOTICE before, saying it would.
func expectTokenExpiredWithOneNotice(t *testing.T, c *pgconn.PgConn, notices func() []string) {
	t.Helper()
	_, err := query1(context.Background(), c, "select 1")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "57P01" || !strings.Contains(pgErr.Message, "token expired") {
		t.Fatalf("after the token expired: %v, want FATAL 57P01 saying so", err)
	}
	if n := notices(); len(n) != 1 || !strings.Contains(n[0], "token expires") {
		t.Fatalf("notices %q, want one saying the token expires", n)
	}
}
