package broker_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/broker/vaultinit"
	"github.com/pgwarden/pgwarden/testenv"
)

// Self's tests: each auth method against a real Vault dev server (one for
// all, its methods on separate mounts), the errors a person sees before any
// Vault call, Close, and the retry wait.

func TestBackoffStaysInItsWindowAndCapsAt30s(t *testing.T) {
	t.Parallel()
	for n := -1; n <= 40; n++ {
		d := 500 * time.Millisecond
		for i := 0; i < n && d < 30*time.Second; i++ {
			d *= 2
		}
		d = min(d, 30*time.Second)
		seen := map[time.Duration]bool{}
		for range 200 {
			w := broker.Backoff(n)
			if w < d/2 || w > d {
				t.Fatalf("Backoff(%d) = %v, want within [%v, %v]", n, w, d/2, d)
			}
			seen[w] = true
		}
		if len(seen) < 50 {
			t.Errorf("Backoff(%d) took only %d distinct values in 200 draws: no jitter", n, len(seen))
		}
	}
	if got := broker.Backoff(1 << 30); got > 30*time.Second || got < 15*time.Second {
		t.Errorf("Backoff(1<<30) = %v, want the 30s cap's window", got)
	}
}

// Before calling Vault, NewSelf says which file or variable is missing.
func TestSelfSaysWhichSecretIsMissing(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte(" \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing")
	full := filepath.Join(dir, "full")
	if err := os.WriteFile(full, []byte("s"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cfg  broker.SelfConfig
		want []string
	}{
		{"token file missing", broker.SelfConfig{Method: "token", TokenFile: missing}, []string{missing}},
		{"token file empty", broker.SelfConfig{Method: "token", TokenFile: empty}, []string{empty, "empty"}},
		{"no token file and no VAULT_TOKEN", broker.SelfConfig{Method: "token"}, []string{"VAULT_TOKEN", "token_file"}},
		{"approle secret_id file missing", broker.SelfConfig{Method: "approle", Role: "r", SecretFile: missing}, []string{missing}},
		{"approle secret_id file empty", broker.SelfConfig{Method: "approle", Role: "r", SecretFile: empty}, []string{empty, "empty"}},
		{"approle without secret file", broker.SelfConfig{Method: "approle", Role: "r"}, []string{"secret_file"}},
		{"approle without role", broker.SelfConfig{Method: "approle", SecretFile: full}, []string{"role"}},
		{"kubernetes token file empty", broker.SelfConfig{Method: "kubernetes", Role: "r", SecretFile: empty}, []string{empty, "empty"}},
		{"unknown method", broker.SelfConfig{Method: "ldap"}, []string{`"ldap"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// Nothing listens there: any Vault call would fail differently.
			base := newClient(t, "http://127.0.0.1:1")
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			s, err := broker.NewSelf(ctx, base, tc.cfg, discard())
			if err == nil {
				_ = s.Close(ctx, false)
				t.Fatal("NewSelf succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "connection refused") {
				t.Errorf("NewSelf called Vault before checking its input: %v", err)
			}
		})
	}
}

// Close returns when its context ends, even while Self is logging in again
// to a Vault that does not answer, and may be called concurrently.
func TestSelfCloseDoesNotWaitForAHangingLogin(t *testing.T) {
	t.Parallel()
	var logins atomic.Int32
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/auth/approle/login" {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		if logins.Add(1) > 1 {
			select { // Vault hangs
			case <-r.Context().Done():
			case <-release:
			}
			return
		}
		w.Header().Set("Content-Type", "application/json")
		// A token that cannot be renewed and ends in a second: Self logs
		// in again well within it.
		_, _ = w.Write([]byte(`{"auth":{"client_token":"hvs.fake","accessor":"acc-1","lease_duration":1,"renewable":false}}`))
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(release) })
	secret := filepath.Join(t.TempDir(), "secret-id")
	if err := os.WriteFile(secret, []byte("s"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := broker.NewSelf(context.Background(), newClient(t, srv.URL), broker.SelfConfig{Method: "approle", Role: "r", SecretFile: secret}, discard())
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for logins.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatal("Self did not log in again before its token ended")
		}
		time.Sleep(50 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() { _ = s.Close(ctx, false) })
	}
	wg.Wait()
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("Close took %v while a login hung", d)
	}
}

// When its token ends and Vault refuses the next logins for a while, Self
// keeps trying (with Backoff) and takes the token of the first that works.
func TestSelfRetriesLoginWhileVaultIsAway(t *testing.T) {
	t.Parallel()
	var logins atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/auth/approle/login" {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		n := logins.Add(1)
		if n == 2 || n == 3 {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte(`{"errors":["Vault is sealed"]}`))
			return
		}
		fmt.Fprintf(w, `{"auth":{"client_token":"hvs.fake-%d","accessor":"acc-%d","lease_duration":1,"renewable":false}}`, n, n)
	}))
	t.Cleanup(srv.Close)
	secret := writeSecret(t, "secret-id", "s")
	s, err := broker.NewSelf(context.Background(), newClient(t, srv.URL), broker.SelfConfig{Method: "approle", Role: "r", SecretFile: secret}, discard())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background(), false) })
	// The token ends after 1s; two refusals cost at most 0.5s+1s.
	deadline := time.Now().Add(5 * time.Second)
	for s.Accessor() != "acc-4" {
		if time.Now().After(deadline) {
			t.Fatalf("after %d logins Self holds %q, want acc-4", logins.Load(), s.Accessor())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSelfWithVault proves each auth method of Self against a real Vault dev
// server. The subtests run in parallel on one server, each on its own
// mount; each takes its token's max TTL or so (about 10s).
func TestSelfWithVault(t *testing.T) {
	v, root := testenv.NewVault(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// pgwarden-server as vault-init writes it with no level in role scope:
	// the token's own lookup, renew and revoke, and leases. Tokens below get
	// it without Vault's default policy, so it alone must do.
	policy, err := vaultinit.ServerPolicy(vaultinit.Spec{JWT: vaultinit.JWT{JWKSURL: "http://127.0.0.1:1/jwks", Audiences: []string{"pgwarden"}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := root.Sys().PutPolicyWithContext(ctx, vaultinit.ServerPolicyName, policy); err != nil {
		t.Fatal(err)
	}
	env := &selfEnv{v: v, root: root}
	t.Run("token is renewed past its TTL and never revoked", env.testToken)
	t.Run("approle logs in again at max TTL and revokes its token", env.testAppRole)
	t.Run("kubernetes logs in with a service account token", env.testKubernetes)
}

type selfEnv struct {
	v    *testenv.Vault
	root *vault.Client
}

func (e *selfEnv) testToken(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	renewable := true
	sec, err := e.root.Auth().Token().CreateWithContext(ctx, &vault.TokenCreateRequest{
		Policies: []string{vaultinit.ServerPolicyName}, NoDefaultPolicy: true,
		TTL: "6s", ExplicitMaxTTL: "60s", Renewable: &renewable, DisplayName: "pgwarden",
	})
	if err != nil {
		t.Fatal(err)
	}
	tok := sec.Auth.ClientToken
	file := writeSecret(t, "vault-token", tok+"\n")
	logs := &testenv.LockedBuffer{}
	start := time.Now()
	s, err := broker.NewSelf(ctx, newClient(t, e.v.Addr), broker.SelfConfig{Method: "token", TokenFile: file}, logTo(logs))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background(), false) })
	if s.Accessor() != sec.Auth.Accessor {
		t.Fatalf("Accessor() = %q, want the given token's %q", s.Accessor(), sec.Auth.Accessor)
	}

	// Past its first TTL, the token lives on: Self renewed it.
	time.Sleep(time.Until(start.Add(10 * time.Second)))
	look, err := e.root.Auth().Token().LookupWithContext(ctx, tok)
	if err != nil {
		t.Fatalf("the token ended after its first TTL: %v", err)
	}
	if ttl, _ := look.TokenTTL(); ttl <= 0 || ttl > 6*time.Second {
		t.Errorf("ttl %v after 10s, want renewed within (0, 6s]", ttl)
	}
	if look.Data["last_renewal_time"] == nil {
		t.Error("the token was never renewed")
	}

	// Close, even with revoke, leaves the operator's token alone.
	if err := s.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	own := newClient(t, e.v.Addr)
	own.SetToken(tok)
	if _, err := own.Auth().Token().LookupSelfWithContext(ctx); err != nil {
		t.Fatalf("Close revoked the operator's token: %v", err)
	}
	if strings.Contains(logs.String(), tok) {
		t.Error("Self logged its token")
	}
}

func (e *selfEnv) testAppRole(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	roleID, secretID, err := testenv.EnableAppRole(ctx, e.root, testenv.AppRole{
		Policies: []string{vaultinit.ServerPolicyName}, NoDefaultPolicy: true,
		TokenTTL: 5 * time.Second, TokenMaxTTL: 12 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	file := writeSecret(t, "secret-id", secretID+"\n")
	logs := &testenv.LockedBuffer{}
	start := time.Now()
	s, err := broker.NewSelf(ctx, newClient(t, e.v.Addr), broker.SelfConfig{Method: "approle", Role: roleID, SecretFile: file}, logTo(logs))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background(), false) })
	first := s.Accessor()
	lookupAccessor(t, e.root, first)

	// Past the first TTL (5s) the first token is alive: renewed.
	time.Sleep(time.Until(start.Add(8 * time.Second)))
	if s.Accessor() != first {
		t.Fatalf("Self logged in again after %v, before its token's max TTL (12s)", time.Since(start))
	}
	lookupAccessor(t, e.root, first)

	// Before the max TTL (12s) ends it, Self has a new token that works.
	second := waitAccessorChange(t, s, first, start.Add(12*time.Second))
	look := lookupAccessor(t, e.root, second)
	if pol, _ := look.TokenPolicies(); len(pol) != 1 || pol[0] != vaultinit.ServerPolicyName {
		t.Errorf("new token's policies %v, want [%s]", pol, vaultinit.ServerPolicyName)
	}

	// Close with revoke revokes the token Self created.
	if err := s.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	if _, err := e.root.Auth().Token().LookupAccessorWithContext(ctx, second); err == nil {
		t.Fatal("Close(revoke) left pgwarden's own token alive")
	}
	if strings.Contains(logs.String(), secretID) {
		t.Error("Self logged its secret_id")
	}
}

func (e *selfEnv) testKubernetes(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	is, err := testenv.StartIssuer("unused")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = is.Close() })
	api := testenv.StartKubeAPI(is)
	t.Cleanup(api.Close)
	if err := testenv.EnableKubernetes(ctx, e.root, "", api); err != nil {
		t.Fatal(err)
	}
	const ns, sa, aud = "db", "pgwarden", "vault"
	if err := testenv.WriteKubernetesRole(ctx, e.root, testenv.KubernetesRole{
		ServiceAccount: sa, Namespace: ns, Audience: aud,
		Policies: []string{vaultinit.ServerPolicyName}, NoDefaultPolicy: true,
		TokenTTL: 4 * time.Second, TokenMaxTTL: 8 * time.Second,
	}); err != nil {
		t.Fatal(err)
	}
	jwt, err := api.ServiceAccountToken(ns, sa, aud, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	file := writeSecret(t, "token", jwt)
	logs := &testenv.LockedBuffer{}
	cfg := broker.SelfConfig{Method: "kubernetes", Role: "pgwarden", SecretFile: file}
	start := time.Now()
	s, err := broker.NewSelf(ctx, newClient(t, e.v.Addr), cfg, logTo(logs))
	if err != nil {
		t.Fatalf("kubernetes login: %v", err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background(), false) })
	first := s.Accessor()
	look := lookupAccessor(t, e.root, first)
	if md, _ := look.TokenMetadata(); md["service_account_name"] != sa || md["service_account_namespace"] != ns {
		t.Errorf("token metadata %v, want service account %s/%s", md, ns, sa)
	}
	// Vault asked the API server, though it checked the signature itself.
	if api.Reviews() == 0 {
		t.Error("Vault logged in without a TokenReview")
	}

	// pem_keys do not spare Vault the API server: with none to answer the
	// TokenReview, the same good token is refused.
	gone := testenv.StartKubeAPI(is)
	if err := testenv.EnableKubernetes(ctx, e.root, "kubernetes-noapi", gone); err != nil {
		t.Fatal(err)
	}
	gone.Close()
	noapi := cfg
	noapi.Mount = "kubernetes-noapi"
	if err := testenv.WriteKubernetesRole(ctx, e.root, testenv.KubernetesRole{Mount: noapi.Mount,
		ServiceAccount: sa, Namespace: ns, Audience: aud, Policies: []string{vaultinit.ServerPolicyName}}); err != nil {
		t.Fatal(err)
	}
	if s2, err := broker.NewSelf(ctx, newClient(t, e.v.Addr), noapi, discard()); err == nil {
		_ = s2.Close(ctx, true)
		t.Error("Vault logged in with no API server to review the token")
	} else {
		t.Logf("no API server: refused: %v", err)
	}

	// Vault refuses other service accounts and other audiences.
	for _, tc := range []struct{ name, ns, sa, aud string }{
		{"another service account", ns, "intruder", aud},
		{"the same name in another namespace", "other", sa, aud},
		{"another audience", ns, sa, "someone-else"},
	} {
		other, err := api.ServiceAccountToken(tc.ns, tc.sa, tc.aud, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		bad := cfg
		bad.SecretFile = writeSecret(t, "other-token", other)
		s2, err := broker.NewSelf(ctx, newClient(t, e.v.Addr), bad, discard())
		if err == nil {
			_ = s2.Close(ctx, true)
			t.Errorf("%s: Vault let it log in", tc.name)
			continue
		}
		t.Logf("%s: refused: %v", tc.name, err)
		if !strings.Contains(err.Error(), "kubernetes login") || strings.Contains(err.Error(), other) {
			t.Errorf("%s: error %q does not say what failed, or holds the token", tc.name, err)
		}
	}

	// The service account is recreated (new uid) and the kubelet writes the
	// new token: the old one still has a good signature but the API server
	// no longer takes it, and Self's next login, at max TTL, reads the new one.
	api.CreateServiceAccount(ns, sa)
	anon := newClient(t, e.v.Addr)
	reviews := api.Reviews()
	if _, err := anon.Logical().WriteWithContext(ctx, "auth/kubernetes/login", map[string]any{"role": "pgwarden", "jwt": jwt}); err == nil {
		t.Error("Vault took the token of a deleted service account: it did not ask the API server")
	} else if api.Reviews() == reviews {
		t.Errorf("Vault refused the old token without asking the API server: %v", err)
	}
	jwt2, err := api.ServiceAccountToken(ns, sa, aud, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, file, jwt2)
	second := waitAccessorChange(t, s, first, start.Add(8*time.Second))
	lookupAccessor(t, e.root, second)

	if err := s.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	if _, err := e.root.Auth().Token().LookupAccessorWithContext(ctx, second); err == nil {
		t.Fatal("Close(revoke) left pgwarden's own token alive")
	}
	if strings.Contains(logs.String(), jwt) || strings.Contains(logs.String(), jwt2) {
		t.Error("Self logged its service account token")
	}
}

// waitAccessorChange waits until s holds a token other than old, failing t
// when that has not happened by end (the old token's max TTL) plus a second.
func waitAccessorChange(t *testing.T, s *broker.Self, old string, end time.Time) string {
	t.Helper()
	for {
		if a := s.Accessor(); a != old {
			return a
		}
		if time.Now().After(end.Add(time.Second)) {
			t.Fatalf("Self has not logged in again %v after its token's max TTL", time.Since(end))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// lookupAccessor looks a token up with the root token, failing t when it is
// not valid.
func lookupAccessor(t *testing.T, root *vault.Client, accessor string) *vault.Secret {
	t.Helper()
	if accessor == "" {
		t.Fatal("Self has no token accessor")
	}
	sec, err := root.Auth().Token().LookupAccessorWithContext(context.Background(), accessor)
	if err != nil {
		t.Fatalf("pgwarden's token is not valid: %v", err)
	}
	if ttl, _ := sec.TokenTTL(); ttl <= 0 {
		t.Fatalf("pgwarden's token has ttl %v", ttl)
	}
	return sec
}

// newClient is a Vault client for addr with no token and no retries.
func newClient(t *testing.T, addr string) *vault.Client {
	t.Helper()
	cfg := vault.DefaultConfig()
	cfg.Address = addr
	cfg.MaxRetries = 0
	c, err := vault.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.ClearToken()
	return c
}

func writeSecret(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	writeFile(t, p, content)
	return p
}

// writeFile replaces p's content at once, as the kubelet does.
func writeFile(t *testing.T, p, content string) {
	t.Helper()
	tmp := fmt.Sprintf("%s.%d", p, time.Now().UnixNano())
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, p); err != nil {
		t.Fatal(err)
	}
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

func logTo(b *testenv.LockedBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
