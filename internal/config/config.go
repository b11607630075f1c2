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
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"
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
	// LogLevel is debug, info, warn or error (LOG_LEVEL). Default info.
	LogLevel string `json:"log_level" env:"LOG_LEVEL"`
	// LogFormat is json or text (LOG_FORMAT). Default json.
	LogFormat string `json:"log_format" env:"LOG_FORMAT"`

	OIDC  OIDC  `json:"oidc" envPrefix:"OIDC_"`
	Vault Vault `json:"vault" envPrefix:"VAULT_"`
	Pool  Pool  `json:"pool" envPrefix:"POOL_"`

	// Databases are read from the file only.
	Databases []Database `json:"databases"`
}

// OIDC says which tokens are accepted.
type OIDC struct {
	// IssuerURL is the OIDC issuer; its discovery document names the JWKS (OIDC_ISSUER_URL).
	IssuerURL string `json:"issuer_url" env:"ISSUER_URL"`
	// JWKSURL skips discovery (OIDC_JWKS_URL).
	JWKSURL string `json:"jwks_url" env:"JWKS_URL"`
	// Issuer is the required iss; default IssuerURL (OIDC_ISSUER).
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
	// reaches the issuer by another address than pgwarden does.
	JWTDiscoveryURL string `json:"jwt_discovery_url" env:"JWT_DISCOVERY_URL"`
	JWTJWKSURL      string `json:"jwt_jwks_url" env:"JWT_JWKS_URL"`
}

// Pool bounds upstream connections.
type Pool struct {
	MaxPerPool     int      `json:"max_per_pool" env:"MAX_PER_POOL"`       // default 50
	MaxTotal       int      `json:"max_total" env:"MAX_TOTAL"`             // default 200
	AcquireTimeout Duration `json:"acquire_timeout" env:"ACQUIRE_TIMEOUT"` // default 10s
	IdleTimeout    Duration `json:"idle_timeout" env:"IDLE_TIMEOUT"`       // default 5m
}

// Database is one database clients may ask for.
type Database struct {
	// Name is what clients put in dbname.
	Name string `json:"name"`
	// Upstream is a PostgreSQL connection string without user or password.
	Upstream string `json:"upstream"`
	// Admin is how Vault connects to manage roles (vault-init only).
	Admin Admin `json:"admin"`
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
	Name string `json:"name"`
	// Groups whose members may use it.
	Groups []string `json:"groups"`
	// VaultRole names the Vault database role, policy and JWT auth role.
	// Default "<database>-<level>".
	VaultRole            string   `json:"vault_role"`
	CreationStatements   []string `json:"creation_statements"`
	RevocationStatements []string `json:"revocation_statements"`
	DefaultTTL           Duration `json:"default_ttl"`
	MaxTTL               Duration `json:"max_ttl"`
}

// Load reads path (when not empty), then environ over it, then fills
// defaults and validates.
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

func (c *Config) setDefaultsAndValidate() error {
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
	if c.Vault.Mode == "" {
		c.Vault.Mode = "jwt"
	}
	if c.Vault.Mode != "jwt" {
		return fmt.Errorf("config: vault mode %q is not supported yet (only jwt)", c.Vault.Mode)
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		return errors.New("config: tls_cert and tls_key go together")
	}
	for _, n := range c.TrustedNetworks {
		if _, err := netip.ParsePrefix(strings.TrimSpace(n)); err != nil {
			return fmt.Errorf("config: trusted network %q: %w", n, err)
		}
	}
	if c.OIDC.IssuerURL == "" && c.OIDC.JWKSURL == "" {
		return errors.New("config: oidc.issuer_url or oidc.jwks_url is required")
	}
	if len(c.OIDC.Audiences) == 0 {
		return errors.New("config: oidc.audiences is required: tokens for other audiences must not open databases")
	}
	if len(c.Databases) == 0 {
		return errors.New("config: no databases configured")
	}
	for i := range c.Databases {
		d := &c.Databases[i]
		if d.Name == "" || d.Upstream == "" {
			return fmt.Errorf("config: database #%d needs a name and an upstream", i+1)
		}
		if len(d.Levels) == 0 {
			return fmt.Errorf("config: database %q has no access levels", d.Name)
		}
		if d.Admin.PasswordEnv == "" {
			d.Admin.PasswordEnv = "PGWARDEN_DB_ADMIN_PASSWORD"
		}
		for j := range d.Levels {
			l := &d.Levels[j]
			if l.Name == "" {
				return fmt.Errorf("config: database %q: level #%d has no name", d.Name, j+1)
			}
			if l.VaultRole == "" {
				l.VaultRole = d.Name + "-" + l.Name
			}
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
