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

// twoDatabases is a valid file with two databases of two levels each, for the
// cases that need more than one place a name can come from.
const twoDatabases = `{
  "oidc": {"issuer_url": "https://idp.example", "audiences": ["pgwarden"]},
  "databases": [
    {"name": "a-b", "upstream": "host=127.0.0.1 dbname=ab",
      "levels": [{"name": "reader", "groups": ["g"]}, {"name": "c", "groups": ["g"]}]},
    {"name": "a", "upstream": "host=127.0.0.1 dbname=a",
      "levels": [{"name": "b-c", "groups": ["g"]}, {"name": "writer", "groups": ["g"]}]}
  ]
}`

func TestRefusesWhatWouldBeUnsafeOrAmbiguous(t *testing.T) {
	t.Parallel()
	level := `"name": "reader", `
	// inLevel puts a setting into minimal's only level.
	inLevel := func(setting string) string { return strings.Replace(minimal, level, level+setting+", ", 1) }
	// top puts a top-level setting into minimal.
	top := func(setting string) string { return strings.Replace(minimal, `"listen"`, setting+`, "listen"`, 1) }
	env := func(k, v string) map[string]string { return map[string]string{"PGWARDEN_" + k: v} }
	cases := map[string]struct {
		file string
		env  map[string]string
		want []string
	}{
		"no audience":     {strings.Replace(minimal, `"audiences": ["pgwarden"]`, `"audiences": []`, 1), nil, []string{"oidc.audiences is required"}},
		"unknown field":   {strings.Replace(minimal, `"listen"`, `"listne"`, 1), nil, []string{"unknown field"}},
		"bad network":     {minimal, env("TRUSTED_NETWORKS", "10.0.0.0/33"), []string{"trusted_networks[0]"}},
		"other mode":      {minimal, env("VAULT_MODE", "token"), []string{"vault.mode", "not supported"}},
		"half tls":        {minimal, env("TLS_CERT", "/x.crt"), []string{"go together"}},
		"bad duration":    {minimal, env("AUTH_TIMEOUT", "soon"), []string{`invalid duration "soon"`}},
		"bad log level":   {top(`"log_level": "loud"`), nil, []string{`log_level "loud" is not debug, info, warn or error`}},
		"bad log format":  {minimal, env("LOG_FORMAT", "xml"), []string{`log_format "xml" is not json or text`}},
		"level with none": {strings.Replace(minimal, level, ``, 1), nil, []string{"databases[0].levels[0].name", "has no name"}},
		"only a jwks url without an issuer": {strings.Replace(minimal, `"issuer_url": "https://idp.example"`, `"jwks_url": "https://idp.example/jwks"`, 1), nil,
			[]string{"oidc.issuer is required"}},

		// Vault roles, database and level names.
		"default vault roles that collide": {twoDatabases, nil, []string{
			`databases[1].levels[0].vault_role "a-b-c" is also the Vault role of databases[0].levels[1] (database "a-b", level "c")`,
			"two levels would share credentials"}},
		"explicit vault role equal to another level's": {
			strings.Replace(twoDatabases, `{"name": "writer", `, `{"name": "writer", "vault_role": "a-b-reader", `, 1), nil,
			[]string{`databases[1].levels[1].vault_role "a-b-reader" is also the Vault role of databases[0].levels[0] (database "a-b", level "reader")`}},
		"vault roles that differ only in case": {
			strings.Replace(twoDatabases, `{"name": "writer", `, `{"name": "writer", "vault_role": "A-B-Reader", `, 1), nil,
			[]string{`databases[1].levels[1].vault_role "A-B-Reader" is also the Vault role of databases[0].levels[0]`, "ignore case"}},
		"vault role with a slash": {inLevel(`"vault_role": "app/reader"`), nil, []string{`databases[0].levels[0].vault_role "app/reader"`, "cannot take safely"}},
		"vault role of dots":      {inLevel(`"vault_role": ".."`), nil, []string{`databases[0].levels[0].vault_role ".."`}},
		"default vault role with a space": {strings.Replace(minimal, `"name": "app"`, `"name": "my app"`, 1), nil,
			[]string{`databases[0].levels[0].vault_role "my app-reader" (the default`}},
		"database listed twice": {strings.Replace(twoDatabases, `"name": "a", `, `"name": "a-b", `, 1), nil,
			[]string{`databases[1].name "a-b" is also databases[0].name`}},
		"level listed twice": {strings.Replace(twoDatabases, `{"name": "writer", `, `{"name": "b-c", "vault_role": "other", `, 1), nil,
			[]string{`databases[1].levels[1].name "b-c" is also databases[1].levels[0].name`}},
		"database without an upstream": {strings.Replace(minimal, `"upstream": "host=127.0.0.1 dbname=app",`, ``, 1), nil,
			[]string{"databases[0].upstream is required"}},

		// Durations.
		"negative auth_timeout":           {top(`"auth_timeout": "-1s"`), nil, []string{"auth_timeout is -1s"}},
		"negative write_timeout":          {minimal, env("WRITE_TIMEOUT", "-1s"), []string{"write_timeout is -1s"}},
		"negative oidc.leeway":            {minimal, env("OIDC_LEEWAY", "-1s"), []string{"oidc.leeway is -1s"}},
		"negative pool.acquire_timeout":   {minimal, env("POOL_ACQUIRE_TIMEOUT", "-1s"), []string{"pool.acquire_timeout is -1s"}},
		"negative pool.idle_timeout":      {top(`"pool": {"idle_timeout": "-5m"}`), nil, []string{"pool.idle_timeout is -5m0s"}},
		"negative pool.dial_timeout":      {minimal, env("POOL_DIAL_TIMEOUT", "-1s"), []string{"pool.dial_timeout is -1s"}},
		"negative pool.ping_after_idle":   {minimal, env("POOL_PING_AFTER_IDLE", "-1s"), []string{"pool.ping_after_idle is -1s"}},
		"negative pool.ping_timeout":      {minimal, env("POOL_PING_TIMEOUT", "-1s"), []string{"pool.ping_timeout is -1s"}},
		"negative default_ttl":            {strings.Replace(minimal, `"default_ttl": "20s"`, `"default_ttl": "-20s"`, 1), nil, []string{"databases[0].levels[0].default_ttl is -20s"}},
		"negative max_ttl":                {inLevel(`"max_ttl": "-1h"`), nil, []string{"databases[0].levels[0].max_ttl is -1h0m0s"}},
		"default_ttl longer than max_ttl": {inLevel(`"max_ttl": "10s"`), nil, []string{"databases[0].levels[0].default_ttl 20s is more than databases[0].levels[0].max_ttl 10s"}},
		"leeway over five minutes":        {minimal, env("OIDC_LEEWAY", "6m"), []string{"oidc.leeway 6m0s is more than 5m0s"}},

		// Counts.
		"negative max_handshakes":          {minimal, env("MAX_HANDSHAKES", "-1"), []string{"max_handshakes is -1"}},
		"negative max_subject_connections": {top(`"max_subject_connections": -1`), nil, []string{"max_subject_connections is -1"}},
		"negative pool.max_per_pool":       {minimal, env("POOL_MAX_PER_POOL", "-1"), []string{"pool.max_per_pool is -1"}},
		"negative pool.max_total":          {minimal, env("POOL_MAX_TOTAL", "-1"), []string{"pool.max_total is -1"}},

		// Where signing keys come from.
		"http issuer_url to another host": {minimal, env("OIDC_ISSUER_URL", "http://idp.example"),
			[]string{"oidc.issuer_url", `plain http to "idp.example"`, "can be replaced by anyone on the path"}},
		"http jwks_url to another host": {minimal, env("OIDC_JWKS_URL", "http://10.0.0.5/jwks"),
			[]string{"oidc.jwks_url", "not a loopback host"}},
		"http jwt_discovery_url to another host": {minimal, env("VAULT_JWT_DISCOVERY_URL", "http://idp.internal"),
			[]string{"vault.jwt_discovery_url", "not a loopback host"}},
		"http jwt_jwks_url to another host": {minimal, env("VAULT_JWT_JWKS_URL", "http://idp.internal/jwks"),
			[]string{"vault.jwt_jwks_url", "not a loopback host"}},
		"http to a name that only starts like loopback": {minimal, env("OIDC_ISSUER_URL", "http://127.0.0.1.evil.example"),
			[]string{"oidc.issuer_url", "not a loopback host"}},
		"another scheme":         {minimal, env("OIDC_ISSUER_URL", "ftp://idp.example"), []string{"oidc.issuer_url", `scheme "ftp"`}},
		"no scheme":              {minimal, env("OIDC_ISSUER_URL", "idp.example"), []string{"oidc.issuer_url", "not an https:// URL"}},
		"unparsable url":         {minimal, env("OIDC_ISSUER_URL", "https://idp example/"), []string{"oidc.issuer_url", "not a valid URL"}},
		"https url with no host": {minimal, env("OIDC_JWKS_URL", "https:///jwks"), []string{"oidc.jwks_url", "has no host"}},
		"password is not echoed": {minimal, env("OIDC_ISSUER_URL", "http://u:hunter2@idp.example"), []string{"oidc.issuer_url", "xxxxx"}},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			_, err := Load(write(t, tc.file), tc.env)
			if err == nil {
				t.Fatalf("accepted; want a refusal mentioning %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("err = %v\nwant it to mention %q", err, w)
				}
			}
			if !strings.HasPrefix(err.Error(), "config: ") {
				t.Errorf("err = %v, want it to start with config: ", err)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Errorf("err = %v: it shows the URL's password", err)
			}
		})
	}
}

func TestListsEveryProblemAtOnce(t *testing.T) {
	t.Parallel()
	_, err := Load(write(t, twoDatabases), map[string]string{
		"PGWARDEN_POOL_IDLE_TIMEOUT": "-1s",
		"PGWARDEN_OIDC_ISSUER_URL":   "http://idp.example",
	})
	if err == nil {
		t.Fatal("accepted")
	}
	for _, w := range []string{"pool.idle_timeout", "oidc.issuer_url", "databases[1].levels[0].vault_role"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("err = %v\nwant it to mention %q", err, w)
		}
	}
}

func TestAcceptsWhatIsSafe(t *testing.T) {
	t.Parallel()
	distinct := strings.Replace(
		strings.Replace(twoDatabases, `{"name": "c", `, `{"name": "c", "vault_role": "ab.c_1", `, 1),
		`{"name": "b-c", `, `{"name": "b-c", "vault_role": "a.b-c", `, 1)
	cases := map[string]struct {
		file string
		env  map[string]string
	}{
		"https issuer":               {minimal, nil},
		"http issuer on 127.0.0.1":   {minimal, map[string]string{"PGWARDEN_OIDC_ISSUER_URL": "http://127.0.0.1:5556/realms/x"}},
		"http issuer on 127.0.0.0/8": {minimal, map[string]string{"PGWARDEN_OIDC_ISSUER_URL": "http://127.8.9.10"}},
		"http issuer on ::1":         {minimal, map[string]string{"PGWARDEN_OIDC_ISSUER_URL": "http://[::1]:5556"}},
		"http jwks on localhost": {minimal, map[string]string{"PGWARDEN_OIDC_JWKS_URL": "http://LocalHost:5556/jwks",
			"PGWARDEN_VAULT_JWT_DISCOVERY_URL": "http://localhost:5556", "PGWARDEN_VAULT_JWT_JWKS_URL": "https://idp.example/jwks"}},
		"https vault urls":                           {minimal, map[string]string{"PGWARDEN_VAULT_JWT_DISCOVERY_URL": "https://idp.internal:8443"}},
		"distinct vault roles, dots and underscores": {distinct, nil},
		"default_ttl equal to max_ttl, and only one of them set": {strings.Replace(
			strings.Replace(distinct, `{"name": "reader", `, `{"name": "reader", "default_ttl": "1h", "max_ttl": "1h", `, 1),
			`{"name": "writer", `, `{"name": "writer", "default_ttl": "8h", `, 1), nil},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			if _, err := Load(write(t, tc.file), tc.env); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestNewSettingsDefaultsAndOverrides(t *testing.T) {
	t.Parallel()
	c, err := Load(write(t, minimal), nil)
	if err != nil {
		t.Fatal(err)
	}
	for name, got := range map[string]struct{ got, want any }{
		"auth_timeout":            {c.AuthTimeout.D(), 30 * time.Second},
		"write_timeout":           {c.WriteTimeout.D(), 60 * time.Second},
		"max_handshakes":          {c.MaxHandshakes, 1000},
		"max_subject_connections": {c.MaxSubjectConnections, 0},
		"oidc.leeway":             {c.OIDC.Leeway.D(), 30 * time.Second},
		"pool.max_per_pool":       {c.Pool.MaxPerPool, 50},
		"pool.max_total":          {c.Pool.MaxTotal, 200},
		"pool.acquire_timeout":    {c.Pool.AcquireTimeout.D(), 10 * time.Second},
		"pool.idle_timeout":       {c.Pool.IdleTimeout.D(), 5 * time.Minute},
		"pool.dial_timeout":       {c.Pool.DialTimeout.D(), 10 * time.Second},
		"pool.ping_after_idle":    {c.Pool.PingAfterIdle.D(), time.Second},
		"pool.ping_timeout":       {c.Pool.PingTimeout.D(), 2 * time.Second},
		"allow_insecure_upstream": {c.Databases[0].AllowInsecureUpstream, false},
	} {
		if got.got != got.want {
			t.Errorf("%s = %v, want %v by default", name, got.got, got.want)
		}
	}

	file := strings.Replace(minimal, `"listen"`, `"write_timeout": "5s", "max_subject_connections": 3, "pool": {"ping_after_idle": "250ms"}, "listen"`, 1)
	file = strings.Replace(file, `"name": "app",`, `"name": "app", "allow_insecure_upstream": true,`, 1)
	c, err = Load(write(t, file), map[string]string{
		"PGWARDEN_MAX_HANDSHAKES":       "7",
		"PGWARDEN_POOL_DIAL_TIMEOUT":    "3s",
		"PGWARDEN_POOL_PING_TIMEOUT":    "500ms",
		"PGWARDEN_POOL_PING_AFTER_IDLE": "2s",
	})
	if err != nil {
		t.Fatal(err)
	}
	for name, got := range map[string]struct{ got, want any }{
		"write_timeout":           {c.WriteTimeout.D(), 5 * time.Second},
		"max_handshakes":          {c.MaxHandshakes, 7},
		"max_subject_connections": {c.MaxSubjectConnections, 3},
		"pool.dial_timeout":       {c.Pool.DialTimeout.D(), 3 * time.Second},
		"pool.ping_after_idle":    {c.Pool.PingAfterIdle.D(), 2 * time.Second},
		"pool.ping_timeout":       {c.Pool.PingTimeout.D(), 500 * time.Millisecond},
		"allow_insecure_upstream": {c.Databases[0].AllowInsecureUpstream, true},
	} {
		if got.got != got.want {
			t.Errorf("%s = %v, want %v", name, got.got, got.want)
		}
	}
}

// Names vault-init gives its own objects cannot be a level's or a
// database's: the Vault role "server" (policy pgwarden-server) and a
// database named like another's role-scope connection.
func TestReservedVaultNamesAreRefused(t *testing.T) {
	c := &Config{OIDC: OIDC{IssuerURL: "https://issuer.example", Audiences: []string{"pgwarden"}},
		Databases: []Database{
			{Name: "app", Upstream: "host=127.0.0.1", Levels: []Level{{Name: "reader", VaultRole: "Server"}}},
			{Name: "app-role", Upstream: "host=127.0.0.1", Levels: []Level{{Name: "reader"}}},
		}}
	err := c.setDefaultsAndValidate()
	for _, want := range []string{`databases[0].levels[0].vault_role "Server" is reserved`, `databases[1].name "app-role"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not name %s", err, want)
		}
	}
}

func TestScopeAndOwnIdentity(t *testing.T) {
	base := func() *Config {
		return &Config{OIDC: OIDC{IssuerURL: "https://issuer.example", Audiences: []string{"pgwarden"}},
			Databases: []Database{{Name: "app", Upstream: "host=127.0.0.1", Levels: []Level{{Name: "reader"}}}}}
	}
	c := base()
	if err := c.setDefaultsAndValidate(); err != nil || c.Databases[0].Levels[0].Scope != ScopeIdentity || !*c.Vault.RevokeOnShutdown {
		t.Fatalf("defaults: %v, scope %q", err, c.Databases[0].Levels[0].Scope)
	}
	c = base()
	c.Databases[0].Levels[0].Scope = ScopeRole
	if err := c.setDefaultsAndValidate(); err == nil || !strings.Contains(err.Error(), "databases[0].levels[0].scope is role but vault.auth.method is not set") {
		t.Fatalf("role scope without an own identity: %v", err)
	}
	c = base()
	c.Databases[0].Levels[0].Scope = "team"
	c.Vault.Auth = VaultAuth{Method: "approle"}
	err := c.setDefaultsAndValidate()
	for _, want := range []string{`scope "team" is not identity or role`, "vault.auth.role is required", "vault.auth.secret_file"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not say %s", err, want)
		}
	}
}

// A static level's user must be one Vault can rotate for it alone: not the
// admin Vault logs in as, not another static level's, a valid name.
func TestStaticLevelUsersAreChecked(t *testing.T) {
	static := func(name, user string) Level {
		return Level{Name: name, Scope: ScopeRole, Static: &StaticRole{Username: user, RotationPeriod: Duration(time.Hour)}}
	}
	c := &Config{OIDC: OIDC{IssuerURL: "https://issuer.example", Audiences: []string{"pgwarden"}},
		Vault: Vault{Auth: VaultAuth{Method: "token"}},
		Databases: []Database{{Name: "app", Upstream: "host=127.0.0.1", Admin: Admin{Username: "vault_admin"},
			Levels: []Level{static("a", "vault_admin"), static("b", "report"), static("c", "report"), static("d", `bad"name`)}}}}
	err := c.setDefaultsAndValidate()
	for _, want := range []string{
		`databases[0].levels[0].static.username "vault_admin" is the admin`,
		`databases[0].levels[2].static.username "report" is also databases[0].levels[1]'s`,
		`databases[0].levels[3].static.username "bad\"name" is not a PostgreSQL user name`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not say %s", err, want)
		}
	}
}
