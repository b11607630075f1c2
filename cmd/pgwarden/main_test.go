package main

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

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
