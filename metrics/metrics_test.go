package metrics

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestHooksFeedCollectors(t *testing.T) {
	t.Parallel()
	m := New(func() []PoolSize { return []PoolSize{{Database: "app", Level: "reader", Idle: 2, Active: 3}} })
	m.ClientConnected()
	m.ClientConnected()
	m.ClientClosed()
	m.AuthResult("app", "reader", "ok")
	m.AuthResult("app", "", "expired")
	m.ObserveVault("creds", 5*time.Millisecond, nil)
	m.ObserveVault("login", time.Millisecond, errors.New("boom"))

	if got := testutil.ToFloat64(m.clientsOpen); got != 1 {
		t.Errorf("open clients = %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.authTotal.WithLabelValues("app", "", "expired")); got != 1 {
		t.Errorf("expired auths = %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.vaultErrors.WithLabelValues("login")); got != 1 {
		t.Errorf("login errors = %v, want 1", got)
	}
	want := `
# HELP pgwarden_pool_connections Upstream connections by database, access level and state (idle, active).
# TYPE pgwarden_pool_connections gauge
pgwarden_pool_connections{database="app",level="reader",state="active"} 3
pgwarden_pool_connections{database="app",level="reader",state="idle"} 2
`
	if err := testutil.GatherAndCompare(m.reg, strings.NewReader(want), "pgwarden_pool_connections"); err != nil {
		t.Error(err)
	}
}

func TestReadyzFollowsCheck(t *testing.T) {
	t.Parallel()
	m := New(nil)
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	status := func(path string) int {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if s := status("/healthz"); s != 200 {
		t.Fatalf("/healthz = %d", s)
	}
	if s := status("/readyz"); s != 503 {
		t.Fatalf("/readyz before a check = %d, want 503", s)
	}
	var fail atomic.Bool
	fail.Store(true)
	m.SetReadiness(Check{Name: "vault", Run: func(context.Context) error {
		if fail.Load() {
			return errors.New("vault sealed")
		}
		return nil
	}})
	if s := status("/readyz"); s != 503 {
		t.Fatalf("/readyz failing = %d, want 503", s)
	}
	fail.Store(false)
	m.RecheckReadiness() // rather than wait out ReadyCacheFor
	if s := status("/readyz"); s != 200 {
		t.Fatalf("/readyz passing = %d, want 200", s)
	}
	if s := status("/metrics"); s != 200 {
		t.Fatalf("/metrics = %d", s)
	}
}
