// Package vaultinit configures Vault for pgwarden from a declarative Spec: the
// database secrets engine (connections per database, one role per access
// level), the JWT auth method (the issuer's keys, one auth role per access
// level bound to its groups), one policy per level, and, when some level is
// in "role" scope, the policy of pgwarden's own Vault identity
// (ServerPolicyName).
//
// # Policies
//
// A level's policy, PolicyName(role), is what a client's JWT login under the
// level's auth role gets. In "identity" scope it reads that level's
// credentials and nothing else: the person's own login reads the person's
// lease. In "role" scope it grants no path at all: pgwarden reads the shared
// credential with its own identity (ServerPolicyName's policy reads the
// creds, or static creds, of the role-scoped levels only), and the client's
// login only has to succeed to show that Vault lets the person have the
// level; so a member of the level's groups who logs in to Vault directly
// with their token reads no shared credential, a static level's long-lived
// password least of all. The token of such a login still looks itself up,
// renews and revokes itself through Vault's default policy, which every JWT
// login gets (pgwarden revokes its client logins with revoke-self); an
// operator who narrows the default policy must keep those three paths.
//
// # Plan, then apply
//
// Plan reads Vault's current state and returns the Changes that bring it to
// the Spec, each one object created, updated or deleted, with a line that
// says what and why and holds nothing secret. Changes.Apply makes them.
// Fields are compared after normalization (Vault returns TTLs as seconds,
// lists in its own order, bound_claims as lists of any), so applying the same
// Spec twice makes no change the second time. Apply does both, as
// `pgwarden vault-init` and testenv do.
//
// # Connections and database user names
//
// Vault's username_template belongs to a connection, not to a role, so each
// scope has its own connection to the same database: <name> for the levels in
// "identity" scope (IdentityUsernameTemplate: the user is named after the
// person whose Vault login read it, e.g. v-jwt-alice-app-reader-Xa3d9kQe) and
// <name>-role for those in "role" scope (RoleUsernameTemplate: named after
// pgwarden and the Vault role, never a person). A connection exists only while
// a level uses its scope, and each database role's db_name names the
// connection of its level's scope. Entries of a connection's allowed_roles that
// pgwarden does not own are kept.
//
// The admin password is write-only in Vault: it cannot be read back and so
// cannot be compared. It is sent when a connection is created, when any field
// Plan compares differs, and, when Spec.WritePasswords is set, always (after
// the password was changed in PostgreSQL). A connection whose stored fields
// match is otherwise left alone.
//
// # Static levels
//
// A level with Static set is a Vault static role, <mount>/static-roles/<role>,
// instead of a database role: one database user (StaticUsername) that exists
// already and whose password Vault rotates every RotationPeriod, read from
// <mount>/static-creds/<role>. It must be in "role" scope, so it sits on
// the <name>-role connection. The user must exist before Apply creates the
// static role: Vault logs in as the connection's admin and sets a new
// password for the user at once (ALTER ROLE … PASSWORD), and from then on
// Vault alone knows it. Its policy grants nothing, as any role-scoped level's,
// and ServerPolicyName's policy grants its static creds only; its JWT auth
// role is written as for any level, because a client must still be let in by
// Vault.
// Vault cannot change a static role's user in place: a level whose
// StaticUsername changes is deleted and created again. Vault refuses a
// database role and a static role of one name, so a level that turns from
// dynamic to static, or back, has the role of the other kind deleted first
// (a database role's leases revoked, a static role's user left in place),
// whether or not Spec.Prune is set; Plan refuses one pgwarden does not own.
// Vault deleting a static role never drops or changes its database user.
//
// # Ownership and pruning
//
// With Spec.Prune, objects pgwarden created that the Spec no longer names are
// removed. pgwarden owns a Vault role name R when the policy PolicyName(R)
// exists, its text begins with PolicyMarker, and it has the line
// "<LevelMarker> <mount> R" with this Spec's database mount, or, as policies
// written before that line existed do, grants R's credentials or static
// credentials under that mount (such a policy is rewritten in the new form:
// for a role-scoped level the update removes its grant). Plan writes that
// policy before the roles it marks and Apply deletes it after them, so an
// interrupted run never leaves an unmarked object behind. Then:
//   - a database role R is pgwarden's when R is owned; its leases are revoked
//     (sys/leases/revoke-prefix, which needs sudo) before it is deleted, so the
//     PostgreSQL users it created are dropped;
//   - a static role R is pgwarden's when R is owned; Vault deletes it and
//     leaves its database user in place, with the last password Vault set,
//     which nobody knows any more (change it in PostgreSQL to use the user
//     again);
//   - a JWT auth role R is pgwarden's when R is owned and the auth role's
//     token_policies include PolicyName(R);
//   - a connection is pgwarden's when its allowed_roles is not empty and every
//     entry is owned;
//   - ServerPolicyName's policy is pgwarden's when it begins with PolicyMarker.
//
// Mounts and auth methods are never removed. Ownership is per database mount:
// prune assumes one pgwarden configuration writes to a database mount.
//
// The admin password in a Spec is sent to Vault and never logged, printed or
// returned in an error.
package vaultinit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/pgwarden/pgwarden/broker"
)

// Spec is what Plan compares Vault with and Apply writes.
type Spec struct {
	// DatabaseMount is the database secrets engine path. Default "database".
	DatabaseMount string
	// JWTMount is the JWT auth method path. Default "jwt".
	JWTMount string
	// JWT configures the JWT auth method.
	JWT JWT
	// Databases to configure.
	Databases []Database
	// Prune removes the database roles, static roles, policies, JWT auth
	// roles and connections pgwarden owns (see the package doc) that the
	// Spec no longer names, and ServerPolicyName's policy when no level is in
	// "role" scope. Default false: nothing is removed, except a role of the
	// other kind when a level turns from dynamic to static or back.
	Prune bool
	// WritePasswords sends every connection's admin password even when the
	// connection's stored fields match. Default false: the password is sent
	// only with a connection that is created or changed.
	WritePasswords bool
}

// JWT is the JWT auth method's configuration.
type JWT struct {
	// OIDCDiscoveryURL or JWKSURL: where Vault finds the issuer's keys (one is required).
	OIDCDiscoveryURL string
	JWKSURL          string
	// BoundIssuer is the required iss.
	BoundIssuer string
	// Audiences are the accepted aud values (bound_audiences).
	Audiences []string
	// GroupsClaim is the claim (JSON pointer-ish path as Vault takes it, e.g.
	// "groups" or "/realm_access/roles") bound to each level's groups. Default "groups".
	GroupsClaim string
	// UserClaim names the Vault entity alias, and so the database user of a
	// level in "identity" scope. Default "sub".
	UserClaim string
	// Algorithms Vault accepts. Default RS256, ES256 and their larger siblings.
	Algorithms []string
}

// Database is one upstream database Vault issues credentials for.
type Database struct {
	// Name is the Vault connection name of the levels in "identity" scope
	// (database/config/<Name>); those in "role" scope use <Name>-role.
	Name string
	// ConnectionURL in Vault's template form, e.g.
	// "postgresql://{{username}}:{{password}}@127.0.0.1:5432/app?sslmode=disable".
	ConnectionURL string
	// Username and Password of the admin role Vault uses. Password is secret;
	// it may be empty for Plan, but a connection write refuses it empty.
	Username string
	Password string
	// Levels are the access levels.
	Levels []Level
}

// Level is one access level: a Vault database role (or, when Static, a static
// role), a policy and a JWT auth role, all named VaultRole.
type Level struct {
	Name                 string
	VaultRole            string
	Groups               []string
	CreationStatements   []string
	RevocationStatements []string
	// DefaultTTL and MaxTTL bound the role's leases, in whole seconds; 0
	// leaves Vault's defaults.
	DefaultTTL time.Duration
	MaxTTL     time.Duration
	// Scope is "identity" (default) or "role": who shares the credential,
	// and so which connection the role uses and what its database user is
	// named after.
	Scope string
	// Static, when set, makes the level a Vault static role over an existing
	// database user (StaticUsername) whose password Vault rotates every
	// RotationPeriod (whole seconds, at least MinRotationPeriod); the level
	// must be in "role" scope, and CreationStatements, RevocationStatements
	// and TTLs do not apply (see the package doc).
	Static         bool
	StaticUsername string
	RotationPeriod time.Duration
}

// MinRotationPeriod is the shortest rotation period of a static level: the
// tick of Vault's rotation queue, below which Vault refuses rotation_period.
const MinRotationPeriod = 5 * time.Second

// Scopes of a level, as in internal/config.
const (
	ScopeIdentity = "identity"
	ScopeRole     = "role"
)

// Username templates of the two connections of a database. Vault's truncate
// counts bytes, so neither can exceed PostgreSQL's 63-byte identifiers
// (NAMEDATALEN-1, https://www.postgresql.org/docs/current/sql-syntax-lexical.html#SQL-SYNTAX-IDENTIFIERS):
// 2+36+1+14+1+8 = 62 and 9+30+1+8+1+10 = 59 bytes, and each ends in a final
// truncate 63 besides. A person's display name ("jwt-" and the user claim for
// a JWT login) loses its quotes, so it cannot break out of the quoted
// "{{name}}" of a statement; a multibyte character cut at byte 36 would make
// an invalid name that PostgreSQL refuses.
const (
	IdentityUsernameTemplate = `{{ printf "v-%s-%s-%s" (.DisplayName | replace "\"" "" | replace "'" "" | truncate 36) (.RoleName | truncate 14) (random 8) | truncate 63 }}`
	RoleUsernameTemplate     = `{{ printf "pgwarden-%s-%s-%s" (.RoleName | truncate 30) (random 8) (unix_time) | truncate 63 }}`
)

// ConnectionName is the Vault connection of database's levels in scope.
func ConnectionName(database, scope string) string {
	if scope == ScopeRole {
		return database + "-role"
	}
	return database
}

// PolicyMarker begins the text of every policy vaultinit writes; a policy
// without it is not pgwarden's.
const PolicyMarker = "# Written by pgwarden vault-init"

// PolicyName is the name of the policy that may read role's credentials.
func PolicyName(role string) string { return "pgwarden-" + role }

// ServerPolicyName is the policy of pgwarden's own Vault identity (token,
// AppRole or Kubernetes auth), written when some level is in "role" scope:
// see ServerPolicy. No level may have the Vault role "server", whose
// PolicyName this is.
const ServerPolicyName = "pgwarden-server"

// ServerPolicy returns the text of ServerPolicyName's policy for spec: read
// the credentials of every level in "role" scope (<mount>/creds/<role> of a
// dynamic level, <mount>/static-creds/<role> of a static one, and nothing
// else), renew and revoke leases, and look up, renew and revoke its own
// token. It returns an error when spec is invalid.
func ServerPolicy(spec Spec) (string, error) {
	if err := spec.checkAndSetDefaults(); err != nil {
		return "", err
	}
	return serverPolicy(spec), nil
}

func serverPolicy(spec Spec) string {
	var b strings.Builder
	b.WriteString(PolicyMarker + ": pgwarden's own identity, for the levels in role scope.\n")
	rule := func(path, capability string) {
		fmt.Fprintf(&b, "path %q {\n  capabilities = [%q]\n}\n", path, capability)
	}
	for _, l := range roleScoped(spec) {
		rule(credsPath(spec.DatabaseMount, l), "read")
	}
	rule("sys/leases/renew", "update")
	rule("sys/leases/revoke", "update")
	rule("auth/token/renew-self", "update")
	rule("auth/token/revoke-self", "update")
	rule("auth/token/lookup-self", "read")
	return b.String()
}

// LevelMarker begins the second line of every level's policy, followed by
// the database mount and the level's Vault role ("# pgwarden level: database
// app-reader"): it marks the Vault role as pgwarden's on that mount (see the
// package doc), whether or not the policy grants anything.
const LevelMarker = "# pgwarden level:"

// levelPolicy is the policy of a level's JWT logins. In "identity" scope it
// reads the level's credentials only: the person's own login reads the
// person's lease. In "role" scope it grants nothing: pgwarden's own identity
// reads the shared credential, and a client's login only has to succeed, so
// a person who logs in to Vault directly with their token gets no secret
// (Vault's default policy, attached to every JWT login, covers the token's
// lookup-self, renew-self and revoke-self). Both begin with PolicyMarker and
// carry LevelMarker's line.
func levelPolicy(mount string, l Level) string {
	what := "credentials"
	if l.Static {
		what = "static credentials"
	}
	head := fmt.Sprintf("%s: %%s\n%s %s %s\n", PolicyMarker, LevelMarker, mount, l.VaultRole)
	if scopeOf(l) == ScopeRole {
		return fmt.Sprintf(head, fmt.Sprintf("level %s is in role scope: this policy grants no secret.", l.VaultRole)) +
			fmt.Sprintf("# A login under it only proves that Vault lets the person have the level;\n"+
				"# pgwarden's own identity (%s) reads %s.\n", ServerPolicyName, credsPath(mount, l))
	}
	return fmt.Sprintf(head, fmt.Sprintf("read %s %s only.", l.VaultRole, what)) +
		fmt.Sprintf("path %q {\n  capabilities = [\"read\"]\n}\n", credsPath(mount, l))
}

// credsPath is where l's credentials are read: <mount>/creds/<role>, or
// <mount>/static-creds/<role> for a static level.
func credsPath(mount string, l Level) string {
	if l.Static {
		return mount + "/static-creds/" + l.VaultRole
	}
	return mount + "/creds/" + l.VaultRole
}

func scopeOf(l Level) string {
	if l.Scope == "" {
		return ScopeIdentity
	}
	return l.Scope
}

// checkAndSetDefaults fills s's defaults and refuses what Vault could not hold
// or would misroute. It never writes through s's slices, which the caller
// shares.
func (s *Spec) checkAndSetDefaults() error {
	s.DatabaseMount = broker.MountPath(s.DatabaseMount, broker.DefaultDatabaseMount)
	s.JWTMount = broker.MountPath(s.JWTMount, broker.DefaultJWTMount)
	if s.JWT.OIDCDiscoveryURL == "" && s.JWT.JWKSURL == "" {
		return errors.New("vaultinit: JWT needs an OIDC discovery URL or a JWKS URL")
	}
	if len(s.JWT.Audiences) == 0 {
		return errors.New("vaultinit: JWT needs at least one audience")
	}
	if s.JWT.GroupsClaim == "" {
		s.JWT.GroupsClaim = "groups"
	}
	if s.JWT.UserClaim == "" {
		s.JWT.UserClaim = "sub"
	}
	if len(s.JWT.Algorithms) == 0 {
		s.JWT.Algorithms = []string{"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"}
	}
	var errs []error
	conns := map[string]string{} // lower-cased connection name → database
	roles := map[string]string{} // lower-cased Vault role → database
	for _, d := range s.Databases {
		if d.Name == "" || d.ConnectionURL == "" || d.Username == "" {
			errs = append(errs, fmt.Errorf("vaultinit: database %q needs a name, a connection URL and an admin username", d.Name))
			continue
		}
		if err := checkSegment(d.Name, ""); err != nil {
			errs = append(errs, fmt.Errorf("vaultinit: database %q cannot name a Vault connection: %w", d.Name, err))
		}
		for _, c := range []string{ConnectionName(d.Name, ScopeIdentity), ConnectionName(d.Name, ScopeRole)} {
			if other, dup := conns[strings.ToLower(c)]; dup {
				errs = append(errs, fmt.Errorf("vaultinit: databases %q and %q would share the Vault connection %q (a database's role-scoped levels use <name>-role)", other, d.Name, c))
			}
			conns[strings.ToLower(c)] = d.Name
		}
		users := map[string]string{} // static user → level
		for _, l := range d.Levels {
			if l.VaultRole == "" || (!l.Static && len(l.CreationStatements) == 0) {
				errs = append(errs, fmt.Errorf("vaultinit: database %q level %q needs a Vault role and creation statements (or to be static)", d.Name, l.Name))
				continue
			}
			// A role names paths in policies too, where * and + are globs.
			if err := checkSegment(l.VaultRole, "*+"); err != nil {
				errs = append(errs, fmt.Errorf("vaultinit: database %q level %q: Vault role %q: %w", d.Name, l.Name, l.VaultRole, err))
			}
			if strings.EqualFold(PolicyName(l.VaultRole), ServerPolicyName) {
				errs = append(errs, fmt.Errorf("vaultinit: database %q level %q: Vault role %q is reserved: its policy would be %s, pgwarden's own", d.Name, l.Name, l.VaultRole, ServerPolicyName))
			}
			if other, dup := roles[strings.ToLower(l.VaultRole)]; dup {
				errs = append(errs, fmt.Errorf("vaultinit: database %q level %q: Vault role %q is also one of database %q's (policy names ignore case)", d.Name, l.Name, l.VaultRole, other))
			}
			roles[strings.ToLower(l.VaultRole)] = d.Name
			if sc := scopeOf(l); sc != ScopeIdentity && sc != ScopeRole {
				errs = append(errs, fmt.Errorf("vaultinit: database %q level %q: scope %q is not %s or %s", d.Name, l.Name, l.Scope, ScopeIdentity, ScopeRole))
			}
			if l.DefaultTTL < 0 || l.MaxTTL < 0 {
				errs = append(errs, fmt.Errorf("vaultinit: database %q level %q: a TTL is negative", d.Name, l.Name))
			}
			if l.Static {
				errs = append(errs, checkStatic(d, l, users)...)
			}
		}
	}
	return errors.Join(errs...)
}

// checkStatic refuses a static level Vault would refuse or that would break
// another's credentials. users maps the static users of d's levels seen so far
// to their level, and gains l's.
func checkStatic(d Database, l Level, users map[string]string) []error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("vaultinit: database %q static level %q: "+format, append([]any{d.Name, l.Name}, args...)...))
	}
	if scopeOf(l) != ScopeRole {
		bad("scope is %s, not %s: its one database user is shared by everyone, and read by pgwarden's own identity", scopeOf(l), ScopeRole)
	}
	if l.RotationPeriod < MinRotationPeriod {
		bad("rotation period %v is under Vault's minimum, %v", l.RotationPeriod, MinRotationPeriod)
	}
	if len(l.CreationStatements) > 0 || len(l.RevocationStatements) > 0 {
		bad("has creation or revocation statements: Vault neither creates nor drops a static role's user")
	}
	if l.DefaultTTL != 0 || l.MaxTTL != 0 {
		bad("has TTLs: a static role's password lasts until Vault rotates it")
	}
	u := l.StaticUsername
	switch {
	case u == "":
		bad("needs a database user for Vault to rotate (static username)")
	case len(u) > 63:
		// PostgreSQL would truncate it to another name
		// (https://www.postgresql.org/docs/current/sql-syntax-lexical.html#SQL-SYNTAX-IDENTIFIERS).
		bad("user %q is longer than PostgreSQL's 63-byte names", u)
	case strings.ContainsFunc(u, func(r rune) bool { return r < ' ' || r == 0x7f || r == '"' }):
		// Vault's rotation statement quotes the name: ALTER ROLE "{{name}}".
		bad("user %q holds a double quote or a control character", u)
	case u == d.Username:
		bad("user %q is the connection's admin: Vault would rotate its own login away", u)
	case users[u] != "":
		bad("user %q is also static level %q's: each rotation would lock the other out", u, users[u])
	default:
		users[u] = l.Name
	}
	return errs
}

// checkSegment refuses a name that would not stay one segment of a Vault
// path (database/config/<name>, database/roles/<name>) or a policy name, or
// that holds one of the characters in also.
func checkSegment(name, also string) error {
	if name == "." || name == ".." {
		return errors.New("is a path segment Vault's HTTP paths would resolve away")
	}
	for _, r := range name {
		if r <= ' ' || r == 0x7f || strings.ContainsRune(`/\?#%"`+also, r) {
			return fmt.Errorf("holds %q, which a Vault path or policy name cannot", r)
		}
	}
	return nil
}

// Apply plans spec against Vault and applies the plan (see Plan and
// Changes.Apply), logging each change on log (slog.Default when nil) and
// "no changes" when there are none. client's token must be allowed to manage
// mounts, auth methods, policies and the database engine, and, to prune a
// database role or replace it with a static one, to revoke leases by prefix
// (sudo).
func Apply(ctx context.Context, client *vault.Client, spec Spec, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	changes, err := Plan(ctx, client, spec)
	if err != nil {
		return err
	}
	if len(changes) == 0 {
		log.Info("vault-init: no changes")
		return nil
	}
	return changes.Apply(ctx, client, func(c Change) {
		log.Info("vault-init: "+c.Action.Past()+" "+string(c.Kind), "path", c.Path, "detail", c.Detail)
	})
}
