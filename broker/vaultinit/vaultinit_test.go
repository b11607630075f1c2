package vaultinit_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/pgwarden/pgwarden/broker/vaultinit"
	"github.com/pgwarden/pgwarden/internal/app"
	"github.com/pgwarden/pgwarden/testenv"
)

// The stack has already run Apply once; running it again must succeed and
// leave the same least-privilege configuration, which Vault then enforces.
func TestApplyIsIdempotentAndLeastPrivilege(t *testing.T) {
	st := testenv.NewStack(t, testenv.StackOptions{NoProxy: true})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	vc, err := st.Vault.Client()
	if err != nil {
		t.Fatal(err)
	}
	spec := app.VaultSpec(st.Config, func(string) string { return st.AdminPassword })
	var logs strings.Builder
	if err := vaultinit.Apply(ctx, vc, spec, slog.New(slog.NewTextHandler(&logs, nil))); err != nil {
		t.Fatalf("second Apply: %v", err)
	}
	if strings.Contains(logs.String(), st.AdminPassword) {
		t.Fatal("Apply logged the admin password")
	}
	if strings.Contains(logs.String(), "enabled") {
		t.Errorf("second Apply enabled a mount again:\n%s", logs.String())
	}

	policy, err := vc.Sys().GetPolicy(vaultinit.PolicyName("app-reader"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(policy, `path "database/creds/app-reader"`) || strings.Count(policy, "path ") != 1 {
		t.Fatalf("reader policy is not limited to its own creds:\n%s", policy)
	}
	dbcfg, err := vc.Logical().Read("database/config/app")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(dbcfg.Data["connection_details"].(map[string]any)["connection_url"].(string), st.AdminPassword) {
		t.Fatal("admin password stored in the connection URL")
	}

	// Vault's own binding refuses an analyst asking for writer credentials,
	// whatever pgwarden decides.
	tok, err := st.Issuer.Mint(testenv.Claims{Subject: "alice", Groups: []string{"analyst"}})
	if err != nil {
		t.Fatal(err)
	}
	anon, _ := vc.Clone()
	anon.ClearToken()
	if _, err := anon.Logical().Write("auth/jwt/login", map[string]any{"role": "app-writer", "jwt": tok}); err == nil {
		t.Fatal("Vault let an analyst log in as writer")
	}
	sec, err := anon.Logical().Write("auth/jwt/login", map[string]any{"role": "app-reader", "jwt": tok})
	if err != nil {
		t.Fatalf("analyst login as reader: %v", err)
	}
	// The returned token reads reader creds and nothing else.
	anon.SetToken(sec.Auth.ClientToken)
	if _, err := anon.Logical().Read("database/creds/app-writer"); err == nil {
		t.Fatal("a reader's Vault token read writer credentials")
	}
	creds, err := anon.Logical().Read("database/creds/app-reader")
	if err != nil || creds.Data["username"] == "" {
		t.Fatalf("reader creds: %v", err)
	}
}
