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
	mu          sync.Mutex
	renewStatus int // guarded by mu
	// credsStatus, when set, is the status every creds read fails with.
	credsStatus atomic.Int32
	// revoked is a Vault token the fake refuses (403), as Vault does a
	// token revoked behind pgwarden's back.
	revoked atomic.Value
	// staticTTL is the ttl of static-creds answers (time to rotation).
	staticTTL int
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
		if rv, _ := f.revoked.Load().(string); rv != "" && r.Header.Get("X-Vault-Token") == rv {
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
	case strings.HasPrefix(r.URL.Path, "/v1/database/static-creds/"):
		n := f.reads.Add(1)
		fmt.Fprintf(w, `{"data":{"username":"app_report","password":"pw-%d","ttl":%d,"rotation_period":60}}`, n, f.staticTTL)
	case r.URL.Path == "/v1/sys/leases/renew":
		f.renews.Add(1)
		f.mu.Lock()
		st := f.renewStatus
		f.mu.Unlock()
		if st != 0 {
			w.WriteHeader(st)
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
	return newBrokerWith(t, fv, Config{Now: now})
}

// newBrokerWith serves fv and returns a broker configured as cfg says; with
// cfg.Self set to a non-nil *Self, a token-method identity using the
// fake's "hvs.vt-self" token is made (role scope).
func newBrokerWith(t *testing.T, fv *fakeVault, cfg Config) *Broker {
	t.Helper()
	srv := httptest.NewServer(fv)
	t.Cleanup(srv.Close)
	vcfg := vault.DefaultConfig()
	vcfg.Address = srv.URL
	vcfg.MaxRetries = 0
	c, err := vault.NewClient(vcfg)
	if err != nil {
		t.Fatal(err)
	}
	c.ClearToken()
	cfg.Client = c
	if cfg.Self != nil {
		done := make(chan struct{})
		close(done)
		cfg.Self = &Self{base: c, token: "hvs.vt-self", ctx: context.Background(), stop: func() {}, done: done}
	}
	b, err := New(cfg)
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
	if _, err := b.Credential(context.Background(), req("good-b", short)); pgerror.Code(err) != pgerror.InvalidPassword {
		t.Fatalf("past the JWT's exp: %v, want 28P01: a login must not outlive its JWT", err)
	}
	if got := fv.logins.Load(); got != 3 {
		t.Fatalf("logins = %d, want 3: an expired token is not sent to Vault", got)
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
	waitFor(t, "the old credential, retired and unheld, to finish", c1.Finished)
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

func reqAs(sub, tok string, exp time.Time) Request {
	return Request{Token: tok, TokenExpiry: exp, Subject: sub, VaultRole: "app-reader"}
}

// Identity scope: each subject has a credential of its own, shared by their
// tokens that end about when the login that read it does; it never outlives
// that login.
func TestIdentityScopeKeysBySubject(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{leaseTTL: 7200, tokenTTL: 7200}
	b := newBroker(t, fv, nil)
	ctx := context.Background()
	exp := time.Now().Add(time.Hour)
	a1, err := b.Credential(ctx, reqAs("alice", "good-a1", exp))
	if err != nil {
		t.Fatal(err)
	}
	a2, _ := b.Credential(ctx, reqAs("alice", "good-a2", exp.Add(-time.Minute)))
	bob, _ := b.Credential(ctx, reqAs("bob", "good-b", exp))
	if a1 != a2 || a1 == bob || fv.reads.Load() != 2 {
		t.Fatalf("alice's two tokens share: %v; alice and bob differ: %v; reads %d (want 2)", a1 == a2, a1 != bob, fv.reads.Load())
	}
	if a1.Scope != ScopeIdentity || a1.Subject != "alice" {
		t.Fatalf("scope %q subject %q", a1.Scope, a1.Subject)
	}
	// A token of alice's that ends a little later (a client fetching one per
	// connection) shares her lease: not a lease per token.
	later, _ := b.Credential(ctx, reqAs("alice", "good-a3", exp.Add(time.Minute)))
	if later != a1 || fv.reads.Load() != 2 {
		t.Fatalf("a token of alice's ending a minute later read a new credential (%d reads)", fv.reads.Load())
	}
	// One that outlives her lease's login by more than the slack reads her
	// a new one: the lease dies with the token that read it.
	much, _ := b.Credential(ctx, reqAs("alice", "good-a4", exp.Add(time.Hour)))
	if much == a1 || fv.reads.Load() != 3 {
		t.Fatalf("a token of alice's outliving her lease's login by an hour shared it (%d reads)", fv.reads.Load())
	}
	if r := a1.RetireAt(); r.After(exp) {
		t.Fatalf("alice's first lease retires at %v, after the token that read it expires (%v)", r, exp)
	}
}

// Role scope needs pgwarden's own identity; with it, one credential is read
// with pgwarden's token and shared by every subject.
func TestRoleScopeIsReadByPgwardensOwnIdentity(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{leaseTTL: 3600, tokenTTL: 3600}
	none := newBroker(t, fv, nil)
	r := reqAs("alice", "good-a", time.Now().Add(time.Hour))
	r.Scope = ScopeRole
	if _, err := none.Credential(context.Background(), r); pgerror.Code(err) != pgerror.ConfigurationFileError {
		t.Fatalf("role scope without an own identity: %v", err)
	}
	b := newBrokerWith(t, fv, Config{Self: &Self{}})
	a, err := b.Credential(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	r2 := reqAs("bob", "good-b", time.Now().Add(time.Hour))
	r2.Scope = ScopeRole
	bb, _ := b.Credential(context.Background(), r2)
	if a != bb || a.Scope != ScopeRole || a.Subject != "" {
		t.Fatalf("role scope: shared %v, scope %q, subject %q", a == bb, a.Scope, a.Subject)
	}
	if fv.logins.Load() != 2 {
		t.Fatalf("logins = %d: each client must still log in itself", fv.logins.Load())
	}
}

// Renewal (LifetimeWatcher) moves a lease's end; a renewal Vault refuses
// (the lease was revoked behind pgwarden's back) retires it at once.
func TestRenewalExtendsOrRetiresTheLease(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{leaseTTL: 30, tokenTTL: 3600, renewable: true, renewTTL: 600}
	b := newBroker(t, fv, nil)
	c, err := b.Credential(context.Background(), reqAs("alice", "good-a", time.Now().Add(time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a renewal to extend the lease", func() bool { return c.ExpiresAt().After(time.Now().Add(5 * time.Minute)) })

	gone := &fakeVault{leaseTTL: 30, tokenTTL: 3600, renewable: true, renewStatus: http.StatusBadRequest}
	b2 := newBroker(t, gone, nil)
	c2, err := b2.Credential(context.Background(), reqAs("alice", "good-a", time.Now().Add(time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a refused renewal to retire the lease", c2.Retired)
	if c2.Ended() {
		t.Fatal("a lease Vault no longer knows ended its sessions outright; they should end at an idle point")
	}
}

// A client login's Vault token is revoked once its client token has expired
// and no connection holds a lease it read — not before.
func TestExpiredLoginIsRevokedOnceItsLeaseIsReleased(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{leaseTTL: 3600, tokenTTL: 3600}
	b := newBroker(t, fv, nil)
	c, err := b.Credential(context.Background(), reqAs("alice", "good-a", time.Now().Add(2*time.Second)))
	if err != nil {
		t.Fatal(err)
	}
	c.Hold() // an upstream connection uses it
	waitFor(t, "the credential to retire with its token", c.Retired)
	time.Sleep(100 * time.Millisecond)
	if n := fv.revokes.Load(); n != 0 {
		t.Fatalf("%d revocations while a connection still holds the lease", n)
	}
	c.Release()
	waitFor(t, "the login's Vault token to be revoked", func() bool { return fv.revokes.Load() == 1 })
}

// A cached login that Vault no longer honours (its token revoked) is
// dropped and the request retried once with a fresh login.
func TestRevokedCachedLoginIsReplacedOnce(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{leaseTTL: 3600, tokenTTL: 3600}
	b := newBroker(t, fv, nil)
	ctx := context.Background()
	r := reqAs("alice", "good-a", time.Now().Add(time.Hour))
	c, err := b.Credential(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	b.Forget(c) // the next request reads again, with the cached login
	fv.revoked.Store("hvs.vt-1")
	c2, err := b.Credential(ctx, r)
	if err != nil {
		t.Fatalf("after Vault revoked the cached login: %v", err)
	}
	if c2 == c || fv.logins.Load() != 2 {
		t.Fatalf("fresh credential %v, logins %d (want 2)", c2 != c, fv.logins.Load())
	}
}

// Close with revoke revokes every client login's Vault token; without, none.
func TestCloseRevokesClientLogins(t *testing.T) {
	t.Parallel()
	for _, revoke := range []bool{true, false} {
		fv := &fakeVault{leaseTTL: 3600, tokenTTL: 3600}
		b := newBroker(t, fv, nil)
		for _, sub := range []string{"a", "b", "c"} {
			if _, err := b.Credential(context.Background(), reqAs(sub, "good-"+sub, time.Now().Add(time.Hour))); err != nil {
				t.Fatal(err)
			}
		}
		if err := b.Close(context.Background(), revoke); err != nil {
			t.Fatal(err)
		}
		want := int32(0)
		if revoke {
			want = 3
		}
		if got := fv.revokes.Load(); got != want {
			t.Fatalf("Close(revoke=%v): %d revocations, want %d", revoke, got, want)
		}
		if _, err := b.Credential(context.Background(), reqAs("d", "good-d", time.Now().Add(time.Hour))); err == nil {
			t.Fatal("a closed broker issued a credential")
		}
	}
}

// A static role's credential is superseded after Vault's next rotation (so
// new sessions read the new password) and never retires or ends (open
// sessions are not touched by a rotation).
func TestStaticCredentialIsSupersededByRotationAndNeverEnds(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{staticTTL: 1}
	b := newBrokerWith(t, fv, Config{Self: &Self{}})
	r := reqAs("alice", "good-a", time.Now().Add(time.Hour))
	r.Scope, r.Static = ScopeRole, true
	c, err := b.Credential(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Static || c.Username != "app_report" || c.Stale() {
		t.Fatalf("static credential: %+v stale %v", c.LogValue(), c.Stale())
	}
	c.Hold() // an open session
	waitFor(t, "the static credential to be superseded after the rotation", c.Stale)
	if c.Retired() || c.Ended() || c.ExpiresAt().Before(time.Now().Add(24*time.Hour)) {
		t.Fatal("a static credential retired or ended: open sessions would be cut by a password rotation")
	}
	c.Release()
	waitFor(t, "the superseded static credential to finish once unheld", c.Finished)
	c2, err := b.Credential(context.Background(), r)
	if err != nil || c2 == c || c2.Password == c.Password {
		t.Fatalf("after the rotation: %v, same credential %v", err, c2 == c)
	}
	r.Scope = ScopeIdentity
	if _, err := b.Credential(context.Background(), r); pgerror.Code(err) != pgerror.ConfigurationFileError {
		t.Fatalf("a static role in identity scope: %v", err)
	}
}

// Forget (PostgreSQL refused the credential for a new session: say a
// session of the shared user changed its password) stops the credential
// being handed out but does not end the sessions open under it — one user
// must not be able to end everybody's sessions.
func TestForgetLeavesOpenSessionsBe(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{leaseTTL: 3600, tokenTTL: 3600}
	b := newBroker(t, fv, nil)
	c, err := b.Credential(context.Background(), reqAs("alice", "good-a", time.Now().Add(time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	c.Hold()
	b.Forget(c)
	if !c.Stale() || c.Retired() || c.Finished() {
		t.Fatalf("after Forget: stale %v retired %v finished %v; want stale only", c.Stale(), c.Retired(), c.Finished())
	}
	c.Release()
	if !c.Finished() {
		t.Fatal("a forgotten credential nothing holds did not finish")
	}
}

// A renewal that fails because Vault is away is tried again; the lease
// keeps serving, and renewals resume when Vault answers.
func TestRenewalIsRetriedWhileVaultIsAway(t *testing.T) {
	t.Parallel()
	fv := &fakeVault{leaseTTL: 30, tokenTTL: 3600, renewable: true, renewTTL: 600, renewStatus: http.StatusServiceUnavailable}
	b := newBroker(t, fv, nil)
	c, err := b.Credential(context.Background(), reqAs("alice", "good-a", time.Now().Add(time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a first failed renewal", func() bool { return fv.renews.Load() >= 1 })
	if c.Stale() {
		t.Fatal("a renewal failing while Vault is away retired the lease")
	}
	fv.mu.Lock()
	fv.renewStatus = 0
	fv.mu.Unlock()
	waitFor(t, "renewal to resume and extend the lease", func() bool { return c.ExpiresAt().After(time.Now().Add(5 * time.Minute)) })
}
