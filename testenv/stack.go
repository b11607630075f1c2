package testenv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/pgwarden/pgwarden/broker/vaultinit"
	"github.com/pgwarden/pgwarden/internal/app"
	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/testenv/pki"
)

// Audience is the aud of tokens the dev issuer mints and pgwarden accepts.
const Audience = "pgwarden"

// Seed creates the group roles each access level's dynamic users join, a
// login role for static levels, and the dev database `app`, each statement on its own (CREATE DATABASE cannot
// share a transaction).
var Seed = []string{
	"CREATE ROLE app_owner NOLOGIN",
	"CREATE ROLE app_read NOLOGIN",
	"CREATE ROLE app_write NOLOGIN",
	// A reader whose password Vault owns (a static role), for static levels.
	"CREATE ROLE app_report LOGIN IN ROLE app_read",
	"CREATE DATABASE app OWNER app_owner",
}

// SeedApp runs inside database app: a schema owned by app_owner, tables
// items and notes, and each group role's privileges.
const SeedApp = `
REVOKE ALL ON DATABASE app FROM PUBLIC;
GRANT CONNECT ON DATABASE app TO app_owner, app_read, app_write;
ALTER SCHEMA public OWNER TO app_owner;
SET ROLE app_owner;
CREATE TABLE items (
  id bigserial PRIMARY KEY,
  name text NOT NULL,
  created_by text NOT NULL DEFAULT current_user,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE notes (id bigserial PRIMARY KEY, item_id bigint REFERENCES items, body text NOT NULL);
INSERT INTO items (name, created_by) VALUES ('apple', 'seed'), ('pear', 'seed');
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO app_read;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO app_write;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE ON SEQUENCES TO app_write;
RESET ROLE;
GRANT USAGE ON SCHEMA public TO app_read, app_write;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO app_read;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO app_write;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO app_write;
`

// Levels returns the dev access levels: reader (SELECT), writer (DML) and
// admin (owns the schema), each a dynamic role that joins a group role.
func Levels() []config.Level {
	hour := config.Duration(time.Hour)
	return []config.Level{
		ReadLevel("reader", time.Hour, "analyst", "engineer"),
		{Name: "writer", Groups: []string{"engineer"}, CreationStatements: createIn("app_read, app_write"),
			RevocationStatements: dropRole, DefaultTTL: hour, MaxTTL: 4 * hour},
		{Name: "admin", Groups: []string{"dba"}, CreationStatements: createIn("app_owner"), DefaultTTL: hour, MaxTTL: 4 * hour,
			RevocationStatements: []string{terminate, `REASSIGN OWNED BY "{{name}}" TO app_owner;`, `DROP OWNED BY "{{name}}";`, `DROP ROLE IF EXISTS "{{name}}";`}},
	}
}

// ReadLevel is a reader-like level whose leases last ttl (default and max).
func ReadLevel(name string, ttl time.Duration, groups ...string) config.Level {
	return config.Level{Name: name, Groups: groups, CreationStatements: createIn("app_read"), RevocationStatements: dropRole,
		DefaultTTL: config.Duration(ttl), MaxTTL: config.Duration(max(ttl, 4*time.Hour))}
}

// dropRole ends the role's sessions, then drops it: when Vault revokes a
// lease early (an incident, `vault lease revoke -prefix`), its sessions end
// too, rather than live on as a dropped role that fails every privilege
// check (PostgreSQL lets DROP ROLE succeed under open sessions).
var dropRole = []string{terminate, `DROP ROLE IF EXISTS "{{name}}";`}

const terminate = `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';`

func createIn(groups string) []string {
	return []string{`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}' IN ROLE ` + groups + `;`}
}

// StackOptions configures StartStack.
type StackOptions struct {
	// Dir holds the certificates and config; default a temp dir removed by Close.
	Dir string
	// TrustedNetworks for cleartext tokens; default pgwarden's (loopback).
	TrustedNetworks []string
	// UnixSocketDir, when set, makes pgwarden listen on a unix socket there too.
	UnixSocketDir string
	// ExtraLevels are added to the app database after Levels().
	ExtraLevels []config.Level
	// NoProxy starts everything but pgwarden (make dev runs the binary).
	NoProxy bool
	// Logger for pgwarden; default discards.
	Logger *slog.Logger
	// Configure, when set, changes pgwarden's configuration before it is
	// checked and Vault is configured from it.
	Configure func(*config.Config)
}

// Stack is the whole environment: PostgreSQL with the app database, Vault
// configured by vault-init's code, the OIDC issuer, TLS material, and (unless
// NoProxy) pgwarden itself.
type Stack struct {
	PG     *Postgres
	Vault  *Vault
	Issuer *Issuer
	Certs  *pki.Certs
	Config *config.Config
	App    *app.App // nil with NoProxy
	// AdminPassword is vault_admin's, the role Vault manages users with.
	AdminPassword string

	dir, ownDir string
}

// StartStack starts every component; on error it stops what it started.
func StartStack(ctx context.Context, opts StackOptions) (s *Stack, err error) {
	s = &Stack{AdminPassword: randomHex(16)}
	defer func() {
		if err != nil {
			s.Close()
			s = nil
		}
	}()
	if s.dir = opts.Dir; s.dir == "" {
		if s.dir, err = os.MkdirTemp("", "pgwarden-stack-"); err != nil {
			return s, err
		}
		s.ownDir = s.dir
	}
	var wg sync.WaitGroup
	var pgErr, vErr, iErr error
	wg.Add(3)
	go func() { defer wg.Done(); s.PG, pgErr = StartPostgres(ctx) }()
	go func() { defer wg.Done(); s.Vault, vErr = StartVault(ctx) }()
	go func() { defer wg.Done(); s.Issuer, iErr = StartIssuer(Audience) }()
	wg.Wait()
	if err = errors.Join(pgErr, vErr, iErr); err != nil {
		return s, err
	}
	if s.Certs, err = pki.New(s.dir); err != nil {
		return s, err
	}
	if err = s.seed(ctx); err != nil {
		return s, fmt.Errorf("seed: %w", err)
	}
	s.Config = &config.Config{
		Listen: "127.0.0.1:0", MetricsListen: "127.0.0.1:0",
		TLSCert: s.Certs.CertFile, TLSKey: s.Certs.KeyFile, TrustedNetworks: opts.TrustedNetworks,
		UnixSocketDir: opts.UnixSocketDir,
		LogLevel:      "info", LogFormat: "json",
		OIDC: config.OIDC{IssuerURL: s.Issuer.URL, Audiences: []string{Audience}},
		// pgwarden's own identity (for role-scoped levels): a token with
		// vault-init's server policy, written to the file once Vault is
		// configured.
		Vault: config.Vault{Address: s.Vault.Addr, Auth: config.VaultAuth{Method: "token", TokenFile: filepath.Join(s.dir, "vault-token")}},
		Databases: []config.Database{{
			Name:     "app",
			Upstream: fmt.Sprintf("host=127.0.0.1 port=%d dbname=app sslmode=disable", s.PG.Port),
			Admin: config.Admin{
				ConnectionURL: fmt.Sprintf("postgresql://{{username}}:{{password}}@127.0.0.1:%d/app?sslmode=disable", s.PG.Port),
				Username:      "vault_admin", PasswordEnv: "PGWARDEN_DB_ADMIN_PASSWORD",
			},
			Levels: append(Levels(), opts.ExtraLevels...),
		}},
		// The dev issuer's dba group opens the admin console.
		Console: config.Console{Groups: []string{"dba"}},
	}
	if opts.Configure != nil {
		opts.Configure(s.Config)
	}
	if err = s.loadConfig(); err != nil {
		return s, err
	}
	vc, err := s.Vault.Client()
	if err != nil {
		return s, err
	}
	spec := app.VaultSpec(s.Config, func(string) string { return s.AdminPassword })
	if err = vaultinit.Apply(ctx, vc, spec, slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
		return s, err
	}
	if err = s.writeServerToken(ctx, vc); err != nil {
		return s, err
	}
	if opts.NoProxy {
		return s, nil
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if s.App, err = app.New(ctx, s.Config, log); err != nil {
		return s, err
	}
	s.App.SetReloader(func() (*config.Config, error) {
		return config.Load(filepath.Join(s.dir, "pgwarden.json"), map[string]string{})
	})
	if err = s.App.Start(); err != nil {
		s.App = nil
		return s, err
	}
	return s, nil
}

// writeServerToken creates pgwarden's own Vault token (vault-init's server
// policy, renewable) and writes it where the config's vault.auth.token_file
// says.
func (s *Stack) writeServerToken(ctx context.Context, root *vault.Client) error {
	sec, err := root.Auth().Token().CreateWithContext(ctx, &vault.TokenCreateRequest{
		Policies: []string{vaultinit.ServerPolicyName}, TTL: "1h", ExplicitMaxTTL: "24h", DisplayName: "pgwarden",
	})
	if err != nil {
		return fmt.Errorf("create pgwarden's Vault token: %w", err)
	}
	return os.WriteFile(s.Config.Vault.Auth.TokenFile, []byte(sec.Auth.ClientToken+"\n"), 0o600)
}

// loadConfig writes the config to Dir/pgwarden.json and reads it back through
// config.Load, so the stack runs with the defaults and checks the binary gets.
func (s *Stack) loadConfig() error {
	path := filepath.Join(s.dir, "pgwarden.json")
	if err := s.WriteConfig(path); err != nil {
		return err
	}
	cfg, err := config.Load(path, map[string]string{})
	if err != nil {
		return err
	}
	s.Config = cfg
	return nil
}

func (s *Stack) seed(ctx context.Context) error {
	// Vault's admin: a superuser, because admin revocation reassigns objects
	// owned by the dynamic role. Dev and test only.
	stmts := append(Seed, fmt.Sprintf("CREATE ROLE vault_admin WITH LOGIN SUPERUSER PASSWORD '%s'", s.AdminPassword))
	for _, q := range stmts {
		if err := s.PG.Exec(ctx, "postgres", q); err != nil {
			return fmt.Errorf("%s: %w", strings.Fields(q)[:3], err)
		}
	}
	return s.PG.Exec(ctx, "app", SeedApp)
}

// Close stops everything and removes what StartStack created.
func (s *Stack) Close() {
	if s.App != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = s.App.Shutdown(ctx)
		cancel()
	}
	if s.Issuer != nil {
		s.Issuer.Close()
	}
	if s.Vault != nil {
		s.Vault.Close()
	}
	if s.PG != nil {
		s.PG.Close()
	}
	if s.ownDir != "" {
		os.RemoveAll(s.ownDir)
	}
}

// Token mints a token for sub in groups, valid for an hour.
func (s *Stack) Token(sub string, groups ...string) (string, error) {
	if groups == nil {
		groups = []string{}
	}
	return s.Issuer.Mint(Claims{Subject: sub, Groups: groups})
}

// ConnString is a libpq/pgx connection string to pgwarden for user (an access
// level) with token as the password, over TLS verified against the test CA.
func (s *Stack) ConnString(user, token string) string {
	host, port := splitAddr(s.App.Addr())
	return fmt.Sprintf("host=%s port=%s dbname=app user=%s password=%s sslmode=verify-full sslrootcert=%s",
		host, port, user, token, s.Certs.CAFile)
}
