package main

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/testenv"
)

func TestUsageAndBadInvocations(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"version"}, &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "pgwarden ") {
		t.Fatalf("version: %d %q", code, out.String())
	}
	cases := map[string][]string{
		"no command":      nil,
		"unknown command": {"frobnicate", "-config", "/nonexistent"},
		"missing file":    {"serve", "-config", "/nonexistent/pgwarden.json"},
		"bad flag":        {"serve", "-nope"},
		"vault-init flag": {"check", "-prune", "-config", writeConfig(t, validConfig)},
	}
	for name, args := range cases {
		errb.Reset()
		if code := run(args, &out, &errb); code != 2 {
			t.Errorf("%s: exit %d, want 2 (stderr %q)", name, code, errb.String())
		}
		if errb.Len() == 0 {
			t.Errorf("%s: nothing said on stderr", name)
		}
	}
	errb.Reset()
	if run(cases["vault-init flag"], &out, &errb); !strings.Contains(errb.String(), "-prune is not a flag of check") {
		t.Errorf("a vault-init flag given to check: %s", errb.String())
	}
}

// vault-init and check as an operator runs them, against the real stack.
func TestVaultInitAndCheckAgainstTheStack(t *testing.T) {
	st := testenv.NewStack(t, testenv.StackOptions{NoProxy: true})
	path := filepath.Join(t.TempDir(), "pgwarden.json")
	if err := st.WriteConfig(path); err != nil {
		t.Fatal(err)
	}
	t.Setenv("VAULT_ADDR", st.Vault.Addr)

	var out, errb bytes.Buffer
	t.Setenv("VAULT_TOKEN", "")
	if code := run([]string{"vault-init", "-config", path}, &out, &errb); code != 1 || !strings.Contains(errb.String(), "VAULT_TOKEN") {
		t.Fatalf("vault-init without a token: exit %d, %s", code, errb.String())
	}
	t.Setenv("VAULT_TOKEN", st.Vault.RootToken)
	errb.Reset()
	if code := run([]string{"vault-init", "-config", path}, &out, &errb); code != 1 || !strings.Contains(errb.String(), "PGWARDEN_DB_ADMIN_PASSWORD") {
		t.Fatalf("vault-init without the admin password: exit %d, %s", code, errb.String())
	}
	t.Setenv("PGWARDEN_DB_ADMIN_PASSWORD", st.AdminPassword)
	errb.Reset()
	if code := run([]string{"vault-init", "-config", path}, &out, &errb); code != 0 {
		t.Fatalf("vault-init: exit %d\n%s", code, errb.String())
	}
	if strings.Contains(errb.String()+out.String(), st.AdminPassword) {
		t.Fatal("vault-init printed the admin password")
	}
	// The stack ran the same code on the same config.
	if out.String() != "no changes\n" {
		t.Fatalf("vault-init after the stack's own:\n%s", out.String())
	}
	out.Reset()
	if code := run([]string{"check", "-config", path}, &out, &errb); code != 0 {
		t.Fatalf("check: exit %d\n%s", code, errb.String())
	}
	for _, want := range []string{"issuer: ok", "vault: ok", "databases: 1"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("check output lacks %q:\n%s", want, out.String())
		}
	}
}

// vault-init as an operator runs it against a Vault nothing configured yet:
// a dry run (no password needed, nothing written), apply, nothing left to do,
// a level removed and pruned, a password rewrite asked for. No line it
// prints holds the admin password.
func TestVaultInitDryRunApplyPrune(t *testing.T) {
	st := testenv.NewStack(t, testenv.StackOptions{NoProxy: true})
	v, vc := testenv.NewVault(t)
	t.Setenv("VAULT_ADDR", v.Addr)
	t.Setenv("VAULT_TOKEN", v.RootToken)
	t.Setenv("PGWARDEN_DB_ADMIN_PASSWORD", "")

	// The stack's config, pointed at the fresh Vault.
	writeCfg := func(drop string) string {
		cfg := *st.Config
		cfg.Vault.Address = v.Addr
		db := cfg.Databases[0]
		db.Levels = slices.DeleteFunc(slices.Clone(db.Levels), func(l config.Level) bool { return l.Name == drop })
		cfg.Databases = []config.Database{db}
		b, err := json.Marshal(&cfg)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "pgwarden.json")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	all, noWriter := writeCfg(""), writeCfg("writer")
	vaultInit := func(args ...string) []string {
		t.Helper()
		var out, errb bytes.Buffer
		if code := run(append([]string{"vault-init"}, args...), &out, &errb); code != 0 {
			t.Fatalf("vault-init %v: exit %d\n%s%s", args, code, out.String(), errb.String())
		}
		if strings.Contains(out.String()+errb.String(), st.AdminPassword) {
			t.Fatalf("vault-init %v printed the admin password", args)
		}
		return strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	}
	every := func(lines []string, prefix string) {
		t.Helper()
		if len(lines) < 2 {
			t.Fatalf("%d lines", len(lines))
		}
		for _, l := range lines {
			if !strings.HasPrefix(l, prefix) {
				t.Fatalf("line %q does not start with %q:\n%s", l, prefix, strings.Join(lines, "\n"))
			}
		}
	}

	plan := vaultInit("-config", all, "-dry-run")
	if last := plan[len(plan)-1]; !strings.HasPrefix(last, "dry run: ") || !strings.HasSuffix(last, "none made") {
		t.Fatalf("last line %q", last)
	}
	every(plan[:len(plan)-1], "create ")
	if !slices.Contains(plan, "create database role database/roles/app-writer: level writer of app, identity scope, connection app, default_ttl 1h0m0s, max_ttl 4h0m0s") {
		t.Errorf("plan lacks the writer role:\n%s", strings.Join(plan, "\n"))
	}
	if mounts, err := vc.Sys().ListMounts(); err != nil || mounts["database/"] != nil {
		t.Fatalf("the dry run mounted the database engine (%v)", err)
	}

	t.Setenv("PGWARDEN_DB_ADMIN_PASSWORD", st.AdminPassword)
	made := vaultInit("-config", all)
	every(made, "created ")
	if len(made) != len(plan)-1 {
		t.Errorf("%d changes made, %d planned", len(made), len(plan)-1)
	}
	if got := vaultInit("-config", all); !slices.Equal(got, []string{"no changes"}) {
		t.Fatalf("second vault-init: %q", got)
	}

	// Without -prune a removed level's objects stay; with it they go.
	if got := vaultInit("-config", noWriter, "-dry-run", "-prune"); !slices.Equal(got[1:4], []string{
		"delete JWT auth role auth/jwt/role/app-writer: no level of the spec has this Vault role",
		"delete database role database/roles/app-writer: no level of the spec has this Vault role; its leases are revoked first",
		"delete policy sys/policies/acl/pgwarden-app-writer: no level of the spec has the Vault role app-writer",
	}) {
		t.Fatalf("dry run with -prune:\n%s", strings.Join(got, "\n"))
	}
	if got := vaultInit("-config", noWriter); len(got) != 1 || !strings.HasPrefix(got[0], "updated database connection database/config/app: allowed_roles") {
		t.Fatalf("vault-init without the writer:\n%s", strings.Join(got, "\n"))
	}
	if s, err := vc.Logical().Read("database/roles/app-writer"); err != nil || s == nil {
		t.Fatalf("without -prune the writer role went (%v)", err)
	}
	if got := vaultInit("-config", noWriter, "-prune"); len(got) != 3 || !strings.HasPrefix(got[1], "deleted database role database/roles/app-writer") {
		t.Fatalf("vault-init -prune:\n%s", strings.Join(got, "\n"))
	}
	for _, p := range []string{"database/roles/app-writer", "auth/jwt/role/app-writer"} {
		if s, err := vc.Logical().Read(p); err != nil || s != nil {
			t.Errorf("%s after -prune: %v %v", p, s, err)
		}
	}
	if s, err := vc.Logical().Read("database/roles/app-reader"); err != nil || s == nil {
		t.Errorf("-prune removed the reader (%v)", err)
	}
	if got := vaultInit("-config", noWriter, "-prune"); !slices.Equal(got, []string{"no changes"}) {
		t.Fatalf("vault-init -prune again: %q", got)
	}
	if got := vaultInit("-config", noWriter, "-write-passwords"); !slices.Equal(got, []string{
		"updated database connection database/config/app: the admin password is written (asked for)"}) {
		t.Fatalf("vault-init -write-passwords: %q", got)
	}
}

// validConfig is a config check accepts as far as config.Load goes.
const validConfig = `{
  "oidc": {"issuer_url": "https://idp.example", "audiences": ["pgwarden"]},
  "databases": [
    {"name": "a-b", "upstream": "host=127.0.0.1 dbname=ab",
      "levels": [{"name": "reader", "groups": ["g"], "default_ttl": "1h"}, {"name": "c", "groups": ["g"], "vault_role": "ab-c"}]},
    {"name": "a", "upstream": "host=127.0.0.1 dbname=a",
      "levels": [{"name": "b-c", "groups": ["g"]}]}
  ]
}`

func writeConfig(t *testing.T, s string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pgwarden.json")
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// check refuses, before it reaches anything, a config that would misroute,
// and names the field to fix.
func TestItem08CheckRefusesMisroutingConfigNamingTheField(t *testing.T) {
	t.Parallel()
	if _, err := config.Load(writeConfig(t, validConfig), nil); err != nil {
		t.Fatalf("the base of every case must be valid: %v", err)
	}
	replace := func(old, new string) string {
		if !strings.Contains(validConfig, old) {
			t.Fatalf("validConfig lacks %q", old)
		}
		return strings.Replace(validConfig, old, new, 1)
	}
	top := func(setting string) string { return replace(`"oidc"`, setting+`, "oidc"`) }
	cases := map[string]struct{ file, field string }{
		"default vault roles collide":      {replace(`"vault_role": "ab-c"`, `"vault_role": ""`), "databases[1].levels[0].vault_role"},
		"explicit vault role is another's": {replace(`"vault_role": "ab-c"`, `"vault_role": "a-b-reader"`), "databases[0].levels[1].vault_role"},
		"vault role with a slash":          {replace(`"vault_role": "ab-c"`, `"vault_role": "ab/c"`), "databases[0].levels[1].vault_role"},
		"database named twice":             {replace(`"name": "a", `, `"name": "a-b", `), "databases[1].name"},
		"level named twice":                {replace(`{"name": "c", `, `{"name": "reader", `), "databases[0].levels[1].name"},
		"negative auth_timeout":            {top(`"auth_timeout": "-1s"`), "auth_timeout"},
		"negative write_timeout":           {top(`"write_timeout": "-1s"`), "write_timeout"},
		"negative max_handshakes":          {top(`"max_handshakes": -1`), "max_handshakes"},
		"negative max_subject_connections": {top(`"max_subject_connections": -1`), "max_subject_connections"},
		"negative oidc.leeway":             {replace(`"audiences"`, `"leeway": "-1s", "audiences"`), "oidc.leeway"},
		"oidc.leeway over 5m":              {replace(`"audiences"`, `"leeway": "1h", "audiences"`), "oidc.leeway"},
		"negative pool.acquire_timeout":    {top(`"pool": {"acquire_timeout": "-1s"}`), "pool.acquire_timeout"},
		"negative pool.idle_timeout":       {top(`"pool": {"idle_timeout": "-1s"}`), "pool.idle_timeout"},
		"negative pool.dial_timeout":       {top(`"pool": {"dial_timeout": "-1s"}`), "pool.dial_timeout"},
		"negative pool.ping_after_idle":    {top(`"pool": {"ping_after_idle": "-1s"}`), "pool.ping_after_idle"},
		"negative pool.ping_timeout":       {top(`"pool": {"ping_timeout": "-1s"}`), "pool.ping_timeout"},
		"negative pool.max_per_pool":       {top(`"pool": {"max_per_pool": -1}`), "pool.max_per_pool"},
		"negative pool.max_total":          {top(`"pool": {"max_total": -1}`), "pool.max_total"},
		"negative default_ttl":             {replace(`"default_ttl": "1h"`, `"default_ttl": "-1h"`), "databases[0].levels[0].default_ttl"},
		"negative max_ttl":                 {replace(`"default_ttl": "1h"`, `"max_ttl": "-1h"`), "databases[0].levels[0].max_ttl"},
		"default_ttl over max_ttl":         {replace(`"default_ttl": "1h"`, `"default_ttl": "1h", "max_ttl": "1m"`), "databases[0].levels[0].max_ttl"},
		"http issuer_url to another host":  {replace(`"https://idp.example"`, `"http://idp.example"`), "oidc.issuer_url"},
		"http jwks_url to another host":    {replace(`"issuer_url": "https://idp.example"`, `"jwks_url": "http://idp.example/jwks", "issuer": "https://idp.example"`), "oidc.jwks_url"},
		"issuer_url of another scheme":     {replace(`"https://idp.example"`, `"ldap://idp.example"`), "oidc.issuer_url"},
		"http vault.jwt_discovery_url":     {top(`"vault": {"jwt_discovery_url": "http://idp.example"}`), "vault.jwt_discovery_url"},
		"http vault.jwt_jwks_url":          {top(`"vault": {"jwt_jwks_url": "http://idp.example/jwks"}`), "vault.jwt_jwks_url"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			var out, errb bytes.Buffer
			code := run([]string{"check", "-config", writeConfig(t, tc.file)}, &out, &errb)
			if code != 2 {
				t.Fatalf("exit %d, want 2\nstdout %s\nstderr %s", code, out.String(), errb.String())
			}
			if !strings.Contains(errb.String(), tc.field) {
				t.Errorf("stderr does not name %s:\n%s", tc.field, errb.String())
			}
		})
	}
}

// check reports an issuer whose discovery document names another issuer: the
// config is valid, authn.New refuses.
func TestItem08CheckRefusesAnIssuerThatNamesAnother(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]string{"issuer": "https://evil.example", "jwks_uri": "http://" + r.Host + "/jwks"})
	}))
	defer srv.Close()
	file := strings.Replace(validConfig, `"https://idp.example"`, `"`+srv.URL+`"`, 1)
	var out, errb bytes.Buffer
	if code := run([]string{"check", "-config", writeConfig(t, file)}, &out, &errb); code != 1 {
		t.Fatalf("exit %d, want 1\nstdout %s\nstderr %s", code, out.String(), errb.String())
	}
	if !strings.Contains(out.String(), "config: ok") || strings.Contains(out.String(), "issuer: ok") {
		t.Errorf("stdout:\n%s", out.String())
	}
	for _, want := range []string{"names issuer", "evil.example", "oidc.issuer"} {
		if !strings.Contains(errb.String(), want) {
			t.Errorf("stderr lacks %q:\n%s", want, errb.String())
		}
	}
}
