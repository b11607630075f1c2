package vaultinit_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
	"github.com/jackc/pgx/v5"

	"github.com/pgwarden/pgwarden/broker/vaultinit"
	"github.com/pgwarden/pgwarden/internal/app"
	"github.com/pgwarden/pgwarden/testenv"
)

// pgLogin logs in to database app as user with password and checks that the
// session is user's.
func pgLogin(st *testenv.Stack, user, password string) error {
	cfg, err := pgx.ParseConfig(fmt.Sprintf("host=127.0.0.1 port=%d dbname=app sslmode=disable", st.PG.Port))
	if err != nil {
		return err
	}
	cfg.User, cfg.Password = user, password
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	var current string
	if err := conn.QueryRow(ctx, "select current_user").Scan(&current); err != nil {
		return err
	}
	if current != user {
		return fmt.Errorf("current_user is %q, not %q", current, user)
	}
	return nil
}

// serverClient is a client with a token of pgwarden's own policy only.
func serverClient(t *testing.T, vc *vault.Client) *vault.Client {
	t.Helper()
	tok, err := vc.Auth().Token().Create(&vault.TokenCreateRequest{Policies: []string{vaultinit.ServerPolicyName}, NoDefaultPolicy: true})
	if err != nil {
		t.Fatal(err)
	}
	c, err := vc.Clone()
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(tok.Auth.ClientToken)
	return c
}

// staticCreds reads role's static credentials with c.
func staticCreds(t *testing.T, c *vault.Client, role string) (user, password string) {
	t.Helper()
	sec, err := c.Logical().Read("database/static-creds/" + role)
	if err != nil || sec == nil {
		t.Fatalf("read %s static creds: %v", role, err)
	}
	user, _ = sec.Data["username"].(string)
	password, _ = sec.Data["password"].(string)
	if user == "" || password == "" {
		t.Fatalf("%s static creds: username %q, password empty %t", role, user, password == "")
	}
	return user, password
}

// withLevel is spec with role's level replaced by l.
func withLevel(spec vaultinit.Spec, role string, l vaultinit.Level) vaultinit.Spec {
	spec = cloneSpec(spec)
	for i := range spec.Databases {
		for j := range spec.Databases[i].Levels {
			if spec.Databases[i].Levels[j].VaultRole == role {
				spec.Databases[i].Levels[j] = l
			}
		}
	}
	return spec
}

// changeOf is the change of cs at "action path"; it fails when there is none.
func changeOf(t *testing.T, cs vaultinit.Changes, actionPath string) vaultinit.Change {
	t.Helper()
	i := slices.Index(paths(cs), actionPath)
	if i < 0 {
		t.Fatalf("no %s in the plan:\n  %s", actionPath, strings.Join(paths(cs), "\n  "))
	}
	return cs[i]
}

// A static level over an existing database user, in order against one Vault
// nothing configured yet: a dry run, apply and nothing left to do, Vault
// holding the user's password, pgwarden's identity reading it, a rotation, a
// new rotation period, the level turned dynamic and back, a new user, and the
// level pruned with its user left in PostgreSQL.
func TestStaticLevel(t *testing.T) {
	st := testenv.NewStack(t, testenv.StackOptions{NoProxy: true})
	vc := freshVault(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for _, q := range []string{
		"ALTER ROLE app_report LOGIN PASSWORD 'x'", // testenv's seed creates it, for static levels
		"CREATE ROLE app_report2 LOGIN PASSWORD 'y' IN ROLE app_read",
	} {
		if err := st.PG.Exec(ctx, "app", q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}

	spec := app.VaultSpec(st.Config, func(string) string { return st.AdminPassword })
	reader := spec.Databases[0].Levels[0]
	report := vaultinit.Level{Name: "report", VaultRole: "app-report", Groups: []string{"analyst"}, Scope: vaultinit.ScopeRole,
		Static: true, StaticUsername: "app_report", RotationPeriod: time.Hour}
	spec.Databases[0].Levels = append(slices.Clone(spec.Databases[0].Levels), report)

	t.Run("a dry run lists the static role in place of a database role", func(t *testing.T) {
		want := []string{
			"create sys/mounts/database", "create sys/auth/jwt", "create auth/jwt/config",
			"create database/config/app", "create database/config/app-role",
			"create sys/policies/acl/" + vaultinit.ServerPolicyName,
			"create sys/policies/acl/pgwarden-app-report", "create database/static-roles/app-report", "create auth/jwt/role/app-report",
		}
		for _, r := range []string{"app-reader", "app-writer", "app-admin"} {
			want = append(want, "create sys/policies/acl/pgwarden-"+r, "create database/roles/"+r, "create auth/jwt/role/"+r)
		}
		cs := planOf(t, ctx, vc, spec)
		wantPlan(t, cs, want...)
		c := changeOf(t, cs, "create database/static-roles/app-report")
		if c.Kind != vaultinit.KindStaticRole || !strings.Contains(c.Detail, "user app_report") || !strings.Contains(c.Detail, "rotation_period 1h0m0s") ||
			!strings.Contains(c.Detail, "connection app-role") {
			t.Errorf("%s", c)
		}
		if d := changeOf(t, cs, "create sys/policies/acl/pgwarden-app-report").Detail; !strings.Contains(d, "database/static-creds/app-report") {
			t.Errorf("policy detail %q", d)
		}
		if err := pgLogin(st, "app_report", "x"); err != nil {
			t.Fatalf("a dry run touched the user: %v", err)
		}
	})

	t.Run("apply, then nothing is left to do, and Vault alone knows the password", func(t *testing.T) {
		cs := planOf(t, ctx, vc, spec)
		if err := cs.Apply(ctx, vc, nil); err != nil {
			t.Fatal(err)
		}
		wantPlan(t, planOf(t, ctx, vc, spec))

		role := readData(t, vc, "database/static-roles/app-report")
		if role["db_name"] != "app-role" || role["username"] != "app_report" || fmt.Sprint(role["rotation_period"]) != "3600" {
			t.Errorf("static role %v", role)
		}
		if readData(t, vc, "database/roles/app-report") != nil {
			t.Error("a static level has a database role too")
		}
		if got := toStrings(readData(t, vc, "database/config/app-role")["allowed_roles"]); !slices.Equal(got, []string{"app-report"}) {
			t.Errorf("app-role allows %v", got)
		}
		if pgLogin(st, "app_report", "x") == nil {
			t.Error("the user's own password still works: Vault did not rotate it on creation")
		}
		// Least privilege: the level's own policy grants nothing, pgwarden's
		// reads the static creds only.
		policy, _ := vc.Sys().GetPolicy("pgwarden-app-report")
		if !strings.HasPrefix(policy, vaultinit.PolicyMarker) || !strings.Contains(policy, vaultinit.LevelMarker+" database app-report\n") || strings.Contains(policy, "path ") {
			t.Errorf("level policy:\n%s", policy)
		}
		server, _ := vc.Sys().GetPolicy(vaultinit.ServerPolicyName)
		if !strings.Contains(server, `path "database/static-creds/app-report"`) || strings.Contains(server, `"database/creds/app-report"`) {
			t.Errorf("server policy:\n%s", server)
		}
	})

	var password string
	t.Run("pgwarden's identity reads the static creds, and a rotation changes them", func(t *testing.T) {
		server := serverClient(t, vc)
		user, pw := staticCreds(t, server, "app-report")
		if user != "app_report" {
			t.Fatalf("static user %q", user)
		}
		if err := pgLogin(st, user, pw); err != nil {
			t.Fatalf("log in with the static creds: %v", err)
		}
		if _, err := server.Logical().Read("database/static-creds/app-reader"); err == nil {
			t.Error("pgwarden's identity read another level's path")
		}
		// The JWT auth role is still there: Vault decides who has the level,
		// and the person's own login reads no password.
		wantForbidden(t, login(t, st, vc, "app-report", "alice", "analyst"), "database/static-creds/app-report")
		tok, err := st.Issuer.Mint(testenv.Claims{Subject: "bob", Groups: []string{"dba"}})
		if err != nil {
			t.Fatal(err)
		}
		anon, _ := vc.Clone()
		anon.ClearToken()
		if _, err := anon.Logical().Write("auth/jwt/login", map[string]any{"role": "app-report", "jwt": tok}); err == nil {
			t.Error("Vault let a dba who is no analyst log in to the report level")
		}

		if _, err := vc.Logical().Write("database/rotate-role/app-report", nil); err != nil {
			t.Fatalf("rotate: %v", err)
		}
		_, password = staticCreds(t, server, "app-report")
		if password == pw {
			t.Fatal("the rotation left the password")
		}
		if pgLogin(st, user, pw) == nil {
			t.Error("the password before the rotation still works")
		}
		if err := pgLogin(st, user, password); err != nil {
			t.Errorf("the rotated password: %v", err)
		}
	})

	t.Run("a new rotation period is an update in place", func(t *testing.T) {
		longer := report
		longer.RotationPeriod = 2 * time.Hour
		spec = withLevel(spec, "app-report", longer)
		cs := planOf(t, ctx, vc, spec)
		wantPlan(t, cs, "update database/static-roles/app-report")
		if d := cs[0].Detail; d != "rotation_period 1h0m0s → 2h0m0s" {
			t.Errorf("detail %q", d)
		}
		if err := cs.Apply(ctx, vc, nil); err != nil {
			t.Fatal(err)
		}
		wantPlan(t, planOf(t, ctx, vc, spec))
		if got := fmt.Sprint(readData(t, vc, "database/static-roles/app-report")["rotation_period"]); got != "7200" {
			t.Errorf("rotation_period %s", got)
		}
		if _, pw := staticCreds(t, vc, "app-report"); pw != password {
			t.Error("the update rotated the password")
		}
	})

	t.Run("a level turned dynamic and back replaces one kind of role with the other", func(t *testing.T) {
		dynamic := reader
		dynamic.Name, dynamic.VaultRole, dynamic.Groups, dynamic.Scope = "report", "app-report", []string{"analyst"}, vaultinit.ScopeRole
		dyn := withLevel(spec, "app-report", dynamic)
		cs := planOf(t, ctx, vc, dyn)
		wantPlan(t, cs, "update sys/policies/acl/pgwarden-app-report", "create database/roles/app-report",
			"delete database/static-roles/app-report", "update auth/jwt/role/app-report", "update sys/policies/acl/"+vaultinit.ServerPolicyName)
		if d := changeOf(t, cs, "delete database/static-roles/app-report").Detail; !strings.Contains(d, "dynamic now") || !strings.Contains(d, "app_report") {
			t.Errorf("detail %q", d)
		}
		if err := cs.Apply(ctx, vc, nil); err != nil {
			t.Fatal(err)
		}
		wantPlan(t, planOf(t, ctx, vc, dyn))
		server := serverClient(t, vc)
		dynUser, _ := creds(t, st, server, "app-report")
		if _, err := server.Logical().Read("database/static-creds/app-report"); err == nil {
			t.Error("pgwarden's identity still reads static creds of a dynamic level")
		}
		if !pgRoleExists(t, st, "app_report") {
			t.Fatal("deleting the static role dropped its user")
		}

		cs = planOf(t, ctx, vc, spec)
		wantPlan(t, cs, "update sys/policies/acl/pgwarden-app-report", "create database/static-roles/app-report",
			"delete database/roles/app-report", "update auth/jwt/role/app-report", "update sys/policies/acl/"+vaultinit.ServerPolicyName)
		// Vault refuses a role and a static role of one name: the old kind
		// goes before the new one comes.
		at := func(p string) int { return slices.Index(paths(cs), p) }
		if at("delete database/roles/app-report") > at("create database/static-roles/app-report") {
			t.Errorf("plan:\n  %s", strings.Join(paths(cs), "\n  "))
		}
		if err := cs.Apply(ctx, vc, nil); err != nil {
			t.Fatal(err)
		}
		wantPlan(t, planOf(t, ctx, vc, spec))
		if pgRoleExists(t, st, dynUser) {
			t.Errorf("the dynamic user %s outlived its role", dynUser)
		}
		user, pw := staticCreds(t, server, "app-report")
		if err := pgLogin(st, user, pw); err != nil {
			t.Errorf("static creds after the switch back: %v", err)
		}
	})

	t.Run("a new user replaces the static role", func(t *testing.T) {
		other := report
		other.RotationPeriod, other.StaticUsername = 2*time.Hour, "app_report2"
		spec = withLevel(spec, "app-report", other)
		cs := planOf(t, ctx, vc, spec)
		if got := paths(cs); !slices.Equal(got, []string{"delete database/static-roles/app-report", "create database/static-roles/app-report"}) {
			t.Fatalf("plan %v", got)
		}
		if err := cs.Apply(ctx, vc, nil); err != nil {
			t.Fatal(err)
		}
		wantPlan(t, planOf(t, ctx, vc, spec))
		user, pw := staticCreds(t, serverClient(t, vc), "app-report")
		if user != "app_report2" {
			t.Fatalf("static user %q", user)
		}
		if err := pgLogin(st, user, pw); err != nil {
			t.Error(err)
		}
		if pgLogin(st, "app_report2", "y") == nil {
			t.Error("app_report2's own password still works")
		}
	})

	t.Run("pruned, the static role is gone and its user stays", func(t *testing.T) {
		less := without(spec, "app-report")
		less.Prune = true
		cs := planOf(t, ctx, vc, less)
		wantPlan(t, cs, "delete auth/jwt/role/app-report", "delete database/static-roles/app-report", "delete sys/policies/acl/pgwarden-app-report",
			"delete database/config/app-role", "delete sys/policies/acl/"+vaultinit.ServerPolicyName)
		if d := changeOf(t, cs, "delete database/static-roles/app-report").Detail; !strings.Contains(d, "does not drop its user app_report2") {
			t.Errorf("detail %q", d)
		}
		if err := cs.Apply(ctx, vc, nil); err != nil {
			t.Fatal(err)
		}
		wantPlan(t, planOf(t, ctx, vc, less))
		if readData(t, vc, "database/static-roles/app-report") != nil {
			t.Error("the static role is still there")
		}
		for _, u := range []string{"app_report", "app_report2"} {
			if !pgRoleExists(t, st, u) {
				t.Errorf("Vault dropped %s", u)
			}
		}
		creds(t, st, login(t, st, vc, "app-reader", "alice", "analyst"), "app-reader")
	})

	t.Run("a static level over a user PostgreSQL does not have fails to apply and leaves no role", func(t *testing.T) {
		ghost := report
		ghost.Name, ghost.VaultRole, ghost.StaticUsername = "ghost", "app-ghost", "app_ghost"
		ghosts := cloneSpec(spec)
		ghosts.Databases[0].Levels = append(ghosts.Databases[0].Levels, ghost)
		err := vaultinit.Apply(ctx, vc, ghosts, nil)
		if err == nil || !strings.Contains(err.Error(), "static-roles/app-ghost") {
			t.Fatalf("Apply: %v", err)
		}
		if !strings.Contains(err.Error(), `role "app_ghost" does not exist`) {
			t.Errorf("Apply's error does not say why: %v", err)
		}
		if readData(t, vc, "database/static-roles/app-ghost") != nil {
			t.Error("Vault kept the static role of a user it could not rotate")
		}
		if !slices.Contains(paths(planOf(t, ctx, vc, ghosts)), "create database/static-roles/app-ghost") {
			t.Error("the next plan does not create it again")
		}
	})

	t.Run("a static role of a level's name that is not pgwarden's is refused", func(t *testing.T) {
		if _, err := vc.Logical().Write("database/config/app", map[string]any{"allowed_roles": []string{"app-reader", "app-writer", "app-admin", "ops-static"}}); err != nil {
			t.Fatal(err)
		}
		if _, err := vc.Logical().Write("database/static-roles/ops-static", map[string]any{"db_name": "app", "username": "app_report", "rotation_period": 3600}); err != nil {
			t.Fatal(err)
		}
		ops := cloneSpec(spec)
		ops.Databases[0].Levels = append(ops.Databases[0].Levels, vaultinit.Level{Name: "ops", VaultRole: "ops-static", CreationStatements: reader.CreationStatements})
		_, err := vaultinit.Plan(ctx, vc, ops)
		if err == nil || !strings.Contains(err.Error(), "database/static-roles/ops-static exists and is not pgwarden's") {
			t.Fatalf("Plan: %v", err)
		}
	})
}
