package vaultinit_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/pgwarden/pgwarden/broker/vaultinit"
	"github.com/pgwarden/pgwarden/internal/app"
	"github.com/pgwarden/pgwarden/testenv"
)

// wantForbidden fails unless Vault refuses c reading path with 403.
func wantForbidden(t *testing.T, c *vault.Client, path string) {
	t.Helper()
	sec, err := c.Logical().Read(path)
	var re *vault.ResponseError
	if !errors.As(err, &re) || re.StatusCode != 403 {
		t.Errorf("read %s: %v (secret %t), want 403", path, err, sec != nil)
	}
}

// oldLevelPolicy is a level's policy as vault-init wrote it before levels in
// role scope stopped granting their creds: the marker, then a read grant.
func oldLevelPolicy(path, role, what string) string {
	return vaultinit.PolicyMarker + ": read " + role + " " + what + " only.\npath \"" + path + "\" {\n  capabilities = [\"read\"]\n}\n"
}

// Levels in role scope, dynamic and static, against one Vault nothing
// configured yet: a client's own JWT login to such a level succeeds and reads
// nothing, pgwarden's identity reads, an identity-scoped level's login still
// reads its own creds; and a Vault configured by the previous vault-init,
// whose role-scoped policies granted the creds, is still pgwarden's, has
// those grants removed by an update in place, and is pruned as before.
func TestRoleScopedLevelGrantsClientsNoSecret(t *testing.T) {
	st := testenv.NewStack(t, testenv.StackOptions{NoProxy: true})
	vc := freshVault(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	spec := app.VaultSpec(st.Config, func(string) string { return st.AdminPassword })
	reader := spec.Databases[0].Levels[0]
	report := reader
	report.Name, report.VaultRole, report.Scope = "report", "app-report", vaultinit.ScopeRole
	nightly := vaultinit.Level{Name: "nightly", VaultRole: "app-nightly", Groups: []string{"analyst"}, Scope: vaultinit.ScopeRole,
		Static: true, StaticUsername: "app_report", RotationPeriod: time.Hour}
	spec.Databases[0].Levels = append(slices.Clone(spec.Databases[0].Levels), report, nightly)
	if err := vaultinit.Apply(ctx, vc, spec, nil); err != nil {
		t.Fatal(err)
	}
	wantPlan(t, planOf(t, ctx, vc, spec))

	t.Run("a client's login to a role-scoped level reads nothing, pgwarden's identity reads", func(t *testing.T) {
		for _, role := range []string{"app-report", "app-nightly"} {
			policy, err := vc.Sys().GetPolicy(vaultinit.PolicyName(role))
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(policy, vaultinit.PolicyMarker) || !strings.Contains(policy, "\n"+vaultinit.LevelMarker+" database "+role+"\n") ||
				strings.Contains(policy, "path ") {
				t.Errorf("%s's policy:\n%s", role, policy)
			}
		}
		alice := login(t, st, vc, "app-report", "alice", "analyst")
		wantForbidden(t, alice, "database/creds/app-report")
		wantForbidden(t, alice, "database/static-creds/app-nightly")
		nightlyLogin := login(t, st, vc, "app-nightly", "alice", "analyst")
		wantForbidden(t, nightlyLogin, "database/static-creds/app-nightly")
		wantForbidden(t, nightlyLogin, "database/creds/app-report")
		// Vault's default policy still lets the login look itself up and
		// revoke itself, as pgwarden does with its client logins.
		if _, err := alice.Auth().Token().LookupSelf(); err != nil {
			t.Errorf("lookup-self: %v", err)
		}
		if err := alice.Auth().Token().RevokeSelf(""); err != nil {
			t.Errorf("revoke-self: %v", err)
		}

		server := serverClient(t, vc)
		user, _ := creds(t, st, server, "app-report")
		if !strings.HasPrefix(user, "pgwarden-app-report-") {
			t.Errorf("role-scoped user %q", user)
		}
		if u, pw := staticCreds(t, server, "app-nightly"); pgLogin(st, u, pw) != nil {
			t.Errorf("log in with app-nightly's static creds as %s", u)
		}

		// An identity-scoped level's login reads its own lease.
		user, _ = creds(t, st, login(t, st, vc, "app-reader", "bob", "analyst"), "app-reader")
		if !strings.HasPrefix(user, "v-jwt-bob-app-reader-") {
			t.Errorf("identity-scoped user %q", user)
		}
	})

	roleScoped := []string{"app-report", "app-nightly"}
	pruned := without(without(spec, "app-report"), "app-nightly")
	pruned.Prune = true
	prunePlan := []string{
		"delete auth/jwt/role/app-report", "delete auth/jwt/role/app-nightly",
		"delete database/roles/app-report", "delete database/static-roles/app-nightly",
		"delete sys/policies/acl/pgwarden-app-report", "delete sys/policies/acl/pgwarden-app-nightly",
		"delete database/config/app-role", "delete sys/policies/acl/" + vaultinit.ServerPolicyName,
	}

	t.Run("a policy of another mount's level does not make a role pgwarden's", func(t *testing.T) {
		if err := vc.Sys().PutPolicy("pgwarden-ops-ghost", vaultinit.PolicyMarker+": level ops-ghost is in role scope: this policy grants no secret.\n"+
			vaultinit.LevelMarker+" otherdb ops-ghost\n"); err != nil {
			t.Fatal(err)
		}
		if _, err := vc.Logical().Write("auth/jwt/role/ops-ghost", map[string]any{"role_type": "jwt", "bound_audiences": []string{testenv.Audience},
			"user_claim": "sub", "token_policies": []string{"pgwarden-ops-ghost"}}); err != nil {
			t.Fatal(err)
		}
		wantPlan(t, planOf(t, ctx, vc, pruned), prunePlan...)
	})

	t.Run("an old-style policy is pgwarden's, and the update removes its grant", func(t *testing.T) {
		old := map[string]string{
			"app-report":  oldLevelPolicy("database/creds/app-report", "app-report", "credentials"),
			"app-nightly": oldLevelPolicy("database/static-creds/app-nightly", "app-nightly", "static credentials"),
		}
		for role, text := range old {
			if err := vc.Sys().PutPolicy(vaultinit.PolicyName(role), text); err != nil {
				t.Fatal(err)
			}
		}
		// The hole the old policy left: a person's own login reads the
		// shared credential.
		if _, err := login(t, st, vc, "app-nightly", "carol", "analyst").Logical().Read("database/static-creds/app-nightly"); err != nil {
			t.Fatalf("the old policy does not grant what it did: %v", err)
		}

		// Owned: with prune, the old-style levels go as new-style ones do.
		wantPlan(t, planOf(t, ctx, vc, pruned), prunePlan...)

		cs := planOf(t, ctx, vc, spec)
		wantPlan(t, cs, "update sys/policies/acl/pgwarden-app-report", "update sys/policies/acl/pgwarden-app-nightly")
		for _, c := range cs {
			if !strings.Contains(c.Detail, "no secret") {
				t.Errorf("%s", c)
			}
		}
		if err := cs.Apply(ctx, vc, nil); err != nil {
			t.Fatal(err)
		}
		wantPlan(t, planOf(t, ctx, vc, spec))
		for _, role := range roleScoped {
			if policy, _ := vc.Sys().GetPolicy(vaultinit.PolicyName(role)); strings.Contains(policy, "path ") {
				t.Errorf("%s's policy after the update:\n%s", role, policy)
			}
		}
		wantForbidden(t, login(t, st, vc, "app-nightly", "carol", "analyst"), "database/static-creds/app-nightly")
		wantForbidden(t, login(t, st, vc, "app-report", "carol", "analyst"), "database/creds/app-report")
		creds(t, st, serverClient(t, vc), "app-report")
	})

	t.Run("pruned, the upgraded levels are gone and only they", func(t *testing.T) {
		server := serverClient(t, vc)
		reportUser, _ := creds(t, st, server, "app-report")
		cs := planOf(t, ctx, vc, pruned)
		wantPlan(t, cs, prunePlan...)
		if err := cs.Apply(ctx, vc, nil); err != nil {
			t.Fatal(err)
		}
		wantPlan(t, planOf(t, ctx, vc, pruned))
		for _, p := range []string{"auth/jwt/role/app-report", "auth/jwt/role/app-nightly", "database/roles/app-report", "database/static-roles/app-nightly"} {
			if readData(t, vc, p) != nil {
				t.Errorf("%s is still there", p)
			}
		}
		for _, role := range roleScoped {
			if text, _ := vc.Sys().GetPolicy(vaultinit.PolicyName(role)); text != "" {
				t.Errorf("%s's policy is still there", role)
			}
		}
		if pgRoleExists(t, st, reportUser) {
			t.Errorf("the pruned level's database user %s outlived it", reportUser)
		}
		if !pgRoleExists(t, st, "app_report") {
			t.Error("pruning the static level dropped its user")
		}
		if readData(t, vc, "auth/jwt/role/ops-ghost") == nil {
			t.Error("prune removed ops-ghost, which another mount's policy marks")
		}
		creds(t, st, login(t, st, vc, "app-reader", "alice", "analyst"), "app-reader")
	})
}
