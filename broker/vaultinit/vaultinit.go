// Package vaultinit configures Vault for pgwarden from a declarative Spec: the
// database secrets engine (one connection per database, one role per access
// level), the JWT auth method (the issuer's keys, one auth role per access level
// bound to its groups), and one policy per level that can read only that
// level's credentials. Apply is idempotent: every write is an upsert, and
// mounts are enabled only when absent.
//
// `pgwarden vault-init` and testenv both call Apply, so the test environment
// configures Vault exactly as an operator would. The admin password in a Spec
// is sent to Vault and never logged or returned in an error.
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

// Spec is what Apply writes.
type Spec struct {
	// DatabaseMount is the database secrets engine path. Default "database".
	DatabaseMount string
	// JWTMount is the JWT auth method path. Default "jwt".
	JWTMount string
	// JWT configures the JWT auth method.
	JWT JWT
	// Databases to configure.
	Databases []Database
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
	// UserClaim names the Vault entity alias. Default "sub".
	UserClaim string
	// Algorithms Vault accepts. Default RS256, ES256 and their larger siblings.
	Algorithms []string
}

// Database is one upstream database Vault issues credentials for.
type Database struct {
	// Name is the Vault connection name (database/config/<Name>).
	Name string
	// ConnectionURL in Vault's template form, e.g.
	// "postgresql://{{username}}:{{password}}@127.0.0.1:5432/app?sslmode=disable".
	ConnectionURL string
	// Username and Password of the admin role Vault uses. Password is secret.
	Username string
	Password string
	// Levels are the access levels.
	Levels []Level
}

// Level is one access level: a Vault database role, a policy and a JWT auth
// role, all named VaultRole.
type Level struct {
	Name                 string
	VaultRole            string
	Groups               []string
	CreationStatements   []string
	RevocationStatements []string
	DefaultTTL           time.Duration
	MaxTTL               time.Duration
	// Scope is "identity" (default) or "role": who shares the credential,
	// and so what its database user is named after.
	Scope string
}

// PolicyName is the name of the policy that may read role's credentials.
func PolicyName(role string) string { return "pgwarden-" + role }

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
	for _, d := range s.Databases {
		if d.Name == "" || d.ConnectionURL == "" || d.Username == "" {
			return fmt.Errorf("vaultinit: database %q needs a name, a connection URL and an admin username", d.Name)
		}
		for _, l := range d.Levels {
			if l.VaultRole == "" || len(l.CreationStatements) == 0 {
				return fmt.Errorf("vaultinit: database %q level %q needs a Vault role and creation statements", d.Name, l.Name)
			}
		}
	}
	return nil
}

// Apply writes spec to Vault with client, whose token must be allowed to
// manage mounts, auth methods, policies and the database engine.
func Apply(ctx context.Context, client *vault.Client, spec Spec, log *slog.Logger) error {
	if err := spec.checkAndSetDefaults(); err != nil {
		return err
	}
	if log == nil {
		log = slog.Default()
	}
	sys := client.Sys()
	mounts, err := sys.ListMountsWithContext(ctx)
	if err != nil {
		return fmt.Errorf("vaultinit: list secrets engines: %w", err)
	}
	if _, ok := mounts[spec.DatabaseMount+"/"]; !ok {
		if err := sys.MountWithContext(ctx, spec.DatabaseMount, &vault.MountInput{Type: "database", Description: "pgwarden dynamic database credentials"}); err != nil {
			return fmt.Errorf("vaultinit: enable database secrets engine at %s: %w", spec.DatabaseMount, err)
		}
		log.Info("enabled database secrets engine", "path", spec.DatabaseMount)
	}
	auths, err := sys.ListAuthWithContext(ctx)
	if err != nil {
		return fmt.Errorf("vaultinit: list auth methods: %w", err)
	}
	if _, ok := auths[spec.JWTMount+"/"]; !ok {
		if err := sys.EnableAuthWithOptionsWithContext(ctx, spec.JWTMount, &vault.EnableAuthOptions{Type: "jwt", Description: "pgwarden client tokens"}); err != nil {
			return fmt.Errorf("vaultinit: enable JWT auth at %s: %w", spec.JWTMount, err)
		}
		log.Info("enabled JWT auth method", "path", spec.JWTMount)
	}
	jwtConf := map[string]any{
		"bound_issuer":       spec.JWT.BoundIssuer,
		"jwt_supported_algs": spec.JWT.Algorithms,
	}
	if spec.JWT.JWKSURL != "" {
		jwtConf["jwks_url"] = spec.JWT.JWKSURL
	} else {
		jwtConf["oidc_discovery_url"] = strings.TrimSuffix(spec.JWT.OIDCDiscoveryURL, "/")
	}
	lg := client.Logical()
	if _, err := lg.WriteWithContext(ctx, "auth/"+spec.JWTMount+"/config", jwtConf); err != nil {
		return fmt.Errorf("vaultinit: configure JWT auth: %w", err)
	}
	for _, d := range spec.Databases {
		roles := make([]string, 0, len(d.Levels))
		for _, l := range d.Levels {
			roles = append(roles, l.VaultRole)
		}
		// Vault templates the admin credentials into the URL itself, so the
		// password never appears in the stored connection string.
		if _, err := lg.WriteWithContext(ctx, spec.DatabaseMount+"/config/"+d.Name, map[string]any{
			"plugin_name":             "postgresql-database-plugin",
			"connection_url":          d.ConnectionURL,
			"username":                d.Username,
			"password":                d.Password,
			"allowed_roles":           roles,
			"verify_connection":       true,
			"password_authentication": "scram-sha-256",
		}); err != nil {
			// Vault's error may quote the connection URL template, never the password.
			return fmt.Errorf("vaultinit: configure database connection %s: %w", d.Name, err)
		}
		for _, l := range d.Levels {
			if err := applyLevel(ctx, lg, sys, spec, d, l); err != nil {
				return err
			}
		}
		log.Info("configured database", "database", d.Name, "levels", len(d.Levels))
	}
	return nil
}

func applyLevel(ctx context.Context, lg *vault.Logical, sys *vault.Sys, spec Spec, d Database, l Level) error {
	role := map[string]any{
		"db_name":             d.Name,
		"creation_statements": l.CreationStatements,
	}
	if len(l.RevocationStatements) > 0 {
		role["revocation_statements"] = l.RevocationStatements
	}
	if l.DefaultTTL > 0 {
		role["default_ttl"] = int(l.DefaultTTL.Seconds())
	}
	if l.MaxTTL > 0 {
		role["max_ttl"] = int(l.MaxTTL.Seconds())
	}
	if _, err := lg.WriteWithContext(ctx, spec.DatabaseMount+"/roles/"+l.VaultRole, role); err != nil {
		return fmt.Errorf("vaultinit: write database role %s: %w", l.VaultRole, err)
	}
	policy := fmt.Sprintf("# Written by pgwarden vault-init: read %s credentials only.\npath %q {\n  capabilities = [\"read\"]\n}\n",
		l.VaultRole, spec.DatabaseMount+"/creds/"+l.VaultRole)
	if err := sys.PutPolicyWithContext(ctx, PolicyName(l.VaultRole), policy); err != nil {
		return fmt.Errorf("vaultinit: write policy %s: %w", PolicyName(l.VaultRole), err)
	}
	// The Vault token lives as long as a credential may, so its leases are not
	// cut short by it; bound_claims must be JSON, which Write sends.
	tokenTTL := l.MaxTTL
	if tokenTTL == 0 {
		tokenTTL = l.DefaultTTL
	}
	groups := l.Groups
	if groups == nil {
		groups = []string{}
	}
	authRole := map[string]any{
		"role_type":         "jwt",
		"bound_audiences":   spec.JWT.Audiences,
		"user_claim":        spec.JWT.UserClaim,
		"groups_claim":      spec.JWT.GroupsClaim,
		"bound_claims_type": "string",
		"bound_claims":      map[string]any{spec.JWT.GroupsClaim: groups},
		"token_policies":    []string{PolicyName(l.VaultRole)},
	}
	if tokenTTL > 0 {
		authRole["token_ttl"] = int(tokenTTL.Seconds())
		authRole["token_max_ttl"] = int(tokenTTL.Seconds())
	}
	if _, err := lg.WriteWithContext(ctx, "auth/"+spec.JWTMount+"/role/"+l.VaultRole, authRole); err != nil {
		return fmt.Errorf("vaultinit: write JWT auth role %s: %w", l.VaultRole, err)
	}
	return nil
}
