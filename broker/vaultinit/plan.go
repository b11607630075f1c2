package vaultinit

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"sort"
	"strings"
	"time"

	vault "github.com/hashicorp/vault/api"
)

// Action is what a Change does to its object.
type Action string

// The actions of a Change.
const (
	ActionCreate Action = "create"
	ActionUpdate Action = "update"
	ActionDelete Action = "delete"
)

// Past is the action in the past tense: created, updated or deleted.
func (a Action) Past() string {
	if strings.HasSuffix(string(a), "e") {
		return string(a) + "d"
	}
	return string(a) + "ed"
}

// Kind is the kind of Vault object a Change is about.
type Kind string

// The kinds of object Plan manages.
const (
	KindSecretsEngine Kind = "secrets engine"
	KindAuthMethod    Kind = "auth method"
	KindJWTConfig     Kind = "JWT auth config"
	KindConnection    Kind = "database connection"
	KindDatabaseRole  Kind = "database role"
	KindStaticRole    Kind = "static database role"
	KindPolicy        Kind = "policy"
	KindJWTRole       Kind = "JWT auth role"
)

// Change is one object Plan found different from the Spec.
type Change struct {
	Action Action
	Kind   Kind
	// Path is the object's Vault API path, such as database/roles/app-reader
	// or sys/policies/acl/pgwarden-app-reader.
	Path string
	// Detail says on one line what the object is for or which of its fields
	// differ. It never holds a password, a connection URL, a statement or a
	// username template, only names and values such as TTLs, groups and
	// roles.
	Detail string

	// do makes the change. It holds the admin password of a connection
	// write, out of reach of fmt's verbs.
	do func(ctx context.Context, c *vault.Client) error
}

// String is the change on one line, such as
// "update database role database/roles/app-reader: default_ttl 1h0m0s → 2h0m0s".
func (c Change) String() string {
	s := string(c.Action) + " " + string(c.Kind) + " " + c.Path
	if c.Detail != "" {
		s += ": " + c.Detail
	}
	return s
}

// Changes is a plan: the changes in the order Apply makes them (mounts, the
// JWT config, connections, then per level its policy, the role of the other
// kind it replaces, its database or static role and its JWT auth role,
// pgwarden's own policy, and last the removals).
type Changes []Change

// Apply makes the changes, which must come from Plan, in order with client,
// calling done (when not nil) after each one is made. It stops at the first failure and returns it, with
// the change named; the changes before it stay made, and planning again
// picks up from there. The plan describes Vault as Plan read it: apply it
// soon after.
func (cs Changes) Apply(ctx context.Context, client *vault.Client, done func(Change)) error {
	for _, c := range cs {
		if c.do == nil {
			return fmt.Errorf("vaultinit: %s %s %s: not a change of Plan's", c.Action, c.Kind, c.Path)
		}
		if err := c.do(ctx, client); err != nil {
			return fmt.Errorf("vaultinit: %s %s %s: %w", c.Action, c.Kind, c.Path, err)
		}
		if done != nil {
			done(c)
		}
	}
	return nil
}

// Plan reads Vault's state with client (mounts, auth methods, the JWT
// config, database connections, database and static roles, policies, JWT
// auth roles) and returns the changes that bring it to spec, none when it
// matches. It writes nothing. client's token must be allowed to read and list
// what Apply writes.
func Plan(ctx context.Context, client *vault.Client, spec Spec) (Changes, error) {
	if err := spec.checkAndSetDefaults(); err != nil {
		return nil, err
	}
	p := &planner{ctx: ctx, lg: client.Logical(), sys: client.Sys(), spec: spec,
		inSpec: map[string]bool{}, wantConn: map[string]bool{}}
	for _, d := range spec.Databases {
		for _, l := range d.Levels {
			p.inSpec[strings.ToLower(l.VaultRole)] = true
		}
	}
	steps := []func() error{p.readState, p.planMounts, p.planJWTConfig, p.planConnections, p.planLevels, p.planServerPolicy}
	if spec.Prune {
		steps = append(steps, p.planPrune)
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return nil, err
		}
	}
	return p.out, nil
}

type planner struct {
	ctx  context.Context
	lg   *vault.Logical
	sys  *vault.Sys
	spec Spec
	out  Changes

	inSpec   map[string]bool // lower-cased Vault roles of the spec
	wantConn map[string]bool // connections the spec uses

	// Vault's state, read by readState.
	dbMounted, jwtMounted bool
	policies              map[string]string // pgwarden-* policy (Vault lower-cases names) → text
	owned                 map[string]string // lower-cased Vault role → role, for pgwarden's roles (package doc)
	conns                 map[string]map[string]any
}

func (p *planner) add(a Action, k Kind, path, detail string, do func(context.Context, *vault.Client) error) {
	p.out = append(p.out, Change{Action: a, Kind: k, Path: path, Detail: detail, do: do})
}

func (p *planner) read(path string) (map[string]any, error) {
	s, err := p.lg.ReadWithContext(p.ctx, path)
	if err != nil {
		return nil, fmt.Errorf("vaultinit: read %s: %w", path, err)
	}
	if s == nil || s.Data == nil {
		return nil, nil
	}
	return s.Data, nil
}

// readIf reads path when its mount exists (a mount about to be created
// holds nothing yet).
func (p *planner) readIf(mounted bool, path string) (map[string]any, error) {
	if !mounted {
		return nil, nil
	}
	return p.read(path)
}

// writeData is a change that writes data to path.
func writeData(path string, data map[string]any) func(context.Context, *vault.Client) error {
	return func(ctx context.Context, c *vault.Client) error {
		_, err := c.Logical().WriteWithContext(ctx, path, data)
		return err
	}
}

func (p *planner) list(path string) ([]string, error) {
	s, err := p.lg.ListWithContext(p.ctx, path)
	if err != nil {
		return nil, fmt.Errorf("vaultinit: list %s: %w", path, err)
	}
	if s == nil {
		return nil, nil
	}
	keys := strs(s.Data["keys"])
	sort.Strings(keys)
	return keys, nil
}

func (p *planner) readState() error {
	mounts, err := p.sys.ListMountsWithContext(p.ctx)
	if err != nil {
		return fmt.Errorf("vaultinit: list secrets engines: %w", err)
	}
	if m, ok := mounts[p.spec.DatabaseMount+"/"]; ok {
		if m.Type != "database" {
			return fmt.Errorf("vaultinit: %s/ is a %s secrets engine, not database: set vault.database_mount", p.spec.DatabaseMount, m.Type)
		}
		p.dbMounted = true
	}
	auths, err := p.sys.ListAuthWithContext(p.ctx)
	if err != nil {
		return fmt.Errorf("vaultinit: list auth methods: %w", err)
	}
	if m, ok := auths[p.spec.JWTMount+"/"]; ok {
		if m.Type != "jwt" && m.Type != "oidc" {
			return fmt.Errorf("vaultinit: auth/%s/ is a %s auth method, not jwt: set vault.jwt_mount", p.spec.JWTMount, m.Type)
		}
		p.jwtMounted = true
	}

	names, err := p.sys.ListPoliciesWithContext(p.ctx)
	if err != nil {
		return fmt.Errorf("vaultinit: list policies: %w", err)
	}
	p.policies = map[string]string{}
	for _, n := range names {
		if !strings.HasPrefix(n, PolicyName("")) {
			continue
		}
		text, err := p.sys.GetPolicyWithContext(p.ctx, n)
		if err != nil {
			return fmt.Errorf("vaultinit: read policy %s: %w", n, err)
		}
		p.policies[n] = text
	}
	p.owned = map[string]string{}
	// A level's policy names its mount and role on LevelMarker's line; one
	// written before that line existed grants the role's creds or static
	// creds on the mount instead.
	level := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(LevelMarker+" "+p.spec.DatabaseMount+" ") + `([^\s"/]+)$`)
	creds := regexp.MustCompile(`(?m)^path "` + regexp.QuoteMeta(p.spec.DatabaseMount+"/") + `(?:static-)?creds/([^"/]+)"`)
	for n, text := range p.policies {
		if n == ServerPolicyName || !strings.HasPrefix(text, PolicyMarker) {
			continue
		}
		for _, re := range []*regexp.Regexp{level, creds} {
			if m := re.FindStringSubmatch(text); m != nil && strings.EqualFold(PolicyName(m[1]), n) {
				p.owned[strings.ToLower(m[1])] = m[1]
				break
			}
		}
	}

	p.conns = map[string]map[string]any{}
	if p.dbMounted {
		names, err := p.list(p.spec.DatabaseMount + "/config")
		if err != nil {
			return err
		}
		for _, n := range names {
			c, err := p.read(p.spec.DatabaseMount + "/config/" + n)
			if err != nil {
				return err
			}
			if c != nil {
				p.conns[n] = c
			}
		}
	}
	return nil
}

func (p *planner) isOwned(role string) bool { _, ok := p.owned[strings.ToLower(role)]; return ok }

func (p *planner) planMounts() error {
	if !p.dbMounted {
		path := p.spec.DatabaseMount
		p.add(ActionCreate, KindSecretsEngine, "sys/mounts/"+path, "database, for pgwarden's dynamic credentials", func(ctx context.Context, c *vault.Client) error {
			return c.Sys().MountWithContext(ctx, path, &vault.MountInput{Type: "database", Description: "pgwarden dynamic database credentials"})
		})
	}
	if !p.jwtMounted {
		path := p.spec.JWTMount
		p.add(ActionCreate, KindAuthMethod, "sys/auth/"+path, "jwt, for pgwarden's client tokens", func(ctx context.Context, c *vault.Client) error {
			return c.Sys().EnableAuthWithOptionsWithContext(ctx, path, &vault.EnableAuthOptions{Type: "jwt", Description: "pgwarden client tokens"})
		})
	}
	return nil
}

// jwtConfigKept are the JWT config's settings pgwarden does not manage but
// keeps when it rewrites the config, which Vault replaces whole.
var jwtConfigKept = []string{"oidc_discovery_ca_pem", "jwks_ca_pem", "default_role"}

func (p *planner) planJWTConfig() error {
	j := p.spec.JWT
	path := "auth/" + p.spec.JWTMount + "/config"
	discovery := ""
	if j.JWKSURL == "" {
		discovery = strings.TrimSuffix(j.OIDCDiscoveryURL, "/")
	}
	data := map[string]any{
		"bound_issuer":       j.BoundIssuer,
		"jwt_supported_algs": j.Algorithms,
		"oidc_discovery_url": discovery,
		"jwks_url":           j.JWKSURL,
	}
	cur, err := p.readIf(p.jwtMounted, path)
	if err != nil {
		return err
	}
	for _, k := range jwtConfigKept {
		if v := str(cur[k]); v != "" {
			data[k] = v
		}
	}
	write := writeData(path, data)
	if cur == nil || (str(cur["oidc_discovery_url"]) == "" && str(cur["jwks_url"]) == "" && len(strs(cur["jwt_validation_pubkeys"])) == 0) {
		keys := "OIDC discovery " + redactURL(discovery)
		if j.JWKSURL != "" {
			keys = "JWKS " + redactURL(j.JWKSURL)
		}
		p.add(ActionCreate, KindJWTConfig, path, fmt.Sprintf("keys from %s, issuer %s", keys, redactURL(j.BoundIssuer)), write)
		return nil
	}
	var d diff
	d.text("oidc_discovery_url", discovery, cur["oidc_discovery_url"], false)
	d.text("jwks_url", j.JWKSURL, cur["jwks_url"], false)
	d.text("bound_issuer", j.BoundIssuer, cur["bound_issuer"], false)
	d.set("jwt_supported_algs", j.Algorithms, cur["jwt_supported_algs"], false)
	if len(d) > 0 {
		p.add(ActionUpdate, KindJWTConfig, path, d.String(), write)
	}
	return nil
}

func (p *planner) planConnections() error {
	for _, db := range p.spec.Databases {
		for _, scope := range []string{ScopeIdentity, ScopeRole} {
			var roles []string
			for _, l := range db.Levels {
				if scopeOf(l) == scope {
					roles = append(roles, l.VaultRole)
				}
			}
			if len(roles) > 0 {
				p.planConnection(db, scope, roles)
			}
		}
	}
	return nil
}

func (p *planner) planConnection(db Database, scope string, roles []string) {
	name := ConnectionName(db.Name, scope)
	p.wantConn[name] = true
	path := p.spec.DatabaseMount + "/config/" + name
	tmpl := IdentityUsernameTemplate
	if scope == ScopeRole {
		tmpl = RoleUsernameTemplate
	}
	cur := p.conns[name]
	// Keep the roles of allowed_roles that are not pgwarden's.
	allowed := append([]string(nil), roles...)
	var foreign []string
	for _, r := range strs(cur["allowed_roles"]) {
		if !p.inSpec[strings.ToLower(r)] && !p.isOwned(r) {
			foreign = append(foreign, r)
		}
	}
	sort.Strings(foreign)
	allowed = append(allowed, foreign...)
	// Vault templates the admin credentials into the URL itself, so the
	// password never appears in the stored connection string.
	write := func(ctx context.Context, c *vault.Client) error {
		if db.Password == "" {
			return fmt.Errorf("the admin password of database %s is empty", db.Name)
		}
		_, err := c.Logical().WriteWithContext(ctx, path, map[string]any{
			"plugin_name":             "postgresql-database-plugin",
			"connection_url":          db.ConnectionURL,
			"username":                db.Username,
			"password":                db.Password,
			"allowed_roles":           allowed,
			"verify_connection":       true,
			"password_authentication": "scram-sha-256",
			"username_template":       tmpl,
		})
		// Vault's errors quote the URL template, not the password; make sure.
		return scrub(err, db.Password)
	}
	if cur == nil {
		p.add(ActionCreate, KindConnection, path, fmt.Sprintf("database %s, %s scope, admin user %s, allowed_roles %v", db.Name, scope, db.Username, allowed), write)
		return
	}
	details, _ := cur["connection_details"].(map[string]any)
	var d diff
	d.text("plugin_name", "postgresql-database-plugin", cur["plugin_name"], true)
	d.text("connection_url", redactURL(db.ConnectionURL), details["connection_url"], false)
	d.text("username", db.Username, details["username"], true)
	d.text("password_authentication", "scram-sha-256", details["password_authentication"], true)
	d.text("username_template", tmpl, details["username_template"], false)
	d.set("allowed_roles", allowed, cur["allowed_roles"], false)
	d.flag("verify_connection", true, cur["verify_connection"])
	switch {
	case len(d) > 0:
		p.add(ActionUpdate, KindConnection, path, d.String()+"; the admin password is written too", write)
	case p.spec.WritePasswords:
		p.add(ActionUpdate, KindConnection, path, "the admin password is written (asked for)", write)
	}
}

func (p *planner) planLevels() error {
	for _, db := range p.spec.Databases {
		for _, l := range db.Levels {
			what := fmt.Sprintf("level %s of %s: read %s only", l.Name, db.Name, credsPath(p.spec.DatabaseMount, l))
			if scopeOf(l) == ScopeRole {
				what = fmt.Sprintf("level %s of %s, role scope: no secret (%s reads %s)", l.Name, db.Name, ServerPolicyName, credsPath(p.spec.DatabaseMount, l))
			}
			if err := p.planPolicy(PolicyName(l.VaultRole), levelPolicy(p.spec.DatabaseMount, l), what); err != nil {
				return err
			}
			steps := []func(Database, Level) error{p.planOtherKind, p.planDatabaseRole, p.planJWTRole}
			if l.Static {
				steps[1] = p.planStaticRole
			}
			for _, step := range steps {
				if err := step(db, l); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func (p *planner) planPolicy(name, text, what string) error {
	key := strings.ToLower(name)
	write := func(ctx context.Context, c *vault.Client) error {
		return c.Sys().PutPolicyWithContext(ctx, name, text)
	}
	path := "sys/policies/acl/" + key
	cur, ok := p.policies[key]
	switch {
	case !ok:
		p.add(ActionCreate, KindPolicy, path, what, write)
	case !strings.HasPrefix(cur, PolicyMarker):
		return fmt.Errorf("vaultinit: policy %s exists and is not pgwarden's (its text does not begin with %q): remove it, or give the level another vault_role", key, PolicyMarker)
	case cur != text:
		p.add(ActionUpdate, KindPolicy, path, "rules differ: "+what, write)
	}
	return nil
}

func (p *planner) planDatabaseRole(db Database, l Level) error {
	path := p.spec.DatabaseMount + "/roles/" + l.VaultRole
	conn := ConnectionName(db.Name, scopeOf(l))
	data := map[string]any{
		"db_name":               conn,
		"credential_type":       "password",
		"creation_statements":   l.CreationStatements,
		"revocation_statements": nonNil(l.RevocationStatements),
		"default_ttl":           seconds(l.DefaultTTL),
		"max_ttl":               seconds(l.MaxTTL),
	}
	write := writeData(path, data)
	cur, err := p.readIf(p.dbMounted, path)
	if err != nil {
		return err
	}
	if cur == nil {
		p.add(ActionCreate, KindDatabaseRole, path, fmt.Sprintf("level %s of %s, %s scope, connection %s, default_ttl %s, max_ttl %s",
			l.Name, db.Name, scopeOf(l), conn, ttl(seconds(l.DefaultTTL)), ttl(seconds(l.MaxTTL))), write)
		return nil
	}
	var d diff
	d.text("db_name", conn, cur["db_name"], true)
	d.text("credential_type", "password", cur["credential_type"], true)
	d.list("creation_statements", l.CreationStatements, cur["creation_statements"])
	d.list("revocation_statements", l.RevocationStatements, cur["revocation_statements"])
	d.secs("default_ttl", seconds(l.DefaultTTL), cur["default_ttl"])
	d.secs("max_ttl", seconds(l.MaxTTL), cur["max_ttl"])
	if len(d) > 0 {
		p.add(ActionUpdate, KindDatabaseRole, path, d.String(), write)
	}
	return nil
}

// planStaticRole plans the static role of static level l (see the package
// doc): created, updated in place, or deleted and created again when its user
// changes, which Vault refuses to do in place.
func (p *planner) planStaticRole(db Database, l Level) error {
	path := p.spec.DatabaseMount + "/static-roles/" + l.VaultRole
	conn := ConnectionName(db.Name, scopeOf(l))
	period := seconds(l.RotationPeriod)
	data := map[string]any{
		"db_name":             conn,
		"username":            l.StaticUsername,
		"rotation_period":     period,
		"credential_type":     "password",
		"rotation_statements": []string{},
	}
	write := writeData(path, data)
	cur, err := p.readIf(p.dbMounted, path)
	if err != nil {
		return err
	}
	create := func() {
		p.add(ActionCreate, KindStaticRole, path, fmt.Sprintf("level %s of %s, connection %s, user %s, rotation_period %s; Vault sets the user's password now and keeps it",
			l.Name, db.Name, conn, l.StaticUsername, ttl(period)), write)
	}
	if cur == nil {
		create()
		return nil
	}
	if old := str(cur["username"]); old != l.StaticUsername {
		p.add(ActionDelete, KindStaticRole, path, fmt.Sprintf("its user %s becomes %s, which Vault cannot change in place: deleted and created again; Vault does not drop %s",
			old, l.StaticUsername, old), deleter(path))
		create()
		return nil
	}
	var d diff
	d.text("db_name", conn, cur["db_name"], true)
	d.text("credential_type", "password", cur["credential_type"], true)
	d.list("rotation_statements", nil, cur["rotation_statements"])
	if sched := str(cur["rotation_schedule"]); sched != "" {
		d = append(d, fmt.Sprintf("rotation_schedule %q → rotation_period %s", sched, ttl(period)))
	} else {
		d.secs("rotation_period", period, cur["rotation_period"])
	}
	if len(d) > 0 {
		p.add(ActionUpdate, KindStaticRole, path, d.String(), write)
	}
	return nil
}

// planOtherKind deletes l's Vault role of the other kind, the static role of
// a dynamic level or the database role of a static one: the level changed
// kind, and Vault refuses a database role and a static role of one name. It
// comes before the role of l's kind is written. A database role's leases are
// revoked first. A role of the other kind that pgwarden does not own is
// refused.
func (p *planner) planOtherKind(db Database, l Level) error {
	if !p.dbMounted {
		return nil
	}
	other, kind := "/static-roles/", KindStaticRole
	if l.Static {
		other, kind = "/roles/", KindDatabaseRole
	}
	path := p.spec.DatabaseMount + other + l.VaultRole
	cur, err := p.read(path)
	if err != nil || cur == nil {
		return err
	}
	if !p.isOwned(l.VaultRole) {
		return fmt.Errorf("vaultinit: %s exists and is not pgwarden's (no policy %s marks it), and Vault refuses a database role and a static role of one name: remove it, or give level %s of %s another vault_role",
			path, strings.ToLower(PolicyName(l.VaultRole)), l.Name, db.Name)
	}
	if l.Static {
		p.add(ActionDelete, kind, path, fmt.Sprintf("level %s of %s is static now; its leases are revoked first", l.Name, db.Name),
			p.revokeAndDelete(l.VaultRole))
		return nil
	}
	p.add(ActionDelete, kind, path, fmt.Sprintf("level %s of %s is dynamic now; Vault does not drop its user %s", l.Name, db.Name, str(cur["username"])),
		deleter(path))
	return nil
}

func (p *planner) planJWTRole(db Database, l Level) error {
	path := "auth/" + p.spec.JWTMount + "/role/" + l.VaultRole
	j := p.spec.JWT
	// The Vault token lives as long as a credential may, so its leases are
	// not cut short by it.
	tokenTTL := l.MaxTTL
	if tokenTTL == 0 {
		tokenTTL = l.DefaultTTL
	}
	groups := nonNil(l.Groups)
	// Vault lower-cases the policy names it stores.
	policy := strings.ToLower(PolicyName(l.VaultRole))
	data := map[string]any{
		"role_type":         "jwt",
		"bound_audiences":   j.Audiences,
		"user_claim":        j.UserClaim,
		"groups_claim":      j.GroupsClaim,
		"bound_claims_type": "string",
		"bound_claims":      map[string]any{j.GroupsClaim: groups},
		"token_policies":    []string{policy},
		"token_ttl":         seconds(tokenTTL),
		"token_max_ttl":     seconds(tokenTTL),
	}
	write := writeData(path, data)
	cur, err := p.readIf(p.jwtMounted, path)
	if err != nil {
		return err
	}
	if cur == nil {
		p.add(ActionCreate, KindJWTRole, path, fmt.Sprintf("level %s of %s: %s in %v, policy %s, token_ttl %s",
			l.Name, db.Name, j.GroupsClaim, groups, policy, ttl(seconds(tokenTTL))), write)
		return nil
	}
	var d diff
	d.text("role_type", "jwt", cur["role_type"], true)
	d.set("bound_audiences", j.Audiences, cur["bound_audiences"], false)
	d.text("user_claim", j.UserClaim, cur["user_claim"], true)
	d.text("groups_claim", j.GroupsClaim, cur["groups_claim"], true)
	d.text("bound_claims_type", "string", cur["bound_claims_type"], true)
	d.claims("bound_claims", j.GroupsClaim, groups, cur["bound_claims"])
	d.set("token_policies", []string{policy}, cur["token_policies"], true)
	d.secs("token_ttl", seconds(tokenTTL), cur["token_ttl"])
	d.secs("token_max_ttl", seconds(tokenTTL), cur["token_max_ttl"])
	if len(d) > 0 {
		p.add(ActionUpdate, KindJWTRole, path, d.String(), write)
	}
	return nil
}

func (p *planner) planServerPolicy() error {
	if levels := roleScoped(p.spec); len(levels) > 0 {
		var roles []string
		for _, l := range levels {
			roles = append(roles, l.VaultRole)
		}
		return p.planPolicy(ServerPolicyName, serverPolicy(p.spec),
			fmt.Sprintf("pgwarden's own identity: read the creds of %s, renew and revoke leases, its own token", strings.Join(roles, ", ")))
	}
	return nil
}

// planPrune removes what pgwarden owns and the spec no longer names: JWT auth
// roles first (no new logins), then database roles (their leases revoked) and
// static roles, then the policies that mark them, then connections.
func (p *planner) planPrune() error {
	var gone []string // owned roles the spec no longer names, sorted
	for lower, role := range p.owned {
		if !p.inSpec[lower] {
			gone = append(gone, role)
		}
	}
	sort.Strings(gone)
	if p.jwtMounted {
		names, err := p.list("auth/" + p.spec.JWTMount + "/role")
		if err != nil {
			return err
		}
		for _, n := range names {
			if p.inSpec[strings.ToLower(n)] || !p.isOwned(n) {
				continue
			}
			path := "auth/" + p.spec.JWTMount + "/role/" + n
			cur, err := p.read(path)
			if err != nil {
				return err
			}
			if cur == nil || !containsFold(strs(cur["token_policies"]), PolicyName(n)) {
				continue
			}
			p.add(ActionDelete, KindJWTRole, path, "no level of the spec has this Vault role", deleter(path))
		}
	}
	if p.dbMounted {
		names, err := p.list(p.spec.DatabaseMount + "/roles")
		if err != nil {
			return err
		}
		for _, n := range names {
			if p.inSpec[strings.ToLower(n)] || !p.isOwned(n) {
				continue
			}
			p.add(ActionDelete, KindDatabaseRole, p.spec.DatabaseMount+"/roles/"+n, "no level of the spec has this Vault role; its leases are revoked first",
				p.revokeAndDelete(n))
		}
		if names, err = p.list(p.spec.DatabaseMount + "/static-roles"); err != nil {
			return err
		}
		for _, n := range names {
			if p.inSpec[strings.ToLower(n)] || !p.isOwned(n) {
				continue
			}
			path := p.spec.DatabaseMount + "/static-roles/" + n
			cur, err := p.read(path)
			if err != nil {
				return err
			}
			if cur == nil {
				continue
			}
			p.add(ActionDelete, KindStaticRole, path, fmt.Sprintf("no level of the spec has this Vault role; Vault does not drop its user %s", str(cur["username"])),
				deleter(path))
		}
	}
	for _, role := range gone {
		name := strings.ToLower(PolicyName(role))
		p.add(ActionDelete, KindPolicy, "sys/policies/acl/"+name, "no level of the spec has the Vault role "+role, func(ctx context.Context, c *vault.Client) error {
			return c.Sys().DeletePolicyWithContext(ctx, name)
		})
	}
	conns := make([]string, 0, len(p.conns))
	for n := range p.conns {
		conns = append(conns, n)
	}
	sort.Strings(conns)
	for _, n := range conns {
		allowed := strs(p.conns[n]["allowed_roles"])
		if p.wantConn[n] || len(allowed) == 0 {
			continue
		}
		ours := true
		for _, r := range allowed {
			ours = ours && p.isOwned(r)
		}
		if ours {
			path := p.spec.DatabaseMount + "/config/" + n
			p.add(ActionDelete, KindConnection, path, fmt.Sprintf("no level of the spec uses it (allowed_roles %v)", allowed), deleter(path))
		}
	}
	if cur, ok := p.policies[ServerPolicyName]; ok && strings.HasPrefix(cur, PolicyMarker) && len(roleScoped(p.spec)) == 0 {
		p.add(ActionDelete, KindPolicy, "sys/policies/acl/"+ServerPolicyName, "no level is in role scope", func(ctx context.Context, c *vault.Client) error {
			return c.Sys().DeletePolicyWithContext(ctx, ServerPolicyName)
		})
	}
	return nil
}

// roleScoped lists the levels in role scope.
func roleScoped(spec Spec) []Level {
	var levels []Level
	for _, db := range spec.Databases {
		for _, l := range db.Levels {
			if scopeOf(l) == ScopeRole {
				levels = append(levels, l)
			}
		}
	}
	return levels
}

// revokeAndDelete revokes the leases of database role role, which drops the
// users they name, then deletes the role.
func (p *planner) revokeAndDelete(role string) func(context.Context, *vault.Client) error {
	path := p.spec.DatabaseMount + "/roles/" + role
	prefix := p.spec.DatabaseMount + "/creds/" + role
	return func(ctx context.Context, c *vault.Client) error {
		if err := c.Sys().RevokePrefixWithContext(ctx, prefix); err != nil {
			return fmt.Errorf("revoke the leases of %s: %w", prefix, err)
		}
		return deleter(path)(ctx, c)
	}
}

func deleter(path string) func(context.Context, *vault.Client) error {
	return func(ctx context.Context, c *vault.Client) error {
		_, err := c.Logical().DeleteWithContext(ctx, path)
		return err
	}
}

// scrub removes secret from err's text; the result does not wrap err, whose
// chain may still hold it.
func scrub(err error, secret string) error {
	if err == nil || secret == "" || !strings.Contains(err.Error(), secret) {
		return err
	}
	return errors.New(strings.ReplaceAll(err.Error(), secret, "[redacted]"))
}

// redactURL is what Vault returns for a stored connection URL (url.Redacted
// when it parses; Vault's templates usually do not) and what a plan line may
// show of a URL.
func redactURL(s string) string {
	if u, err := url.Parse(s); err == nil {
		return u.Redacted()
	}
	return s
}

func seconds(d time.Duration) int64 { return int64(d / time.Second) }

func ttl(secs int64) string {
	if secs == 0 {
		return "Vault's default"
	}
	return (time.Duration(secs) * time.Second).String()
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func containsFold(list []string, s string) bool {
	for _, e := range list {
		if strings.EqualFold(e, s) {
			return true
		}
	}
	return false
}
