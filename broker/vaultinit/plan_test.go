package vaultinit_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
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

// freshVault starts a Vault dev server of its own, beside the stack's, that
// nothing has configured yet.
func freshVault(t *testing.T) *vault.Client {
	t.Helper()
	_, vc := testenv.NewVault(t)
	return vc
}

// cloneSpec copies spec deeply enough to change its databases and levels.
func cloneSpec(spec vaultinit.Spec) vaultinit.Spec {
	dbs := slices.Clone(spec.Databases)
	for i := range dbs {
		dbs[i].Levels = slices.Clone(dbs[i].Levels)
	}
	spec.Databases = dbs
	return spec
}

// without is spec without the level of Vault role role.
func without(spec vaultinit.Spec, role string) vaultinit.Spec {
	spec = cloneSpec(spec)
	for i := range spec.Databases {
		spec.Databases[i].Levels = slices.DeleteFunc(spec.Databases[i].Levels, func(l vaultinit.Level) bool { return l.VaultRole == role })
	}
	return spec
}

// withScope is spec with role's level in scope.
func withScope(spec vaultinit.Spec, role, scope string) vaultinit.Spec {
	spec = cloneSpec(spec)
	for i := range spec.Databases {
		for j := range spec.Databases[i].Levels {
			if spec.Databases[i].Levels[j].VaultRole == role {
				spec.Databases[i].Levels[j].Scope = scope
			}
		}
	}
	return spec
}

// paths lists "action path" for each change.
func paths(cs vaultinit.Changes) []string {
	var out []string
	for _, c := range cs {
		out = append(out, string(c.Action)+" "+c.Path)
	}
	return out
}

func planOf(t *testing.T, ctx context.Context, vc *vault.Client, spec vaultinit.Spec) vaultinit.Changes {
	t.Helper()
	cs, err := vaultinit.Plan(ctx, vc, spec)
	if err != nil {
		t.Fatalf("Plan: %v", err)
	}
	return cs
}

func wantPlan(t *testing.T, cs vaultinit.Changes, want ...string) {
	t.Helper()
	got := paths(cs)
	if !slices.Equal(sorted(got), sorted(want)) {
		t.Fatalf("plan:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

func readData(t *testing.T, vc *vault.Client, path string) map[string]any {
	t.Helper()
	s, err := vc.Logical().Read(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	if s == nil {
		return nil
	}
	return s.Data
}

// login logs in to Vault's JWT auth as sub (in groups) for role and returns a
// client with the Vault token it got.
func login(t *testing.T, st *testenv.Stack, vc *vault.Client, role, sub string, groups ...string) *vault.Client {
	t.Helper()
	tok, err := st.Issuer.Mint(testenv.Claims{Subject: sub, Groups: groups})
	if err != nil {
		t.Fatal(err)
	}
	c, err := vc.Clone()
	if err != nil {
		t.Fatal(err)
	}
	c.ClearToken()
	sec, err := c.Logical().Write("auth/jwt/login", map[string]any{"role": role, "jwt": tok})
	if err != nil {
		t.Fatalf("%s logs in as %s: %v", sub, role, err)
	}
	c.SetToken(sec.Auth.ClientToken)
	return c
}

// creds reads role's dynamic credentials with c and checks that PostgreSQL
// knows the user they name: a session under them says it is that user.
func creds(t *testing.T, st *testenv.Stack, c *vault.Client, role string) (user string, lease string) {
	t.Helper()
	sec, err := c.Logical().Read("database/creds/" + role)
	if err != nil {
		t.Fatalf("read %s creds: %v", role, err)
	}
	user, _ = sec.Data["username"].(string)
	pw, _ := sec.Data["password"].(string)
	cfg, err := pgx.ParseConfig(fmt.Sprintf("host=127.0.0.1 port=%d dbname=app sslmode=disable", st.PG.Port))
	if err != nil {
		t.Fatal(err)
	}
	cfg.User, cfg.Password = user, pw
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("connect as %s's user %q: %v", role, user, err)
	}
	defer conn.Close(ctx)
	var current string
	if err := conn.QueryRow(ctx, "select current_user").Scan(&current); err != nil || current != user {
		t.Fatalf("current_user %q (%v), want %q", current, err, user)
	}
	return user, sec.LeaseID
}

func pgRoleExists(t *testing.T, st *testenv.Stack, name string) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, st.PG.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, "select count(*) from pg_roles where rolname = $1", name).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n == 1
}

// The whole life of a spec against a Vault nothing configured yet: a dry run,
// apply, nothing left to do, the database users each scope's connection
// names, a level removed and pruned, the last role-scoped level moved back.
// The steps share one Vault and run in order.
func TestPlanApplyPrune(t *testing.T) {
	st := testenv.NewStack(t, testenv.StackOptions{NoProxy: true})
	vc := freshVault(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// The stack's levels (reader, writer, admin) and a report level in role
	// scope, read with pgwarden's own Vault identity.
	spec := app.VaultSpec(st.Config, func(string) string { return st.AdminPassword })
	reader := spec.Databases[0].Levels[0]
	if reader.VaultRole != "app-reader" {
		t.Fatalf("the stack's first level is %s, not app-reader", reader.VaultRole)
	}
	report := reader
	report.Name, report.VaultRole, report.Scope = "report", "app-report", vaultinit.ScopeRole
	spec.Databases[0].Levels = append(slices.Clone(spec.Databases[0].Levels), report)
	everything := []string{
		"create sys/mounts/database", "create sys/auth/jwt", "create auth/jwt/config",
		"create database/config/app", "create database/config/app-role",
		"create sys/policies/acl/" + vaultinit.ServerPolicyName,
	}
	for _, r := range []string{"app-reader", "app-writer", "app-admin", "app-report"} {
		everything = append(everything, "create sys/policies/acl/pgwarden-"+r, "create database/roles/"+r, "create auth/jwt/role/"+r)
	}

	t.Run("a dry run on a fresh Vault lists creates and writes nothing", func(t *testing.T) {
		cs := planOf(t, ctx, vc, spec)
		wantPlan(t, cs, everything...)
		// A level's policy, which marks its roles as pgwarden's, comes first.
		at := func(path string) int { return slices.Index(paths(cs), "create "+path) }
		for _, r := range []string{"app-reader", "app-report"} {
			if p, d, j := at("sys/policies/acl/pgwarden-"+r), at("database/roles/"+r), at("auth/jwt/role/"+r); p > d || d > j {
				t.Errorf("%s: policy at %d, database role at %d, JWT role at %d", r, p, d, j)
			}
		}
		for _, c := range cs {
			if line := c.String(); strings.Contains(line, st.AdminPassword) || strings.Contains(fmt.Sprintf("%+v", c), st.AdminPassword) || strings.Contains(line, "\n") {
				t.Fatalf("plan line holds the admin password or a newline: %q", line)
			}
		}
		mounts, err := vc.Sys().ListMounts()
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := mounts["database/"]; ok {
			t.Fatal("Plan mounted the database engine")
		}
		if p, _ := vc.Sys().GetPolicy("pgwarden-app-reader"); p != "" {
			t.Fatal("Plan wrote a policy")
		}
		wantPlan(t, planOf(t, ctx, vc, spec), everything...)
	})

	t.Run("apply, then nothing is left to do", func(t *testing.T) {
		cs := planOf(t, ctx, vc, spec)
		var made int
		if err := cs.Apply(ctx, vc, func(vaultinit.Change) { made++ }); err != nil {
			t.Fatal(err)
		}
		if made != len(cs) {
			t.Fatalf("%d of %d changes reported made", made, len(cs))
		}
		wantPlan(t, planOf(t, ctx, vc, spec))
		var logs strings.Builder
		if err := vaultinit.Apply(ctx, vc, spec, slog.New(slog.NewTextHandler(&logs, nil))); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(logs.String(), "no changes") {
			t.Fatalf("second Apply logged:\n%s", logs.String())
		}

		app := readData(t, vc, "database/config/app")
		role := readData(t, vc, "database/config/app-role")
		if got := sorted(toStrings(app["allowed_roles"])); !slices.Equal(got, []string{"app-admin", "app-reader", "app-writer"}) {
			t.Errorf("app allows %v", got)
		}
		if got := toStrings(role["allowed_roles"]); !slices.Equal(got, []string{"app-report"}) {
			t.Errorf("app-role allows %v", got)
		}
		if got := app["connection_details"].(map[string]any)["username_template"]; got != vaultinit.IdentityUsernameTemplate {
			t.Errorf("app's username template %q", got)
		}
		if got := role["connection_details"].(map[string]any)["username_template"]; got != vaultinit.RoleUsernameTemplate {
			t.Errorf("app-role's username template %q", got)
		}
		for r, conn := range map[string]string{"app-reader": "app", "app-report": "app-role"} {
			if got := readData(t, vc, "database/roles/"+r)["db_name"]; got != conn {
				t.Errorf("%s uses connection %v, want %s", r, got, conn)
			}
		}
	})

	t.Run("a refused admin password is not in the error", func(t *testing.T) {
		bad := cloneSpec(spec)
		bad.Databases[0].Password = "not-the-password-" + st.AdminPassword[:8]
		bad.WritePasswords = true
		cs := planOf(t, ctx, vc, bad)
		wantPlan(t, cs, "update database/config/app", "update database/config/app-role")
		err := cs.Apply(ctx, vc, nil)
		if err == nil {
			t.Fatal("Vault took a wrong admin password")
		}
		if strings.Contains(err.Error(), bad.Databases[0].Password) {
			t.Fatalf("error holds the password: %v", err)
		}
		wantPlan(t, planOf(t, ctx, vc, spec)) // nothing was written
	})

	t.Run("an identity-scoped user names the person", func(t *testing.T) {
		for _, tc := range []struct{ sub, prefix string }{
			{"alice", "v-jwt-alice-app-reader-"},
			{`o'brien"x`, "v-jwt-obrienx-app-reader-"},
			{strings.Repeat("long", 30), "v-jwt-" + strings.Repeat("long", 8) + "-app-reader-"}, // 36 bytes of display name
		} {
			c := login(t, st, vc, "app-reader", tc.sub, "analyst")
			user, _ := creds(t, st, c, "app-reader")
			if !strings.HasPrefix(user, tc.prefix) || len(user) > 63 {
				t.Errorf("subject %q: database user %q (%d bytes), want prefix %q and at most 63 bytes", tc.sub, user, len(user), tc.prefix)
			}
		}
	})

	t.Run("a role-scoped user names pgwarden and no person", func(t *testing.T) {
		tok, err := vc.Auth().Token().Create(&vault.TokenCreateRequest{Policies: []string{vaultinit.ServerPolicyName}, NoDefaultPolicy: true, DisplayName: "alice"})
		if err != nil {
			t.Fatal(err)
		}
		server, _ := vc.Clone()
		server.SetToken(tok.Auth.ClientToken)
		user, lease := creds(t, st, server, "app-report")
		if !strings.HasPrefix(user, "pgwarden-app-report-") || strings.Contains(user, "alice") || len(user) > 63 {
			t.Errorf("role-scoped user %q", user)
		}
		// pgwarden's identity renews and revokes its leases, looks up its
		// own token, and reads nothing of an identity-scoped level.
		if _, err := server.Sys().Renew(lease, 60); err != nil {
			t.Errorf("renew: %v", err)
		}
		if _, err := server.Auth().Token().LookupSelf(); err != nil {
			t.Errorf("lookup-self: %v", err)
		}
		if err := server.Sys().Revoke(lease); err != nil {
			t.Errorf("revoke: %v", err)
		}
		if _, err := server.Logical().Read("database/creds/app-reader"); err == nil {
			t.Error("pgwarden's identity read an identity-scoped level's creds")
		}
		// A person's own login to the level succeeds (Vault lets them have
		// it) and reads nothing: the shared credential is pgwarden's to read.
		c := login(t, st, vc, "app-report", "alice", "analyst")
		wantForbidden(t, c, "database/creds/app-report")
	})

	// An operator's own objects beside pgwarden's: a connection and role,
	// a policy in pgwarden's namespace without the marker, a JWT auth role,
	// a marked policy of another mount, an extra allowed role on app.
	foreign := func(t *testing.T) {
		t.Helper()
		w := func(path string, data map[string]any) {
			if _, err := vc.Logical().Write(path, data); err != nil {
				t.Fatalf("write %s: %v", path, err)
			}
		}
		w("database/config/ops", map[string]any{"plugin_name": "postgresql-database-plugin", "connection_url": spec.Databases[0].ConnectionURL,
			"username": "vault_admin", "password": st.AdminPassword, "allowed_roles": []string{"ops-report"}})
		w("database/roles/ops-report", map[string]any{"db_name": "ops", "creation_statements": reader.CreationStatements})
		if err := vc.Sys().PutPolicy("pgwarden-ops-report", `path "database/creds/ops-report" { capabilities = ["read"] }`); err != nil {
			t.Fatal(err)
		}
		if err := vc.Sys().PutPolicy("pgwarden-other", vaultinit.PolicyMarker+": read other credentials only.\npath \"otherdb/creds/other\" {\n  capabilities = [\"read\"]\n}\n"); err != nil {
			t.Fatal(err)
		}
		w("auth/jwt/role/ops-report", map[string]any{"role_type": "jwt", "bound_audiences": []string{testenv.Audience}, "user_claim": "sub",
			"token_policies": []string{"pgwarden-ops-report"}})
		w("database/config/app", map[string]any{"allowed_roles": []string{"app-reader", "app-writer", "app-admin", "ops-extra"}})
	}
	stillThere := func(t *testing.T) {
		t.Helper()
		for _, p := range []string{"database/config/ops", "database/roles/ops-report", "auth/jwt/role/ops-report"} {
			if readData(t, vc, p) == nil {
				t.Errorf("prune removed the operator's %s", p)
			}
		}
		for _, p := range []string{"pgwarden-ops-report", "pgwarden-other"} {
			if text, _ := vc.Sys().GetPolicy(p); text == "" {
				t.Errorf("prune removed the operator's policy %s", p)
			}
		}
		if got := toStrings(readData(t, vc, "database/config/app")["allowed_roles"]); !slices.Contains(got, "ops-extra") {
			t.Errorf("app's allowed_roles lost the operator's ops-extra: %v", got)
		}
		mounts, _ := vc.Sys().ListMounts()
		auths, _ := vc.Sys().ListAuth()
		if mounts["database/"] == nil || auths["jwt/"] == nil {
			t.Error("a mount or auth method was removed")
		}
	}

	t.Run("a level removed and pruned is gone from Vault, and only it", func(t *testing.T) {
		foreign(t)
		wantPlan(t, planOf(t, ctx, vc, spec)) // the operator's entries change nothing
		bob := login(t, st, vc, "app-writer", "bob", "engineer")
		writerUser, _ := creds(t, st, bob, "app-writer")

		less := without(spec, "app-writer")
		// Without prune the level stays, but its connection no longer allows it.
		cs := planOf(t, ctx, vc, less)
		wantPlan(t, cs, "update database/config/app")
		if !strings.Contains(cs[0].Detail, "allowed_roles") {
			t.Errorf("detail %q", cs[0].Detail)
		}
		less.Prune = true
		wantPlan(t, planOf(t, ctx, vc, less), "update database/config/app",
			"delete auth/jwt/role/app-writer", "delete database/roles/app-writer", "delete sys/policies/acl/pgwarden-app-writer")
		if err := vaultinit.Apply(ctx, vc, less, slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{"database/roles/app-writer", "auth/jwt/role/app-writer"} {
			if readData(t, vc, p) != nil {
				t.Errorf("%s is still there", p)
			}
		}
		if text, _ := vc.Sys().GetPolicy("pgwarden-app-writer"); text != "" {
			t.Error("pgwarden-app-writer is still there")
		}
		if pgRoleExists(t, st, writerUser) {
			t.Errorf("the pruned level's database user %s outlived it", writerUser)
		}
		for _, r := range []string{"app-reader", "app-admin", "app-report"} {
			if readData(t, vc, "database/roles/"+r) == nil || readData(t, vc, "auth/jwt/role/"+r) == nil {
				t.Errorf("level %s was pruned too", r)
			}
		}
		creds(t, st, login(t, st, vc, "app-reader", "alice", "analyst"), "app-reader")
		stillThere(t)
		wantPlan(t, planOf(t, ctx, vc, less))
	})

	t.Run("the last role-scoped level moved prunes its connection and pgwarden's policy", func(t *testing.T) {
		moved := withScope(without(spec, "app-writer"), "app-report", vaultinit.ScopeIdentity)
		moved.Prune = true
		// The level's policy gains the read grant of an identity-scoped level.
		wantPlan(t, planOf(t, ctx, vc, moved), "update database/config/app", "update sys/policies/acl/pgwarden-app-report", "update database/roles/app-report",
			"delete database/config/app-role", "delete sys/policies/acl/"+vaultinit.ServerPolicyName)
		if err := vaultinit.Apply(ctx, vc, moved, nil); err != nil {
			t.Fatal(err)
		}
		if readData(t, vc, "database/config/app-role") != nil {
			t.Error("app-role is still there")
		}
		if text, _ := vc.Sys().GetPolicy(vaultinit.ServerPolicyName); text != "" {
			t.Error("pgwarden-server is still there")
		}
		user, _ := creds(t, st, login(t, st, vc, "app-report", "carol", "analyst"), "app-report")
		if !strings.HasPrefix(user, "v-jwt-carol-app-report-") {
			t.Errorf("report's user after the move: %q", user)
		}
		stillThere(t)
		wantPlan(t, planOf(t, ctx, vc, moved))
	})

	t.Run("a policy of the spec's name that is not pgwarden's is refused", func(t *testing.T) {
		ops := cloneSpec(spec)
		ops.Databases[0].Levels = append(ops.Databases[0].Levels, vaultinit.Level{Name: "ops", VaultRole: "ops-report", CreationStatements: reader.CreationStatements})
		_, err := vaultinit.Plan(ctx, vc, ops)
		if err == nil || !strings.Contains(err.Error(), "pgwarden-ops-report") {
			t.Fatalf("Plan: %v", err)
		}
	})
}

func toStrings(v any) []string {
	var out []string
	for _, e := range v.([]any) {
		out = append(out, e.(string))
	}
	return out
}

// static turns the first level of s into a valid static level and returns it.
func static(s *vaultinit.Spec) *vaultinit.Level {
	l := &s.Databases[0].Levels[0]
	l.Static, l.StaticUsername, l.RotationPeriod, l.Scope = true, "app_report", time.Hour, vaultinit.ScopeRole
	l.CreationStatements, l.RevocationStatements, l.DefaultTTL, l.MaxTTL = nil, nil, 0, 0
	return l
}

// Refusals need no Vault: the spec is checked before anything is read.
func TestPlanRefusesSpecsVaultCannotHold(t *testing.T) {
	t.Parallel()
	base := func() vaultinit.Spec {
		return vaultinit.Spec{
			JWT: vaultinit.JWT{OIDCDiscoveryURL: "https://idp.example", Audiences: []string{"pgwarden"}},
			Databases: []vaultinit.Database{{Name: "app", ConnectionURL: "postgresql://{{username}}:{{password}}@db/app", Username: "vault_admin",
				Levels: []vaultinit.Level{{Name: "reader", VaultRole: "app-reader", CreationStatements: []string{"CREATE ROLE x"}}}}},
		}
	}
	cases := map[string]struct {
		change func(*vaultinit.Spec)
		want   string
	}{
		"a level whose policy would be pgwarden's own": {func(s *vaultinit.Spec) { s.Databases[0].Levels[0].VaultRole = "Server" }, "reserved"},
		"a database named like another's role connection": {func(s *vaultinit.Spec) {
			d := s.Databases[0]
			d.Name, d.Levels = "app-role", nil
			s.Databases = append(s.Databases, d)
		}, "share the Vault connection"},
		"an unknown scope":             {func(s *vaultinit.Spec) { s.Databases[0].Levels[0].Scope = "user" }, "scope"},
		"a Vault role with a glob":     {func(s *vaultinit.Spec) { s.Databases[0].Levels[0].VaultRole = "app-*" }, "app-*"},
		"a database name with a slash": {func(s *vaultinit.Spec) { s.Databases[0].Name = "a/b" }, "a/b"},
		"two levels share a Vault role": {func(s *vaultinit.Spec) {
			s.Databases[0].Levels = append(s.Databases[0].Levels, vaultinit.Level{Name: "r2", VaultRole: "APP-reader", CreationStatements: []string{"x"}})
		}, "also"},
		"no audience for the JWT binding": {func(s *vaultinit.Spec) { s.JWT.Audiences = nil }, "audience"},

		"a static level without a user": {func(s *vaultinit.Spec) { static(s).StaticUsername = "" }, `static level "reader": needs a database user`},
		"a static level rotating faster than Vault can": {func(s *vaultinit.Spec) { static(s).RotationPeriod = 4 * time.Second },
			`static level "reader": rotation period 4s is under Vault's minimum`},
		"a static level in identity scope": {func(s *vaultinit.Spec) { static(s).Scope = "" }, `static level "reader": scope is identity`},
		"a static level with creation statements": {func(s *vaultinit.Spec) { static(s).CreationStatements = []string{"CREATE ROLE x"} },
			`static level "reader": has creation or revocation statements`},
		"a static level with revocation statements": {func(s *vaultinit.Spec) { static(s).RevocationStatements = []string{"DROP ROLE x"} },
			`static level "reader": has creation or revocation statements`},
		"a static level with a TTL": {func(s *vaultinit.Spec) { static(s).MaxTTL = time.Hour }, `static level "reader": has TTLs`},
		"a static level over the connection's admin": {func(s *vaultinit.Spec) { static(s).StaticUsername = "vault_admin" },
			`static level "reader": user "vault_admin" is the connection's admin`},
		"a static user that would break out of its quotes": {func(s *vaultinit.Spec) { static(s).StaticUsername = `app"; DROP ROLE x; --` },
			"double quote"},
		"a static user longer than PostgreSQL's names": {func(s *vaultinit.Spec) { static(s).StaticUsername = strings.Repeat("u", 64) }, "63-byte"},
		"two static levels over one user": {func(s *vaultinit.Spec) {
			l := *static(s)
			l.Name, l.VaultRole = "report", "app-report"
			s.Databases[0].Levels = append(s.Databases[0].Levels, l)
		}, `static level "report": user "app_report" is also static level "reader"'s`},
		"a static and a dynamic level share a Vault role": {func(s *vaultinit.Spec) {
			l := *static(s)
			l.Name, l.VaultRole = "report", "APP-reader"
			s.Databases[0].Levels = []vaultinit.Level{base().Databases[0].Levels[0], l}
		}, "also"},
	}
	if _, err := vaultinit.ServerPolicy(base()); err != nil {
		t.Fatalf("the base of every case must be valid: %v", err)
	}
	valid := base()
	static(&valid)
	if _, err := vaultinit.ServerPolicy(valid); err != nil {
		t.Fatalf("the base made static must be valid: %v", err)
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			s := base()
			tc.change(&s)
			_, err := vaultinit.Plan(context.Background(), nil, s)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Plan: %v, want an error about %q", err, tc.want)
			}
		})
	}
}

// pgwarden's own policy reads the role-scoped levels' creds (a dynamic
// level's) or static creds (a static level's), manages leases and its own
// token, and nothing of the identity-scoped ones.
func TestServerPolicyCoversRoleScopedLevelsOnly(t *testing.T) {
	t.Parallel()
	spec := vaultinit.Spec{
		DatabaseMount: "/db/",
		JWT:           vaultinit.JWT{JWKSURL: "https://idp.example/jwks", Audiences: []string{"pgwarden"}},
		Databases: []vaultinit.Database{{Name: "app", ConnectionURL: "postgresql://db/app", Username: "vault_admin",
			Levels: []vaultinit.Level{
				{Name: "reader", VaultRole: "app-reader", CreationStatements: []string{"x"}},
				{Name: "report", VaultRole: "app-report", CreationStatements: []string{"x"}, Scope: vaultinit.ScopeRole},
				{Name: "nightly", VaultRole: "app-nightly", Scope: vaultinit.ScopeRole, Static: true, StaticUsername: "app_nightly", RotationPeriod: time.Hour},
			}}},
	}
	text, err := vaultinit.ServerPolicy(spec)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(text, vaultinit.PolicyMarker) {
		t.Errorf("no marker:\n%s", text)
	}
	for _, want := range []string{`"db/creds/app-report"`, `"db/static-creds/app-nightly"`, `"sys/leases/renew"`, `"sys/leases/revoke"`,
		`"auth/token/renew-self"`, `"auth/token/revoke-self"`, `"auth/token/lookup-self"`} {
		if !strings.Contains(text, "path "+want) {
			t.Errorf("lacks %s:\n%s", want, text)
		}
	}
	for _, not := range []string{"app-reader", `"db/static-creds/app-report"`, `"db/creds/app-nightly"`} {
		if strings.Contains(text, not) {
			t.Errorf("grants %s, which no role-scoped level reads:\n%s", not, text)
		}
	}
	if spec.Databases[0].Levels[0].Scope != "" || spec.DatabaseMount != "/db/" {
		t.Error("ServerPolicy changed the caller's spec")
	}
}

func TestActionPast(t *testing.T) {
	t.Parallel()
	for a, want := range map[vaultinit.Action]string{vaultinit.ActionCreate: "created", vaultinit.ActionUpdate: "updated", vaultinit.ActionDelete: "deleted"} {
		if got := a.Past(); got != want {
			t.Errorf("%s: %s", a, got)
		}
	}
}
