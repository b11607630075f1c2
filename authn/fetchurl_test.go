package authn_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/testenv"
)

func TestIsLoopbackHost(t *testing.T) {
	t.Parallel()
	for host, want := range map[string]bool{
		"127.0.0.1":         true,
		"127.255.0.9":       true,
		"::1":               true,
		"::ffff:127.0.0.1":  true,
		"localhost":         true,
		"LOCALHOST":         true,
		"":                  false,
		"10.0.0.1":          false,
		"0.0.0.0":           false,
		"::":                false,
		"[::1]":             false, // a Hostname has no brackets
		"127.0.0.1:80":      false, // nor a port
		"localhost.evil.io": false,
		"127.0.0.1.nip.io":  false,
		"idp.example":       false,
	} {
		if got := authn.IsLoopbackHost(host); got != want {
			t.Errorf("IsLoopbackHost(%q) = %v, want %v", host, got, want)
		}
	}
}

func TestCheckFetchURL(t *testing.T) {
	t.Parallel()
	cases := map[string]struct {
		url  string
		want string // "" means accepted
	}{
		"https":                    {"https://idp.example/realms/x", ""},
		"https with a port":        {"https://10.0.0.5:8443", ""},
		"http to 127.0.0.1":        {"http://127.0.0.1:5556", ""},
		"http to 127.0.0.0/8":      {"http://127.1.2.3/x", ""},
		"http to ::1":              {"http://[::1]:5556/jwks", ""},
		"http to localhost":        {"http://localhost:5556", ""},
		"upper-case scheme":        {"HTTPS://idp.example", ""},
		"http to another host":     {"http://idp.example", "can be replaced by anyone on the path"},
		"http to a private ip":     {"http://10.0.0.5/jwks", "not a loopback host"},
		"http to a lookalike name": {"http://localhost.evil.example", "not a loopback host"},
		"another scheme":           {"ftp://idp.example", `scheme "ftp"`},
		"no scheme":                {"idp.example", `scheme ""`},
		"no host":                  {"https:///jwks", "has no host"},
		"opaque":                   {"https:idp.example", "has no host"},
		"not a url":                {"https://idp example", "not a valid URL"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			err := authn.CheckFetchURL(tc.url)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("err = %v, want it to mention %q", err, tc.want)
			}
		})
	}
	if err := authn.CheckFetchURL("http://user:hunter2@idp.example"); err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("err = %v: want a refusal that does not show the password", err)
	}
}

func TestItem08NewRefusesKeysOverPlainHTTPToAnotherHost(t *testing.T) {
	t.Parallel()
	for name, cfg := range map[string]authn.Config{
		"issuer url": {IssuerURL: "http://idp.example", Audiences: []string{"a"}},
		"jwks url":   {JWKSURL: "http://idp.example/jwks", Issuer: "https://idp.example", Audiences: []string{"a"}},
		"bad scheme": {IssuerURL: "file:///etc/jwks", Audiences: []string{"a"}},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			v, err := authn.New(ctx, cfg)
			if err == nil {
				v.Close()
				t.Fatal("accepted")
			}
			raw := cfg.IssuerURL + cfg.JWKSURL
			if !strings.HasPrefix(err.Error(), "authn: ") || !strings.Contains(err.Error(), raw) {
				t.Fatalf("err = %v, want an authn error naming %s", err, raw)
			}
		})
	}
}

// discovery serves an OIDC discovery document on an httptest server
// (127.0.0.1, so plain http is allowed); doc returns the document's issuer and
// jwks_uri given the server's own URL.
func discovery(t *testing.T, doc func(self string) (issuer, jwksURI string)) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/.well-known/openid-configuration" {
			http.NotFound(w, r)
			return
		}
		issuer, jwksURI := doc("http://" + r.Host)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"issuer": issuer, "jwks_uri": jwksURI})
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestItem08NewComparesTheDiscoveredIssuer(t *testing.T) {
	t.Parallel()
	is, err := testenv.StartIssuer("pgwarden")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { is.Close() })
	jwks := is.URL + "/jwks"

	t.Run("another issuer is refused", func(t *testing.T) {
		t.Parallel()
		srv := discovery(t, func(string) (string, string) { return "https://evil.example", jwks })
		v, err := authn.New(context.Background(), authn.Config{IssuerURL: srv.URL, Audiences: []string{"pgwarden"}})
		if err == nil {
			v.Close()
			t.Fatal("accepted a discovery document naming another issuer")
		}
		for _, want := range []string{srv.URL + "/.well-known/openid-configuration", `names issuer "https://evil.example"`,
			`expected from "` + srv.URL + `"`, "oidc.issuer"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("err = %v\nwant it to mention %q", err, want)
			}
		}
	})
	t.Run("no issuer is refused", func(t *testing.T) {
		t.Parallel()
		srv := discovery(t, func(string) (string, string) { return "", jwks })
		if v, err := authn.New(context.Background(), authn.Config{IssuerURL: srv.URL, Audiences: []string{"pgwarden"}}); err == nil {
			v.Close()
			t.Fatal("accepted a discovery document naming no issuer")
		}
	})
	t.Run("a jwks_uri over plain http to another host is refused", func(t *testing.T) {
		t.Parallel()
		srv := discovery(t, func(self string) (string, string) { return self, "http://idp.example/jwks" })
		_, err := authn.New(context.Background(), authn.Config{IssuerURL: srv.URL, Audiences: []string{"pgwarden"}})
		if err == nil || !strings.Contains(err.Error(), "jwks_uri") || !strings.Contains(err.Error(), "not a loopback host") {
			t.Fatalf("err = %v, want a refusal of the jwks_uri", err)
		}
	})
	t.Run("trailing slashes do not count", func(t *testing.T) {
		t.Parallel()
		srv := discovery(t, func(self string) (string, string) { return self + "/", jwks })
		v, err := authn.New(context.Background(), authn.Config{IssuerURL: srv.URL, Audiences: []string{"pgwarden"}})
		if err != nil {
			t.Fatal(err)
		}
		v.Close()
	})
	t.Run("an explicit issuer is what the document must name", func(t *testing.T) {
		t.Parallel()
		// pgwarden reaches the issuer by an internal address; tokens and
		// the discovery document name its public one.
		srv := discovery(t, func(string) (string, string) { return "https://idp.example/", jwks })
		v, err := authn.New(context.Background(), authn.Config{IssuerURL: srv.URL, Issuer: "https://idp.example", Audiences: []string{"pgwarden"}})
		if err != nil {
			t.Fatal(err)
		}
		v.Close()
	})
}
