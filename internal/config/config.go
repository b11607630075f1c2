// Package config reads pgwarden's configuration: a JSON file, then PGWARDEN_*
// environment variables over it (env wins), then defaults. One file describes
// databases, their access levels and the groups that may use them; `serve`
// routes by it and `vault-init` configures Vault from it, so the two cannot
// drift apart.
package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"

	"github.com/pgwarden/pgwarden/authn"
)

// EnvPrefix prefixes every environment variable pgwarden reads. Vault's own
// VAULT_ADDR, VAULT_CACERT… are read by the Vault client as usual.
const EnvPrefix = "PGWARDEN_"

// Duration is a time.Duration written as "30s", "1h" in files and env.
type Duration time.Duration

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Config is the whole configuration. Each field says its env variable
// (after PGWARDEN_) and default.
type Config struct {
	// Listen is the client address (LISTEN). Default 127.0.0.1:6432.
	Listen string `json:"listen" env:"LISTEN"`
	// UnixSocketDir, when set, also listens on DIR/.s.PGSQL.<port> (UNIX_SOCKET_DIR).
	UnixSocketDir string `json:"unix_socket_dir" env:"UNIX_SOCKET_DIR"`
	// MetricsListen serves /metrics, /healthz and /readyz (METRICS_LISTEN).
	// Default 127.0.0.1:9632; "off" disables it.
	MetricsListen string `json:"metrics_listen" env:"METRICS_LISTEN"`
	// Pprof also serves Go's profiler at /debug/pprof/ on the metrics
	// listener (PPROF). Default false: profiles show what the process is
	// doing, so only turn it on where the metrics port is private.
	Pprof bool `json:"pprof" env:"PPROF"`
	// TLSCert and TLSKey are PEM files (TLS_CERT, TLS_KEY). Without them
	// clients are told TLS is not available.
	TLSCert string `json:"tls_cert" env:"TLS_CERT"`
	TLSKey  string `json:"tls_key" env:"TLS_KEY"`
	// TrustedNetworks may send a token without TLS (TRUSTED_NETWORKS, comma
	// separated CIDRs). Default loopback.
	TrustedNetworks []string `json:"trusted_networks" env:"TRUSTED_NETWORKS" envSeparator:","`
	// AllowCleartextUntrusted lets any network send a token without TLS
	// (ALLOW_CLEARTEXT_UNTRUSTED). Default false.
	AllowCleartextUntrusted bool `json:"allow_cleartext_untrusted" env:"ALLOW_CLEARTEXT_UNTRUSTED"`
	// AuthTimeout bounds accept to AuthenticationOk (AUTH_TIMEOUT). Default 30s.
	AuthTimeout Duration `json:"auth_timeout" env:"AUTH_TIMEOUT"`
	// WriteTimeout cuts a peer, client or PostgreSQL, that accepts no bytes
	// for this long (WRITE_TIMEOUT). Default 60s; 0 means the default.
	WriteTimeout Duration `json:"write_timeout" env:"WRITE_TIMEOUT"`
	// MaxHandshakes is how many connections may be authenticating at once;
	// more are refused with SQLSTATE 53300 (MAX_HANDSHAKES). Default 1000; 0
	// means the default.
	MaxHandshakes int `json:"max_handshakes" env:"MAX_HANDSHAKES"`
	// MaxSubjectConnections is how many client sessions one token subject may
	// hold at once (MAX_SUBJECT_CONNECTIONS). Default 0: no limit.
	MaxSubjectConnections int `json:"max_subject_connections" env:"MAX_SUBJECT_CONNECTIONS"`
	// TokenExpiryNotice is how long before a client's token expires its
	// session gets a NOTICE saying so (TOKEN_EXPIRY_NOTICE). Default 1m.
	TokenExpiryNotice Duration `json:"token_expiry_notice" env:"TOKEN_EXPIRY_NOTICE"`
	// TokenExpiryGrace is how long past its token's expiry a session inside a
	// transaction may run to finish it before it is cut
	// (TOKEN_EXPIRY_GRACE). Default 1m.
	TokenExpiryGrace Duration `json:"token_expiry_grace" env:"TOKEN_EXPIRY_GRACE"`
	// LogLevel is debug, info, warn or error (LOG_LEVEL). Default info.
	LogLevel string `json:"log_level" env:"LOG_LEVEL"`
	// LogFormat is json or text (LOG_FORMAT). Default json.
	LogFormat string `json:"log_format" env:"LOG_FORMAT"`

	OIDC    OIDC    `json:"oidc" envPrefix:"OIDC_"`
	Vault   Vault   `json:"vault" envPrefix:"VAULT_"`
	Pool    Pool    `json:"pool" envPrefix:"POOL_"`
	Console Console `json:"console" envPrefix:"CONSOLE_"`

	// Databases are read from the file only.
	Databases []Database `json:"databases"`
}

// OIDC says which tokens are accepted.
type OIDC struct {
	// IssuerURL is the OIDC issuer; its discovery document names the JWKS
	// (OIDC_ISSUER_URL). It must be https, or http to a loopback host.
	IssuerURL string `json:"issuer_url" env:"ISSUER_URL"`
	// JWKSURL skips discovery (OIDC_JWKS_URL). It must be https, or http to a
	// loopback host.
	JWKSURL string `json:"jwks_url" env:"JWKS_URL"`
	// Issuer is the required iss; default IssuerURL (OIDC_ISSUER). Required
	// when only JWKSURL is set.
	Issuer string `json:"issuer" env:"ISSUER"`
	// Audiences accepted (OIDC_AUDIENCES, comma separated). Required.
	Audiences []string `json:"audiences" env:"AUDIENCES" envSeparator:","`
	// GroupsClaim is a dotted claim path (OIDC_GROUPS_CLAIM). Default groups.
	GroupsClaim string `json:"groups_claim" env:"GROUPS_CLAIM"`
	// Algorithms allowed (OIDC_ALGORITHMS). Default: all asymmetric ones.
	Algorithms []string `json:"algorithms" env:"ALGORITHMS" envSeparator:","`
	// Leeway on exp/nbf (OIDC_LEEWAY). Default 30s, at most 5m.
	Leeway Duration `json:"leeway" env:"LEEWAY"`
}

// Vault says how credentials are obtained.
type Vault struct {
	// Address overrides VAULT_ADDR (PGWARDEN_VAULT_ADDRESS).
	Address string `json:"address" env:"ADDRESS"`
	// Mode is how pgwarden authenticates to Vault: jwt (VAULT_MODE). Default jwt.
	Mode string `json:"mode" env:"MODE"`
	// JWTMount is the JWT auth method path (VAULT_JWT_MOUNT). Default jwt.
	JWTMount string `json:"jwt_mount" env:"JWT_MOUNT"`
	// DatabaseMount is the database secrets engine path (VAULT_DATABASE_MOUNT). Default database.
	DatabaseMount string `json:"database_mount" env:"DATABASE_MOUNT"`
	// JWTDiscoveryURL and JWTJWKSURL are where Vault fetches the issuer's keys
	// (vault-init only); default the OIDC settings. They differ when Vault
	// reaches the issuer by another address than pgwarden does. Each must be
	// https, or http to a loopback host.
	JWTDiscoveryURL string `json:"jwt_discovery_url" env:"JWT_DISCOVERY_URL"`
	JWTJWKSURL      string `json:"jwt_jwks_url" env:"JWT_JWKS_URL"`
	// Timeout bounds what a client waits for Vault (VAULT_TIMEOUT): one
	// login or read, retries included (vault/api retries a failed call
	// twice, with jitter). Past it the client gets 08006 naming Vault.
	// Default 10s.
	Timeout Duration `json:"timeout" env:"TIMEOUT"`
	// Auth is pgwarden's own Vault identity, which reads, renews and revokes
	// the leases of levels in "role" scope. Levels in "identity" scope do not
	// use it.
	Auth VaultAuth `json:"auth" envPrefix:"AUTH_"`
	// RevokeOnShutdown revokes, when pgwarden stops, the leases and Vault
	// tokens it holds (VAULT_REVOKE_ON_SHUTDOWN). Default true.
	RevokeOnShutdown *bool `json:"revoke_on_shutdown" env:"REVOKE_ON_SHUTDOWN"`
}

// VaultAuth is how pgwarden logs in to Vault as itself.
type VaultAuth struct {
	// Method is token, approle or kubernetes (VAULT_AUTH_METHOD). Empty: no
	// own identity, and no level may use "role" scope.
	Method string `json:"method" env:"METHOD"`
	// Mount is the auth method's path. Default: the method's name.
	Mount string `json:"mount" env:"MOUNT"`
	// TokenFile holds the token for method token; default VAULT_TOKEN.
	TokenFile string `json:"token_file" env:"TOKEN_FILE"`
	// Role is the AppRole role_id (method approle) or the Kubernetes auth
	// role (method kubernetes).
	Role string `json:"role" env:"ROLE"`
	// SecretFile holds the AppRole secret_id (method approle) or the service
	// account token (method kubernetes; default
	// /var/run/secrets/kubernetes.io/serviceaccount/token).
	SecretFile string `json:"secret_file" env:"SECRET_FILE"`
}

// Pool bounds upstream connections. A zero field means its default; a
// negative one is refused.
type Pool struct {
	MaxPerPool     int      `json:"max_per_pool" env:"MAX_PER_POOL"`       // default 50
	MaxTotal       int      `json:"max_total" env:"MAX_TOTAL"`             // default 200
	AcquireTimeout Duration `json:"acquire_timeout" env:"ACQUIRE_TIMEOUT"` // default 10s
	IdleTimeout    Duration `json:"idle_timeout" env:"IDLE_TIMEOUT"`       // default 5m
	DialTimeout    Duration `json:"dial_timeout" env:"DIAL_TIMEOUT"`       // default 10s
	// PingAfterIdle: a pooled upstream session idle longer than this is
	// pinged before it is handed out (POOL_PING_AFTER_IDLE). Default 1s.
	PingAfterIdle Duration `json:"ping_after_idle" env:"PING_AFTER_IDLE"`
	PingTimeout   Duration `json:"ping_timeout" env:"PING_TIMEOUT"` // default 2s
	// MaxPreparedStatements bounds the named statements pgwarden keeps
	// prepared on each upstream session in transaction mode
	// (POOL_MAX_PREPARED_STATEMENTS); the least recently used is closed
	// beyond it. Default 200.
	MaxPreparedStatements int `json:"max_prepared_statements" env:"MAX_PREPARED_STATEMENTS"`
}

// Console is the admin console: the virtual database "pgwarden".
type Console struct {
	// Groups whose members may open it (CONSOLE_GROUPS, comma separated).
	// Empty: the console is closed to everyone.
	Groups []string `json:"groups" env:"GROUPS" envSeparator:","`
}

// ConsoleDatabase is the admin console's virtual database name.
const ConsoleDatabase = "pgwarden"

// Pool modes: how long a client holds an upstream session.
const (
	// PoolSession: from its first message to disconnect.
	PoolSession = "session"
	// PoolTransaction: from the first message of a transaction to the
	// ReadyForQuery that ends it.
	PoolTransaction = "transaction"
)

// Database is one database clients may ask for.
type Database struct {
	// Name is what clients put in dbname. Unique.
	Name string `json:"name"`
	// Upstream is a PostgreSQL connection string without user or password.
	Upstream string `json:"upstream"`
	// AllowInsecureUpstream lets an Upstream that is not on a loopback host
	// use an sslmode weaker than verify-full. Default false.
	AllowInsecureUpstream bool `json:"allow_insecure_upstream"`
	// Admin is how Vault connects to manage roles (vault-init only).
	Admin Admin `json:"admin"`
	// PoolMode is session (the default) or transaction; a level may
	// override it.
	PoolMode string `json:"pool_mode"`
	// Levels, least privileged first: the first one granted is a user's default.
	Levels []Level `json:"levels"`
}

// Admin is Vault's connection to a database.
type Admin struct {
	// ConnectionURL in Vault's template form:
	// postgresql://{{username}}:{{password}}@host:5432/db?sslmode=…
	ConnectionURL string `json:"connection_url"`
	Username      string `json:"username"`
	// PasswordEnv names the environment variable holding the password, so the
	// file holds no secret. Default PGWARDEN_DB_ADMIN_PASSWORD.
	PasswordEnv string `json:"password_env"`
}

// Level is an access level.
type Level struct {
	// Name is unique within its database.
	Name string `json:"name"`
	// Groups whose members may use it.
	Groups []string `json:"groups"`
	// VaultRole names the Vault database role, policy and JWT auth role.
	// Default "<database>-<level>". It must be unique across all databases
	// and levels, ignoring case (Vault's policy names do), and take only
	// A-Z a-z 0-9 _ . - characters.
	VaultRole            string   `json:"vault_role"`
	CreationStatements   []string `json:"creation_statements"`
	RevocationStatements []string `json:"revocation_statements"`
	// DefaultTTL and MaxTTL bound the leases of the Vault role; 0 leaves
	// Vault's own defaults. DefaultTTL must not exceed MaxTTL when both are set.
	DefaultTTL Duration `json:"default_ttl"`
	MaxTTL     Duration `json:"max_ttl"`
	// Static, when set, makes the level use a Vault static role: one existing
	// database user whose password Vault rotates, read from
	// <mount>/static-creds/<vault_role> by pgwarden's own identity (so the
	// scope must be "role"). Creation and revocation statements do not apply.
	Static *StaticRole `json:"static"`
	// Scope is who shares a credential: "identity" (the default: one lease
	// per person, read with their own Vault login, ending with their token)
	// or "role" (one lease per Vault role, read, renewed and revoked by
	// pgwarden's own Vault identity, vault.auth).
	Scope string `json:"scope"`
	// PoolMode overrides the database's pool_mode for this level.
	PoolMode string `json:"pool_mode"`
}

// StaticRole is a database user Vault manages but does not create.
type StaticRole struct {
	// Username is the existing database user.
	Username string `json:"username"`
	// RotationPeriod is how often Vault changes its password (at least 5s,
	// Vault's minimum).
	RotationPeriod Duration `json:"rotation_period"`
}

// Sharing scopes of a level's credentials.
const (
	ScopeIdentity = "identity"
	ScopeRole     = "role"
)

// Load reads path (when not empty), then environ over it, then fills
// defaults and validates. A configuration that is unsafe or would route
// ambiguously (two levels sharing a Vault role, a negative duration, signing
// keys fetched over plain http from a host that is not loopback…) is refused
// with every problem found, joined by errors.Join; each starts with "config: "
// and names its field by JSON path, such as databases[1].levels[0].vault_role,
// whether the value came from the file or the environment.
func Load(path string, environ map[string]string) (*Config, error) {
	c := &Config{}
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("config: %w", err)
		}
		dec := json.NewDecoder(strings.NewReader(string(b)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(c); err != nil {
			return nil, fmt.Errorf("config: %s: %w", path, err)
		}
	}
	if err := env.ParseWithOptions(c, env.Options{Prefix: EnvPrefix, Environment: environ}); err != nil {
		return nil, fmt.Errorf("config: environment: %w", err)
	}
	if err := c.setDefaultsAndValidate(); err != nil {
		return nil, err
	}
	return c, nil
}

// problems collects every refusal, so one run of `pgwarden check` lists them
// all.
type problems []error

// addf adds a refusal; format names the field by its JSON path.
func (p *problems) addf(format string, args ...any) {
	*p = append(*p, fmt.Errorf("config: "+format, args...))
}

// setDefaultsAndValidate fills defaults and refuses a configuration that is
// unsafe or that would route ambiguously. Every refusal names its field by
// JSON path (databases[1].levels[0].vault_role); they come back together,
// joined with errors.Join.
func (c *Config) setDefaultsAndValidate() error {
	var errs problems
	if c.Listen == "" {
		c.Listen = "127.0.0.1:6432"
	}
	if c.MetricsListen == "" {
		c.MetricsListen = "127.0.0.1:9632"
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.LogFormat == "" {
		c.LogFormat = "json"
	}
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(c.LogLevel)); err != nil {
		errs.addf("log_level %q is not debug, info, warn or error", c.LogLevel)
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		errs.addf("log_format %q is not json or text", c.LogFormat)
	}
	if c.Vault.Mode == "" {
		c.Vault.Mode = "jwt"
	}
	if c.Vault.Mode != "jwt" {
		errs.addf("vault.mode %q is not supported yet (only jwt)", c.Vault.Mode)
	}
	if c.Vault.RevokeOnShutdown == nil {
		on := true
		c.Vault.RevokeOnShutdown = &on
	}
	switch c.Vault.Auth.Method {
	case "", "token", "approle", "kubernetes":
	default:
		errs.addf("vault.auth.method %q is not one of token, approle, kubernetes", c.Vault.Auth.Method)
	}
	if m := c.Vault.Auth.Method; (m == "approle" || m == "kubernetes") && c.Vault.Auth.Role == "" {
		errs.addf("vault.auth.role is required with vault.auth.method %s", m)
	}
	if c.Vault.Auth.Method == "approle" && c.Vault.Auth.SecretFile == "" {
		errs.addf("vault.auth.secret_file (the AppRole secret_id) is required with vault.auth.method approle")
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		errs.addf("tls_cert and tls_key go together")
	}
	for i, n := range c.TrustedNetworks {
		if _, err := netip.ParsePrefix(strings.TrimSpace(n)); err != nil {
			errs.addf("trusted_networks[%d] %q: %w", i, n, err)
		}
	}
	c.checkDurations(&errs)
	c.checkCounts(&errs)
	c.checkOIDC(&errs)
	if len(c.Databases) == 0 {
		errs.addf("databases is empty: no databases configured")
	}
	c.checkDatabases(&errs)
	return errors.Join(errs...)
}

// checkDurations refuses negative durations and fills the defaults of the
// global ones.
func (c *Config) checkDurations(errs *problems) {
	for _, f := range []struct {
		path string
		d    *Duration
		def  time.Duration
	}{
		{"auth_timeout", &c.AuthTimeout, 30 * time.Second},
		{"write_timeout", &c.WriteTimeout, 60 * time.Second},
		{"token_expiry_notice", &c.TokenExpiryNotice, time.Minute},
		{"token_expiry_grace", &c.TokenExpiryGrace, time.Minute},
		{"oidc.leeway", &c.OIDC.Leeway, 30 * time.Second},
		{"vault.timeout", &c.Vault.Timeout, 10 * time.Second},
		{"pool.acquire_timeout", &c.Pool.AcquireTimeout, 10 * time.Second},
		{"pool.idle_timeout", &c.Pool.IdleTimeout, 5 * time.Minute},
		{"pool.dial_timeout", &c.Pool.DialTimeout, 10 * time.Second},
		{"pool.ping_after_idle", &c.Pool.PingAfterIdle, time.Second},
		{"pool.ping_timeout", &c.Pool.PingTimeout, 2 * time.Second},
	} {
		switch {
		case *f.d < 0:
			errs.addf("%s is %v: a duration must not be negative", f.path, f.d.D())
		case *f.d == 0:
			*f.d = Duration(f.def)
		}
	}
	if c.OIDC.Leeway.D() > authn.MaxLeeway {
		errs.addf("oidc.leeway %v is more than %v: clock skew beyond that is a broken clock", c.OIDC.Leeway.D(), authn.MaxLeeway)
	}
}

// checkCounts refuses negative limits and fills their defaults.
func (c *Config) checkCounts(errs *problems) {
	for _, f := range []struct {
		path string
		n    *int
		def  int
	}{
		{"max_handshakes", &c.MaxHandshakes, 1000},
		{"max_subject_connections", &c.MaxSubjectConnections, 0},
		{"pool.max_per_pool", &c.Pool.MaxPerPool, 50},
		{"pool.max_total", &c.Pool.MaxTotal, 200},
		{"pool.max_prepared_statements", &c.Pool.MaxPreparedStatements, 200},
	} {
		switch {
		case *f.n < 0:
			errs.addf("%s is %d: it must not be negative (0 means the default)", f.path, *f.n)
		case *f.n == 0:
			*f.n = f.def
		}
	}
}

// checkOIDC checks where tokens come from and where their keys are fetched.
func (c *Config) checkOIDC(errs *problems) {
	if c.OIDC.IssuerURL == "" && c.OIDC.JWKSURL == "" {
		errs.addf("oidc.issuer_url or oidc.jwks_url is required")
	}
	if c.OIDC.IssuerURL == "" && c.OIDC.JWKSURL != "" && c.OIDC.Issuer == "" {
		errs.addf("oidc.issuer is required when only oidc.jwks_url is set: it is the iss every token must carry")
	}
	if len(c.OIDC.Audiences) == 0 {
		errs.addf("oidc.audiences is required: tokens for other audiences must not open databases")
	}
	for _, f := range []struct{ path, url string }{
		{"oidc.issuer_url", c.OIDC.IssuerURL},
		{"oidc.jwks_url", c.OIDC.JWKSURL},
		{"vault.jwt_discovery_url", c.Vault.JWTDiscoveryURL},
		{"vault.jwt_jwks_url", c.Vault.JWTJWKSURL},
	} {
		if f.url == "" {
			continue
		}
		if err := authn.CheckFetchURL(f.url); err != nil {
			errs.addf("%s: %w", f.path, err)
		}
	}
}

// checkDatabases checks names, Vault roles and lease TTLs, and fills the
// defaults of databases and levels.
func (c *Config) checkDatabases(errs *problems) {
	dbAt := map[string]int{} // database name → index
	type place struct{ db, level int }
	roleAt := map[string]place{} // lower-cased Vault role → first level using it
	for i := range c.Databases {
		d := &c.Databases[i]
		if d.Name == "" {
			errs.addf("databases[%d].name is required", i)
		} else if prev, dup := dbAt[d.Name]; dup {
			errs.addf("databases[%d].name %q is also databases[%d].name: clients could not tell them apart", i, d.Name, prev)
		} else {
			dbAt[d.Name] = i
		}
		if d.Upstream == "" {
			errs.addf("databases[%d].upstream is required (database %q)", i, d.Name)
		}
		for k, o := range c.Databases {
			if k != i && o.Name != "" && d.Name == o.Name+"-role" {
				errs.addf("databases[%d].name %q is the name of databases[%d]'s Vault connection for role-scoped levels (%q + \"-role\"): rename one", i, d.Name, k, o.Name)
			}
		}
		if len(d.Levels) == 0 {
			errs.addf("databases[%d].levels is empty: database %q has no access levels", i, d.Name)
		}
		switch d.PoolMode {
		case "":
			d.PoolMode = PoolSession
		case PoolSession, PoolTransaction:
		default:
			errs.addf("databases[%d].pool_mode %q is not session or transaction", i, d.PoolMode)
		}
		if d.Name == ConsoleDatabase {
			errs.addf("databases[%d].name %q is the admin console's: rename the database", i, d.Name)
		}
		if d.Admin.PasswordEnv == "" {
			d.Admin.PasswordEnv = "PGWARDEN_DB_ADMIN_PASSWORD"
		}
		levelAt := map[string]int{}
		staticAt := map[string]int{} // static user → level using it
		for j := range d.Levels {
			l := &d.Levels[j]
			at := fmt.Sprintf("databases[%d].levels[%d]", i, j)
			if l.Name == "" {
				errs.addf("%s.name is required: level #%d of database %q has no name", at, j+1, d.Name)
			} else if prev, dup := levelAt[l.Name]; dup {
				errs.addf("%s.name %q is also databases[%d].levels[%d].name: database %q would have the level twice", at, l.Name, i, prev, d.Name)
			} else {
				levelAt[l.Name] = j
			}
			defaulted := l.VaultRole == ""
			if defaulted {
				l.VaultRole = d.Name + "-" + l.Name
			}
			if strings.EqualFold(l.VaultRole, "server") {
				errs.addf("%s.vault_role %q is reserved: its policy would be pgwarden-server, pgwarden's own identity's", at, l.VaultRole)
			} else if err := checkVaultRole(l.VaultRole); err != nil {
				how := ""
				if defaulted {
					how = ` (the default, "<database>-<level>"; set vault_role)`
				}
				errs.addf("%s.vault_role %q%s %w", at, l.VaultRole, how, err)
			} else if prev, dup := roleAt[strings.ToLower(l.VaultRole)]; dup {
				pd := c.Databases[prev.db]
				pl := pd.Levels[prev.level]
				caseNote := ""
				if pl.VaultRole != l.VaultRole {
					caseNote = fmt.Sprintf(" as %q (Vault's policy names ignore case)", pl.VaultRole)
				}
				errs.addf("%s.vault_role %q is also the Vault role of databases[%d].levels[%d] (database %q, level %q)%s: two levels would share credentials; set a distinct vault_role",
					at, l.VaultRole, prev.db, prev.level, pd.Name, pl.Name, caseNote)
			} else {
				roleAt[strings.ToLower(l.VaultRole)] = place{i, j}
			}
			for _, f := range []struct {
				name string
				d    Duration
			}{{"default_ttl", l.DefaultTTL}, {"max_ttl", l.MaxTTL}} {
				if f.d < 0 {
					errs.addf("%s.%s is %v: a duration must not be negative", at, f.name, f.d.D())
				}
			}
			switch l.Scope {
			case "":
				l.Scope = ScopeIdentity
			case ScopeIdentity:
			case ScopeRole:
				if c.Vault.Auth.Method == "" {
					errs.addf("%s.scope is role but vault.auth.method is not set: role-scoped leases are read with pgwarden's own Vault identity", at)
				}
			default:
				errs.addf("%s.scope %q is not identity or role", at, l.Scope)
			}
			switch l.PoolMode {
			case "":
				l.PoolMode = d.PoolMode
			case PoolSession, PoolTransaction:
			default:
				errs.addf("%s.pool_mode %q is not session or transaction", at, l.PoolMode)
			}
			if st := l.Static; st != nil {
				switch {
				case st.Username == "":
					errs.addf("%s.static.username is required: the database user Vault rotates", at)
				case st.Username == d.Admin.Username:
					errs.addf("%s.static.username %q is the admin Vault logs in as (databases[%d].admin.username): Vault would rotate its own login away", at, st.Username, i)
				case len(st.Username) > 63 || strings.ContainsFunc(st.Username, func(r rune) bool { return r == '"' || r < ' ' || r == 0x7f }):
					errs.addf("%s.static.username %q is not a PostgreSQL user name Vault can manage (at most 63 bytes, no quote or control character)", at, st.Username)
				default:
					if prev, dup := staticAt[st.Username]; dup {
						errs.addf("%s.static.username %q is also databases[%d].levels[%d]'s: Vault would rotate one user for two levels", at, st.Username, i, prev)
					} else {
						staticAt[st.Username] = j
					}
				}
				if st.RotationPeriod.D() < 5*time.Second {
					errs.addf("%s.static.rotation_period %v is less than Vault's minimum, 5s", at, st.RotationPeriod.D())
				}
				if l.Scope != ScopeRole {
					errs.addf("%s.static needs scope role: a static role's one user is shared by everyone, and read by pgwarden's own identity", at)
				}
				if len(l.CreationStatements) > 0 || len(l.RevocationStatements) > 0 || l.DefaultTTL != 0 || l.MaxTTL != 0 {
					errs.addf("%s has static and creation or revocation statements or TTLs: a static role's user exists already and lives on", at)
				}
			}
			if l.DefaultTTL > 0 && l.MaxTTL > 0 && l.DefaultTTL > l.MaxTTL {
				errs.addf("%s.default_ttl %v is more than %s.max_ttl %v: a lease's default cannot outlive its maximum",
					at, l.DefaultTTL.D(), at, l.MaxTTL.D())
			}
		}
	}
}

// checkVaultRole refuses a Vault role name that does not go safely into a
// Vault path (database/creds/<role>, auth/jwt/role/<role>) and a policy name.
func checkVaultRole(role string) error {
	if role == "" {
		return errors.New("is empty")
	}
	if role == "." || role == ".." {
		return errors.New("is a path segment Vault's HTTP paths would resolve away")
	}
	for _, r := range role {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '.' || r == '-') {
			return fmt.Errorf("has %q, a character Vault paths cannot take safely: use only A-Z a-z 0-9 _ . -", r)
		}
	}
	return nil
}

// TrustedPrefixes parses TrustedNetworks; nil means the default (loopback).
func (c *Config) TrustedPrefixes() []netip.Prefix {
	if len(c.TrustedNetworks) == 0 {
		return nil
	}
	out := make([]netip.Prefix, 0, len(c.TrustedNetworks))
	for _, n := range c.TrustedNetworks {
		out = append(out, netip.MustParsePrefix(strings.TrimSpace(n)))
	}
	return out
}
