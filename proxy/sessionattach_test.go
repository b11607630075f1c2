package proxy_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/proxy"
)

// In session mode a client holds a server from its first message to its
// end, not from its login.

// TestSessionClientHoldsNoServerBeforeItsFirstMessage: with one server in
// the pool, five clients log in and sit idle; a sixth runs queries on that
// server meanwhile; then each of the five, in turn, gets it for its own
// session, with its own settings and identity.
func TestSessionClientHoldsNoServerBeforeItsFirstMessage(t *testing.T) {
	st := needStack(t)
	srv, addr := startProxy(t, proxy.Config{Credentials: fixedCred(pgRole(t, st)), Routes: appRoute(st, ""),
		Pool: pool.Config{MaxPerPool: 1, MaxTotal: 1, AcquireTimeout: 20 * time.Second}})
	ctx := context.Background()
	var idle []*pgconn.PgConn
	for i := range 5 {
		cfg := harnessConfig(t, addr, "reader", fmt.Sprintf("idler-%d", i))
		cfg.RuntimeParams["application_name"] = fmt.Sprintf("idler app %d", i)
		c, err := pgconn.ConnectConfig(ctx, cfg)
		if err != nil {
			t.Fatalf("login %d with one server in the pool: %v", i, err)
		}
		idle = append(idle, c)
	}
	if _, active := poolActive(srv, "reader"); active != 0 {
		t.Fatalf("%d servers lent to clients that sent nothing", active)
	}
	busy := dial(t, addr, "reader", "busy")
	for i := range 3 {
		if got, err := query1(ctx, busy, fmt.Sprintf("select %d", i)); err != nil || got != fmt.Sprint(i) {
			t.Fatalf("busy client's query %d: %q %v", i, got, err)
		}
	}
	busy.Close(ctx)
	for i, c := range idle {
		got, err := query1(ctx, c, "select current_setting('application_name') || ' / ' || current_setting('pgwarden.subject')")
		if want := fmt.Sprintf("idler app %d / idler-%d", i, i); err != nil || got != want {
			t.Fatalf("idle client %d's first query: %q %v, want %q", i, got, err, want)
		}
		c.Close(ctx)
	}
}

// TestSessionClientWaitingForItsFirstMessageHearsItsToken: a client that
// logs in and sends nothing still gets the NOTICE before its token expires
// and the FATAL 57P01 when it has.
func TestSessionClientWaitingForItsFirstMessageHearsItsToken(t *testing.T) {
	st := needStack(t)
	srv, addr := startProxy(t, proxy.Config{Credentials: fixedCred(pgRole(t, st)), Routes: appRoute(st, ""),
		Verifier: expiringVerifier{ttl: 4 * time.Second}, TokenExpiryNotice: 2 * time.Second})
	c, notices := connectHearingNotices(t, addr, "quiet")
	time.Sleep(5 * time.Second) // past the notice and the expiry, without a word
	expectTokenExpiredWithOneNotice(t, c, notices)
	if _, active := poolActive(srv, "reader"); active != 0 {
		t.Fatalf("%d servers lent after the session ended", active)
	}
}
