package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const minimal = `{
  "oidc": {"issuer_url": "https://idp.example", "audiences": ["pgwarden"]},
  "listen": "127.0.0.1:7000",
  "databases": [{"name": "app", "upstream": "host=127.0.0.1 dbname=app",
    "levels": [{"name": "reader", "groups": ["analyst"], "default_ttl": "20s"}]}]
}`

func write(t *testing.T, s string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "pgwarden.json")
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestEnvOverridesFileAndDefaultsFill(t *testing.T) {
	t.Parallel()
	c, err := Load(write(t, minimal), map[string]string{
		"PGWARDEN_LISTEN":           "127.0.0.1:7001",
		"PGWARDEN_OIDC_AUDIENCES":   "a,b",
		"PGWARDEN_AUTH_TIMEOUT":     "5s",
		"PGWARDEN_TRUSTED_NETWORKS": "127.0.0.1/32",
	})
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:7001" {
		t.Errorf("Listen = %q: env must win over the file", c.Listen)
	}
	if strings.Join(c.OIDC.Audiences, ",") != "a,b" {
		t.Errorf("Audiences = %v", c.OIDC.Audiences)
	}
	if c.AuthTimeout.D() != 5*time.Second {
		t.Errorf("AuthTimeout = %v", c.AuthTimeout.D())
	}
	if got := c.Databases[0].Levels[0]; got.VaultRole != "app-reader" || got.DefaultTTL.D() != 20*time.Second {
		t.Errorf("level defaults = %+v", got)
	}
	if c.MetricsListen != "127.0.0.1:9632" || c.Vault.Mode != "jwt" {
		t.Errorf("defaults: metrics %q mode %q", c.MetricsListen, c.Vault.Mode)
	}
	if p := c.TrustedPrefixes(); len(p) != 1 || p[0].String() != "127.0.0.1/32" {
		t.Errorf("trusted = %v", p)
	}
}

func TestRefusesWhatWouldBeUnsafeOrAmbiguous(t *testing.T) {
	t.Parallel()
	cases := map[string]struct {
		file string
		env  map[string]string
		want string
	}{
		"no audience":     {strings.Replace(minimal, `"audiences": ["pgwarden"]`, `"audiences": []`, 1), nil, "audiences is required"},
		"unknown field":   {strings.Replace(minimal, `"listen"`, `"listne"`, 1), nil, "unknown field"},
		"bad network":     {minimal, map[string]string{"PGWARDEN_TRUSTED_NETWORKS": "10.0.0.0/33"}, "trusted network"},
		"other mode":      {minimal, map[string]string{"PGWARDEN_VAULT_MODE": "token"}, "not supported"},
		"half tls":        {minimal, map[string]string{"PGWARDEN_TLS_CERT": "/x.crt"}, "go together"},
		"bad duration":    {minimal, map[string]string{"PGWARDEN_AUTH_TIMEOUT": "soon"}, `invalid duration "soon"`},
		"level with none": {strings.Replace(minimal, `"name": "reader", `, ``, 1), nil, "has no name"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			_, err := Load(write(t, tc.file), tc.env)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}
