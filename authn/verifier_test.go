package authn_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/pgerror"
	"github.com/pgwarden/pgwarden/testenv"
)

func newVerifier(t *testing.T, cfg authn.Config) (*authn.Verifier, *testenv.Issuer) {
	t.Helper()
	is, err := testenv.StartIssuer("pgwarden")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { is.Close() })
	if cfg.JWKSURL == "" {
		cfg.IssuerURL = is.URL
	} else {
		cfg.JWKSURL = is.URL + "/jwks"
		cfg.Issuer = is.URL
	}
	if cfg.Audiences == nil {
		cfg.Audiences = []string{"pgwarden"}
	}
	v, err := authn.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	return v, is
}

func TestVerifyAcceptsRSAAndECTokensAndReadsGroups(t *testing.T) {
	t.Parallel()
	v, is := newVerifier(t, authn.Config{})
	for _, alg := range []string{"RS256", "ES256"} {
		tok, err := is.Mint(testenv.Claims{Subject: "alice", Groups: []string{"analyst", "engineer"}, Alg: alg})
		if err != nil {
			t.Fatal(err)
		}
		id, err := v.Verify(context.Background(), tok)
		if err != nil {
			t.Fatalf("%s: %v", alg, err)
		}
		if id.Subject != "alice" || strings.Join(id.Groups, ",") != "analyst,engineer" || id.Expiry.Before(time.Now()) {
			t.Fatalf("%s: identity %+v", alg, id)
		}
	}
}

func TestVerifyByJWKSURLAndNestedGroupsClaim(t *testing.T) {
	t.Parallel()
	v, is := newVerifier(t, authn.Config{JWKSURL: "set", GroupsClaim: "realm_access.roles"})
	tok, err := is.Mint(testenv.Claims{Subject: "bob", Extra: map[string]any{"realm_access": map[string]any{"roles": []string{"dba"}}}})
	if err != nil {
		t.Fatal(err)
	}
	id, err := v.Verify(context.Background(), tok)
	if err != nil {
		t.Fatal(err)
	}
	if len(id.Groups) != 1 || id.Groups[0] != "dba" {
		t.Fatalf("groups = %v", id.Groups)
	}
}

func TestVerifyPicksUpRotatedKeys(t *testing.T) {
	t.Parallel()
	v, is := newVerifier(t, authn.Config{})
	if err := is.Rotate("RS256"); err != nil {
		t.Fatal(err)
	}
	tok, err := is.Mint(testenv.Claims{Subject: "carol"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.Verify(context.Background(), tok); err != nil {
		t.Fatalf("token signed by a rotated-in key: %v", err)
	}
}

func TestVerifyRefusals(t *testing.T) {
	t.Parallel()
	v, is := newVerifier(t, authn.Config{Leeway: time.Second})
	mint := func(c testenv.Claims) string {
		tok, err := is.Mint(c)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	foreign, err := is.MintForeign(testenv.Claims{Subject: "x"})
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]struct{ tok, reason string }{
		"expired":        {mint(testenv.Claims{Subject: "x", TTL: -time.Minute}), authn.ReasonExpired},
		"not yet valid":  {mint(testenv.Claims{Subject: "x", NotYet: time.Hour}), authn.ReasonNotYet},
		"wrong audience": {mint(testenv.Claims{Subject: "x", Audience: "other"}), authn.ReasonAudience},
		"wrong issuer":   {mint(testenv.Claims{Subject: "x", Issuer: "https://evil.example"}), authn.ReasonIssuer},
		"alg none":       {mint(testenv.Claims{Subject: "x", Alg: "none"}), authn.ReasonAlgorithm},
		"bad signature":  {foreign, authn.ReasonSignature},
		"no subject":     {mint(testenv.Claims{}), authn.ReasonNoSubject},
		"garbage":        {"not.a.jwt", authn.ReasonMalformed},
		"unknown kid": {func() string {
			tok := mint(testenv.Claims{Subject: "x"})
			return strings.Replace(tok, strings.Split(tok, ".")[0], "eyJhbGciOiJSUzI1NiIsImtpZCI6Im5vcGUiLCJ0eXAiOiJKV1QifQ", 1)
		}(), authn.ReasonUnknownKey},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			_, err := v.Verify(context.Background(), tc.tok)
			var te *authn.TokenError
			if !errors.As(err, &te) {
				t.Fatalf("err = %v, want a *TokenError", err)
			}
			if te.Reason != tc.reason {
				t.Errorf("reason = %q (%v), want %q", te.Reason, err, tc.reason)
			}
			pe := pgerror.From(err)
			if pe.Code != pgerror.InvalidPassword {
				t.Errorf("SQLSTATE = %s, want 28P01", pe.Code)
			}
			if strings.Contains(pe.Message+pe.Detail+pe.Hint+err.Error(), tc.tok) {
				t.Error("the token appears in the error")
			}
		})
	}
}

func TestNewRefusesUnsafeConfig(t *testing.T) {
	t.Parallel()
	for name, cfg := range map[string]authn.Config{
		"hmac":           {IssuerURL: "http://127.0.0.1:1", Audiences: []string{"a"}, Algorithms: []string{"HS256"}},
		"none":           {IssuerURL: "http://127.0.0.1:1", Audiences: []string{"a"}, Algorithms: []string{"none"}},
		"no audience":    {IssuerURL: "http://127.0.0.1:1"},
		"huge leeway":    {IssuerURL: "http://127.0.0.1:1", Audiences: []string{"a"}, Leeway: time.Hour},
		"no issuer":      {JWKSURL: "http://127.0.0.1:1/jwks", Audiences: []string{"a"}},
		"unreachable":    {IssuerURL: "http://127.0.0.1:1", Audiences: []string{"a"}},
		"nothing at all": {},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if v, err := authn.New(ctx, cfg); err == nil {
				v.Close()
				t.Fatal("accepted")
			}
		})
	}
}

// The token check is the part of the auth path pgwarden pays for on a
// connection: the signature for a token it has not seen lately, a lookup for
// one it has.
func BenchmarkVerify(b *testing.B) {
	for _, bc := range []struct {
		name, alg string
		cache     time.Duration
	}{{"RS256", "RS256", -1}, {"ES256", "ES256", -1}, {"cached", "RS256", 0}} {
		b.Run(bc.name, func(b *testing.B) {
			alg := bc.alg
			is, err := testenv.StartIssuer("pgwarden")
			if err != nil {
				b.Fatal(err)
			}
			defer is.Close()
			v, err := authn.New(context.Background(), authn.Config{IssuerURL: is.URL, Audiences: []string{"pgwarden"}, CacheTTL: bc.cache})
			if err != nil {
				b.Fatal(err)
			}
			defer v.Close()
			tok, err := is.Mint(testenv.Claims{Subject: "alice", Groups: []string{"analyst"}, Alg: alg})
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := v.Verify(context.Background(), tok); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// A verified token is remembered, so a pool reconnecting with it pays for the
// signature once; but never past its exp, and a different token is checked.
func TestVerifiedTokensAreCachedNoLongerThanTheyLive(t *testing.T) {
	t.Parallel()
	v, is := newVerifier(t, authn.Config{Leeway: time.Nanosecond})
	tok, err := is.Mint(testenv.Claims{Subject: "alice", Groups: []string{"analyst"}, TTL: 1500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	first, err := v.Verify(context.Background(), tok)
	if err != nil {
		t.Fatal(err)
	}
	second, err := v.Verify(context.Background(), tok)
	if err != nil || second != first {
		t.Fatalf("second Verify of the same token: %p %v, want the cached identity %p", second, err, first)
	}
	other, err := is.Mint(testenv.Claims{Subject: "bob", Groups: []string{"analyst"}})
	if err != nil {
		t.Fatal(err)
	}
	if id, err := v.Verify(context.Background(), other); err != nil || id.Subject != "bob" {
		t.Fatalf("another token: %+v %v", id, err)
	}
	if _, err := v.Verify(context.Background(), tok+"x"); err == nil {
		t.Fatal("a token with a changed signature was accepted")
	}
	time.Sleep(time.Until(first.Expiry) + 100*time.Millisecond)
	var te *authn.TokenError
	if _, err := v.Verify(context.Background(), tok); !errors.As(err, &te) || te.Reason != authn.ReasonExpired {
		t.Fatalf("the cached token after its exp: %v, want it refused as expired", err)
	}
}
