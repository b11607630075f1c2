package app

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/console"
	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/pgerror"
	"github.com/pgwarden/pgwarden/pool"
)

// SetReloader gives RELOAD (in the admin console) the way to read the
// configuration again: cmd/pgwarden's reads the same file and environment
// it started with.
func (a *App) SetReloader(load func() (*config.Config, error)) { a.reloader.Store(&load) }

// poolConfig is the proxy's part of cfg.Pool.
func poolConfig(cfg *config.Config) pool.Config {
	return pool.Config{MaxPerPool: cfg.Pool.MaxPerPool, MaxTotal: cfg.Pool.MaxTotal,
		AcquireTimeout: cfg.Pool.AcquireTimeout.D(), IdleTimeout: cfg.Pool.IdleTimeout.D(),
		DialTimeout: cfg.Pool.DialTimeout.D(), PingAfterIdle: cfg.Pool.PingAfterIdle.D(), PingTimeout: cfg.Pool.PingTimeout.D(),
		MaxPreparedStatements: cfg.Pool.MaxPreparedStatements}
}

// reload re-reads the configuration and applies what can change while
// running: the pool limits and the console's groups. Other changes are
// logged as waiting for a restart.
func (a *App) reload(ctx context.Context) error {
	f := a.reloader.Load()
	if f == nil {
		return pgerror.New(pgerror.FeatureNotSupported, "RELOAD is not available: this pgwarden has no configuration source to re-read")
	}
	next, err := (*f)()
	if err != nil {
		e := pgerror.New(pgerror.ConfigurationFileError, "the configuration was not reloaded: it does not pass its checks").
			WithHint("pgwarden check names the field; pgwarden's log has the details. The running configuration is unchanged.")
		e.Err = err
		a.log.Error("RELOAD refused", "error", err)
		return e
	}
	if err := a.server.SetPoolConfig(poolConfig(next)); err != nil {
		return pgerror.Wrap(err, pgerror.ConfigurationFileError, "the pool limits were not applied")
	}
	a.server.SetConsoleGroups(next.Console.Groups)
	cur := a.current()
	var restart []string
	for _, f := range []struct {
		name     string
		old, new any
	}{
		{"listen", cur.Listen, next.Listen}, {"tls", [2]string{cur.TLSCert, cur.TLSKey}, [2]string{next.TLSCert, next.TLSKey}},
		{"oidc", cur.OIDC, next.OIDC}, {"vault", cur.Vault, next.Vault}, {"databases", cur.Databases, next.Databases},
		{"trusted_networks", cur.TrustedNetworks, next.TrustedNetworks}, {"timeouts and limits",
			[]any{cur.AuthTimeout, cur.WriteTimeout, cur.MaxHandshakes, cur.MaxSubjectConnections, cur.TokenExpiryNotice, cur.TokenExpiryGrace},
			[]any{next.AuthTimeout, next.WriteTimeout, next.MaxHandshakes, next.MaxSubjectConnections, next.TokenExpiryNotice, next.TokenExpiryGrace}},
		{"logging", [2]string{cur.LogLevel, cur.LogFormat}, [2]string{next.LogLevel, next.LogFormat}},
	} {
		if !sameJSON(f.old, f.new) {
			restart = append(restart, f.name)
		}
	}
	merged := *cur
	merged.Pool, merged.Console = next.Pool, next.Console
	a.cfgNow.Store(&merged)
	a.log.Info("configuration reloaded: pool limits and console groups applied", "restart_needed_for", restart)
	return nil
}

func sameJSON(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return string(x) == string(y)
}

// current is the configuration in force.
func (a *App) current() *config.Config { return a.cfgNow.Load() }

// settings lists the configuration in force for SHOW CONFIG. Nothing
// secret is in it: the configuration holds no secret itself (passwords and
// tokens are read from files and environment variables it only names), and
// what could carry one (an upstream string with a password in it, an
// AppRole role_id) is shown reduced.
func (a *App) settings() []console.Setting {
	c := a.current()
	d := func(v time.Duration) string { return v.String() }
	rows := []console.Setting{
		{Key: "listen", Value: c.Listen, Default: "127.0.0.1:6432"},
		{Key: "unix_socket_dir", Value: c.UnixSocketDir},
		{Key: "metrics_listen", Value: c.MetricsListen, Default: "127.0.0.1:9632"},
		{Key: "tls_cert", Value: c.TLSCert},
		{Key: "trusted_networks", Value: strings.Join(c.TrustedNetworks, ","), Default: "127.0.0.0/8,::1/128"},
		{Key: "allow_cleartext_untrusted", Value: fmt.Sprint(c.AllowCleartextUntrusted), Default: "false"},
		{Key: "auth_timeout", Value: d(c.AuthTimeout.D()), Default: "30s"},
		{Key: "write_timeout", Value: d(c.WriteTimeout.D()), Default: "1m0s"},
		{Key: "max_handshakes", Value: fmt.Sprint(c.MaxHandshakes), Default: "1000"},
		{Key: "max_subject_connections", Value: fmt.Sprint(c.MaxSubjectConnections), Default: "0"},
		{Key: "token_expiry_notice", Value: d(c.TokenExpiryNotice.D()), Default: "1m0s"},
		{Key: "token_expiry_grace", Value: d(c.TokenExpiryGrace.D()), Default: "1m0s"},
		{Key: "log_level", Value: c.LogLevel, Default: "info"},
		{Key: "log_format", Value: c.LogFormat, Default: "json"},
		{Key: "oidc.issuer_url", Value: c.OIDC.IssuerURL},
		{Key: "oidc.jwks_url", Value: c.OIDC.JWKSURL},
		{Key: "oidc.issuer", Value: c.OIDC.Issuer},
		{Key: "oidc.audiences", Value: strings.Join(c.OIDC.Audiences, ",")},
		{Key: "oidc.groups_claim", Value: c.OIDC.GroupsClaim, Default: "groups"},
		{Key: "oidc.leeway", Value: d(c.OIDC.Leeway.D()), Default: "30s"},
		{Key: "vault.address", Value: c.Vault.Address},
		{Key: "vault.jwt_mount", Value: c.Vault.JWTMount, Default: "jwt"},
		{Key: "vault.database_mount", Value: c.Vault.DatabaseMount, Default: "database"},
		{Key: "vault.timeout", Value: d(c.Vault.Timeout.D()), Default: "10s"},
		{Key: "vault.auth.method", Value: c.Vault.Auth.Method},
		{Key: "vault.auth.role", Value: redactIfSet(c.Vault.Auth.Role)},
		{Key: "vault.revoke_on_shutdown", Value: fmt.Sprint(*c.Vault.RevokeOnShutdown), Default: "true"},
	}
	changeable := []console.Setting{
		{Key: "pool.max_per_pool", Value: fmt.Sprint(c.Pool.MaxPerPool), Default: "50"},
		{Key: "pool.max_total", Value: fmt.Sprint(c.Pool.MaxTotal), Default: "200"},
		{Key: "pool.acquire_timeout", Value: d(c.Pool.AcquireTimeout.D()), Default: "10s"},
		{Key: "pool.idle_timeout", Value: d(c.Pool.IdleTimeout.D()), Default: "5m0s"},
		{Key: "pool.dial_timeout", Value: d(c.Pool.DialTimeout.D()), Default: "10s"},
		{Key: "pool.ping_after_idle", Value: d(c.Pool.PingAfterIdle.D()), Default: "1s"},
		{Key: "pool.ping_timeout", Value: d(c.Pool.PingTimeout.D()), Default: "2s"},
		{Key: "pool.max_prepared_statements", Value: fmt.Sprint(c.Pool.MaxPreparedStatements), Default: "200"},
		{Key: "console.groups", Value: strings.Join(c.Console.Groups, ",")},
	}
	for i := range changeable {
		changeable[i].Changeable = true
	}
	rows = append(rows, changeable...)
	for _, db := range c.Databases {
		p := "databases." + db.Name + "."
		levels := make([]string, 0, len(db.Levels))
		for _, l := range db.Levels {
			levels = append(levels, l.Name+"="+l.PoolMode+"/"+l.Scope)
		}
		rows = append(rows,
			console.Setting{Key: p + "upstream", Value: upstreamShown(db.Upstream)},
			console.Setting{Key: p + "pool_mode", Value: db.PoolMode, Default: config.PoolSession},
			console.Setting{Key: p + "levels", Value: strings.Join(levels, ",")})
	}
	return rows
}

func redactIfSet(s string) string {
	if s == "" {
		return ""
	}
	return "(set)"
}

// upstreamShown is an upstream connection string as host:port/dbname with
// its sslmode: whatever else it holds (a password put there by mistake)
// stays out of the console.
func upstreamShown(conn string) string {
	c, err := pgconn.ParseConfig(conn)
	if err != nil {
		return "(unparsable)"
	}
	mode := "disable"
	if c.TLSConfig != nil {
		mode = "tls"
	}
	return fmt.Sprintf("%s:%d/%s (%s)", c.Host, c.Port, c.Database, mode)
}
