package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/pgwarden/pgwarden/pgerror"
)

// fakeVault answers JWT logins (token "good-*" only, role "app-reader") and
// creds reads, counting each, with lease and token TTLs set by the test.
type fakeVault struct {
	logins, reads, renews, revokes atomic.Int32
	leaseTTL, tokenTTL             int
	delay                          time.Duration
	// renewable leases are renewed by the broker: renewTTL is what a renewal
	// grants, renewStatus (when set) the HTTP status it fails with instead.
	renewable   bool
	renewTTL    int
	renewStatus int
	// credsStatus, when set, is the status every creds read fails with.
	credsStatus atomic.Int32
}

func (f *fakeVault) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	time.Sleep(f.delay)
	w.Header().Set("Content-Type", "application/json")
	switch {
	case r.URL.Path == "/v1/auth/jwt/login":
		var body struct{ Role, JWT string }
		_ = json.NewDecoder(r.Body).Decode(&body)
		n := f.logins.Add(1)
		if !strings.HasPrefix(body.JWT, "good") || body.Role != "app-reader" {
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte(`{"errors":["error validating claims: claim \"groups\" does not match any associated bound claim values"]}`))
			return
		}
		fmt.Fprintf(w, `{"auth":{"client_token":"hvs.vt-%d","lease_duration":%d,"renewable":true}}`, n, f.tokenTTL)
	case strings.HasPrefix(r.URL.Path, "/v1/database/creds/"):
		if !strings.HasPrefix(r.Header.Get("X-Vault-Token"), "hvs.vt-") {
			w.WriteHeader(http.StatusForbidden)
			_, _ = w.Write([]byte(`{"errors":["permission denied"]}`))
			return
		}
		if st := f.credsStatus.Load(); st != 0 {
			w.WriteHeader(int(st))
			_, _ = w.Write([]byte(`{"errors":["permission denied"]}`))
			return
		}
		n := f.reads.Add(1)
		fmt.Fprintf(w, `{"lease_id":"database/creds/app-reader/l%d","lease_duration":%d,"renewable":%v,"data":{"username":"v-user-%d","password":"pw-%d"}}`, n, f.leaseTTL, f.renewable, n, n)
	case r.URL.Path == "/v1/sys/leases/renew":
		f.renews.Add(1)
		if f.renewStatus != 0 {
			w.WriteHeader(f.renewStatus)
			_, _ = w.Write([]byte(`{"errors":["lease not found"]}`))
			return
		}
		var body struct {
			LeaseID string `json:"lease_id"`
		}
		_ = json.NewDecoder(r.Body).Decode(&body)
		fmt.Fprintf(w, `{"lease_id":%q,"lease_duration":%d,"renewable":true}`, body.LeaseID, f.renewTTL)
	case r.URL.Path == "/v1/auth/token/revoke-self":
		f.revokes.Add(1)
		w.WriteHeader(http.StatusNoContent)
	default:
		w.WriteHeader(http.StatusNotFound)
	}
}

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }
func newClock() *clock               { return &clock{now: time.Unix(1_800_000_000, 0)} }

func newBroker(t *testing.T, fv *fakeVault, now func() time.Time) *Broker {
	t.Helper()
	srv := httptest.NewServer(fv)
	t.Cleanup(srv.Close)
	cfg := vault.DefaultConfig()
	cfg.Address = srv.URL
	cfg.MaxRetries = 0
	c, err := vault.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.ClearToken()
	b, err := New(Config{Client: c, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close(context.Background(), false) })
	return b
}

func req(tok string, exp time.Time) Request {
	return Request{Token: tok, TokenExpiry: exp, VaultRole: "app-reader"}
}

func TestConcurrentFirstRequestsShareOneRead(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{leaseTTL: 3600, tokenTTL: 3600, delay: 20 * time.Millisecond}
	b := newBroker(t, fv, nil)
	exp := time.Now().Add(time.Hour)
	var wg sync.WaitGroup
	users := make(chan string, 50)
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := b.Credential(context.Background(), req(fmt.Sprintf("good-%d", i), exp))
			if err != nil {
				t.Error(err)
				return
			}
			users <- c.Username
		}()
	}
	wg.Wait()
	close(users)
	for u := range users {
		if u != "v-user-1" {
			t.Fatalf("a client got %s; all should share the first credential", u)
		}
	}
	if got := fv.reads.Load(); got != 1 {
		t.Errorf("creds reads = %d, want 1", got)
	}
	if got := fv.logins.Load(); got != 50 {
		t.Errorf("logins = %d, want one per distinct token (50)", got)
	}
}

func TestLoginIsCachedPerTokenUntilItsEnd(t *testing.T) {
	t.Parallel()
	clk := newClock()
	fv := &fakeVault{leaseTTL: 3600, tokenTTL: 600}
	b := newBroker(t, fv, clk.Now)
	exp := clk.Now().Add(time.Hour)
	for range 3 {
		if _, err := b.Credential(context.Background(), req("good-a", exp)); err != nil {
			t.Fatal(err)
		}
	}
	if got := fv.logins.Load(); got != 1 {
		t.Fatalf("logins for one token = %d, want 1", got)
	}
	clk.Add(601 * time.Second) // past the Vault token's TTL
	if _, err := b.Credential(context.Background(), req("good-a", exp)); err != nil {
		t.Fatal(err)
	}
	if got := fv.logins.Load(); got != 2 {
		t.Fatalf("logins after the Vault token ended = %d, want 2", got)
	}
	// A JWT expiring before the Vault token bounds the cached login too.
	short := clk.Now().Add(10 * time.Second)
	if _, err := b.Credential(context.Background(), req("good-b", short)); err != nil {
		t.Fatal(err)
	}
	clk.Add(11 * time.Second)
	if _, err := b.Credential(context.Background(), req("good-b", short)); err != nil {
		t.Fatal(err)
	}
	if got := fv.logins.Load(); got != 4 {
		t.Fatalf("logins = %d, want 4: a login must not outlive its JWT", got)
	}
}

func TestCredentialIsNotHandedOutPastRetirement(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{leaseTTL: 2, tokenTTL: 3600}
	b := newBroker(t, fv, nil)
	exp := time.Now().Add(time.Hour)
	start := time.Now()
	c1, err := b.Credential(context.Background(), req("good-a", exp))
	if err != nil {
		t.Fatal(err)
	}
	if end := c1.ExpiresAt(); end.Before(start.Add(2*time.Second)) || end.After(time.Now().Add(2*time.Second)) {
		t.Fatalf("ExpiresAt = %v, want the lease's end, 2s after the read", end)
	}
	if m := c1.ExpiresAt().Sub(c1.RetireAt()); m < time.Second || m > 1500*time.Millisecond {
		t.Fatalf("retire margin = %v, want 1s (the least margin) plus up to half that in jitter", m)
	}
	if c, _ := b.Credential(context.Background(), req("good-b", exp)); c.Username != c1.Username {
		t.Fatal("a credential inside its life was not shared")
	}
	waitFor(t, "the credential to retire", c1.Retired)
	if c1.Ended() {
		t.Fatal("retired and ended at once: sessions get no idle point to end at")
	}
	c2, err := b.Credential(context.Background(), req("good-a", exp))
	if err != nil {
		t.Fatal(err)
	}
	if c2.Username == c1.Username {
		t.Fatal("a retiring credential was handed out")
	}
	waitFor(t, "the old credential to end", c1.Ended)
}

// waitFor polls cond for up to 10s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestLeaseIsBoundedByTheReadingToken(t *testing.T) {
	t.Parallel()
	clk := newClock()
	fv := &fakeVault{leaseTTL: 3600, tokenTTL: 60}
	b := newBroker(t, fv, clk.Now)
	c, err := b.Credential(context.Background(), req("good-a", clk.Now().Add(time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	if want := clk.Now().Add(time.Minute); !c.ExpiresAt().Equal(want) {
		t.Fatalf("ExpiresAt = %v, want the Vault token's end %v: Vault revokes leases with their token", c.ExpiresAt(), want)
	}
}

// Hardening item 7: Vault's error text (which can reveal claim bindings)
// stays in the log; an outage is 08006.
func TestItem07VaultRefusalReasonStaysInTheLog(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{leaseTTL: 3600, tokenTTL: 3600}
	b := newBroker(t, fv, nil)
	_, err := b.Credential(context.Background(), req("bad-token", time.Now().Add(time.Hour)))
	var ve *VaultError
	if !errors.As(err, &ve) || !ve.Denied() || ve.Op != "login" {
		t.Fatalf("err = %v, want a denied login VaultError", err)
	}
	pe := pgerror.From(err)
	if pe.Code != pgerror.InsufficientPrivilege {
		t.Fatalf("refusal = %s %q / %q", pe.Code, pe.Message, pe.Detail)
	}
	if strings.Contains(pe.Message+pe.Detail+pe.Hint, "bad-token") {
		t.Fatal("token in the client-facing error")
	}
	// Vault's reason names claim bindings: the operator's log gets it (the
	// error's text), the client does not (Message, Detail, Hint).
	if client := pe.Message + pe.Detail + pe.Hint; strings.Contains(client, "bound claim") || strings.Contains(client, "groups") {
		t.Fatalf("Vault's reason reaches the client: %q", client)
	}
	if !strings.Contains(err.Error(), "bound claim") {
		t.Fatalf("Vault's reason is lost for the log: %v", err)
	}

	cfg := vault.DefaultConfig()
	cfg.Address = "http://127.0.0.1:1"
	cfg.MaxRetries = 0
	c, _ := vault.NewClient(cfg)
	down, _ := New(Config{Client: c})
	_, err = down.Credential(context.Background(), req("good-a", time.Now().Add(time.Hour)))
	if !errors.As(err, &ve) || ve.Denied() || pgerror.Code(err) != pgerror.ConnectionFailure {
		t.Fatalf("unreachable Vault: err = %v (code %s), want 08006", err, pgerror.Code(err))
	}
}

func TestCredentialLogValueHidesPassword(t *testing.T) {
	t.Parallel()
	c := Fixed("u", "hunter2", "l", time.Now().Add(time.Hour), time.Now().Add(time.Hour))
	if strings.Contains(c.LogValue().String(), "hunter2") {
		t.Fatal("password in log value")
	}
}

// The client whose request leads a shared Vault call may give up; the
// others waiting on the same call must still get their credential.
func TestLeaderGivingUpDoesNotFailFollowers(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{leaseTTL: 3600, tokenTTL: 3600, delay: 300 * time.Millisecond}
	b := newBroker(t, fv, nil)
	exp := time.Now().Add(time.Hour)
	// Log both in first, so that only the creds read is shared.
	for _, tok := range []string{"good-leader", "good-follower"} {
		if _, _, err := b.login(context.Background(), req(tok, exp)); err != nil {
			t.Fatal(err)
		}
	}
	leaderCtx, cancel := context.WithCancel(context.Background())
	leaderErr := make(chan error, 1)
	go func() {
		_, err := b.Credential(leaderCtx, req("good-leader", exp))
		leaderErr <- err
	}()
	followerErr := make(chan error, 1)
	go func() {
		time.Sleep(50 * time.Millisecond) // joins the read in flight
		_, err := b.Credential(context.Background(), req("good-follower", exp))
		followerErr <- err
	}()
	time.Sleep(150 * time.Millisecond)
	cancel() // the leader's client hangs up mid-read
	if err := <-followerErr; err != nil {
		t.Fatalf("follower failed with the leader's cancellation: %v", err)
	}
	if err := <-leaderErr; !errors.Is(err, context.Canceled) {
		t.Errorf("leader: err = %v, want its own cancellation", err)
	}
	if got := fv.reads.Load(); got != 1 {
		t.Errorf("creds reads = %d, want 1", got)
	}
}

// Two routes whose levels use the same Vault role name still get a
// credential each: the cache is keyed by database and role.
func TestItem08CredentialCacheIsKeyedByDatabaseAndRole(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{leaseTTL: 3600, tokenTTL: 3600}
	b := newBroker(t, fv, nil)
	ra, rb := req("good-a", time.Now().Add(time.Hour)), req("good-a", time.Now().Add(time.Hour))
	ra.Database, rb.Database = "a", "b"
	ca, err := b.Credential(context.Background(), ra)
	if err != nil {
		t.Fatal(err)
	}
	cb, err := b.Credential(context.Background(), rb)
	if err != nil {
		t.Fatal(err)
	}
	if ca.Username == cb.Username || fv.reads.Load() != 2 {
		t.Fatalf("databases a and b share credential %s (%d reads)", ca.Username, fv.reads.Load())
	}
}

// Forget drops the refused credential so the next request reads a new one,
// but only while it is still the cached one: clients refused together cause
// one new read.
func TestForgetDropsOnlyTheRefusedCredential(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{leaseTTL: 3600, tokenTTL: 3600}
	b := newBroker(t, fv, nil)
	ctx := context.Background()
	r := req("good-a", time.Now().Add(time.Hour))
	old, err := b.Credential(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	b.Forget(old)
	fresh, err := b.Credential(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if fresh == old || fv.reads.Load() != 2 {
		t.Fatalf("after Forget: same credential %v (%d reads)", fresh == old, fv.reads.Load())
	}
	b.Forget(old) // a late refusal of the old one
	if again, _ := b.Credential(ctx, r); again != fresh || fv.reads.Load() != 2 {
		t.Fatalf("forgetting a replaced credential dropped its successor (%d reads)", fv.reads.Load())
	}
}
