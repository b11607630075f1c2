package app

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/console"
	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/pgerror"
	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/proxy"
)

// SetReloader gives RELOAD (in the admin console) the way to read the
// configuration again: cmd/pgwarden's reads the same file and environment
// it started with.
func (a *App) SetReloader(load func() (*config.Config, error)) { a.reloader.Store(&load) }

// reloadTarget is what a reload changes in the running proxy
// (*proxy.Server).
type reloadTarget interface {
	Reconfigure(proxy.Reloadable) error
	SetPoolConfig(pool.Config) error
	SetConsoleGroups(groups []string)
}

var _ reloadTarget = (*proxy.Server)(nil)

// poolConfig is the proxy's part of cfg.Pool.
func poolConfig(cfg *config.Config) pool.Config {
	return pool.Config{MaxPerPool: cfg.Pool.MaxPerPool, MaxTotal: cfg.Pool.MaxTotal,
		AcquireTimeout: cfg.Pool.AcquireTimeout.D(), IdleTimeout: cfg.Pool.IdleTimeout.D(),
		DialTimeout: cfg.Pool.DialTimeout.D(), PingAfterIdle: cfg.Pool.PingAfterIdle.D(), PingTimeout: cfg.Pool.PingTimeout.D(),
		MaxPreparedStatements: cfg.Pool.MaxPreparedStatements}
}

// Reload reads the configuration again and applies what can change while
// pgwarden runs; SIGHUP and the console's RELOAD both come here. source
// ("SIGHUP", "RELOAD") goes into the log.
//
// Applied, for connections that start from now on: the grants (each
// database's levels and their groups) and where each level goes (Vault role,
// scope, static; the pool mode of a level new since start), the TLS
// certificate and key (read again from their files even when the paths are
// the same, so a renewed pair is picked up), log_level, the pool limits and
// console.groups. Sessions already running keep the level and credential
// they logged in with. What needs a restart (listen addresses, the issuer,
// Vault, upstreams, a new database, a level's pool mode…) keeps its running
// value and is logged by name.
//
// A configuration that does not load, fails its checks, or cannot be applied
// as a whole (a certificate that does not load, a role-scoped level without
// pgwarden's own Vault identity) is rejected: nothing changes and the error
// says why. Every attempt is counted in pgwarden_config_reloads_total.
func (a *App) Reload(ctx context.Context, source string) error {
	a.reloadMu.Lock()
	defer a.reloadMu.Unlock()
	err := a.reloadLocked(ctx, source)
	if err != nil {
		a.metrics.ConfigReloaded("rejected")
		a.log.Error("configuration reload rejected; the running configuration is unchanged", "source", source, "error", err)
		return err
	}
	a.metrics.ConfigReloaded("ok")
	return nil
}

// reload is the console's RELOAD.
func (a *App) reload(ctx context.Context) error { return a.Reload(ctx, "RELOAD") }

// SetLogLevel gives Reload the level of pgwarden's logger to change when
// log_level does. Without it a new log_level waits for a restart. Call it
// before Start.
func (a *App) SetLogLevel(v *slog.LevelVar) { a.logLevel = v }

func (a *App) reloadLocked(ctx context.Context, source string) error {
	f := a.reloader.Load()
	if f == nil {
		return pgerror.New(pgerror.FeatureNotSupported, "RELOAD is not available: this pgwarden has no configuration source to re-read")
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	next, err := (*f)()
	if err != nil {
		return rejected(err, "it does not pass its checks")
	}
	cur := a.current()
	pc := poolConfig(next)
	if err := pc.CheckAndSetDefaults(); err != nil {
		return rejected(err, "its pool limits are invalid")
	}
	inForce, restart, err := a.reloadRoutes(cur, next)
	if err != nil {
		return rejected(err, "it cannot be applied while running")
	}
	grants, routes, err := routing(inForce)
	if err != nil {
		return rejected(err, "its grants are invalid")
	}
	// A database gone from the file keeps its pool until a restart, but
	// nobody is granted it: new connections get 3D000.
	for _, d := range cur.Databases {
		if _, ok := routes[d.Name]; !ok {
			routes[d.Name] = proxy.Route{Upstream: d.Upstream, Policy: pool.UpstreamPolicy{AllowInsecure: d.AllowInsecureUpstream}}
			restart = append(restart, fmt.Sprintf("databases: %q removed (new connections are refused; its pool closes at restart)", d.Name))
		}
	}
	tlsCfg, err := loadTLS(next)
	if err != nil {
		return rejected(err, "its TLS certificate and key do not load")
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(next.LogLevel)); err != nil {
		return rejected(fmt.Errorf("config: log_level %q: %w", next.LogLevel, err), "it does not pass its checks")
	}
	logLevel := next.LogLevel
	if a.logLevel == nil && next.LogLevel != cur.LogLevel {
		logLevel = cur.LogLevel
		restart = append(restart, "log_level")
	}
	restart = append(restart, restartOnly(cur, next)...)
	if restart == nil {
		restart = []string{} // logged as [], not null
	}

	// Publish, nothing applied before the last check. Reconfigure checks the
	// routes against the ones the proxy started with and applies them in
	// one step, or refuses and applies nothing, so it goes first; the pool
	// limits passed SetPoolConfig's only check (CheckAndSetDefaults) above.
	if err := a.reloadTo.Reconfigure(proxy.Reloadable{Authorizer: grants, Routes: routes, TLS: tlsCfg}); err != nil {
		return rejected(err, "its routes cannot be applied while running")
	}
	poolNow := next.Pool
	if err := a.reloadTo.SetPoolConfig(pc); err != nil {
		// Not reached (pc passed the same check); if it were, the rest is
		// applied and the log and SHOW CONFIG keep the limits in force.
		a.log.Error("configuration reload: the pool limits were not applied; they stay as they were", "error", err)
		poolNow = cur.Pool
	}
	a.reloadTo.SetConsoleGroups(next.Console.Groups)
	if a.logLevel != nil {
		a.logLevel.Set(level)
	}
	a.noteModesLocked(inForce)
	merged := *cur
	merged.Pool, merged.Console, merged.LogLevel = poolNow, next.Console, logLevel
	merged.TLSCert, merged.TLSKey = next.TLSCert, next.TLSKey
	merged.Databases = inForce
	for _, d := range cur.Databases {
		if !slices.ContainsFunc(inForce, func(x config.Database) bool { return x.Name == d.Name }) {
			gone := d
			gone.Levels = nil
			merged.Databases = append(merged.Databases, gone)
		}
	}
	changed := changedParts(cur, &merged)
	a.cfgNow.Store(&merged)
	a.log.Info("configuration reloaded", "source", source, "applied", changed, "restart_needed_for", restart,
		"tls", tlsCfg != nil, "log_level", logLevel)
	return nil
}

// rejected is a refused reload as the console shows it (F0000, with a hint),
// the cause kept in the chain for the log.
func rejected(err error, why string) error {
	e := pgerror.New(pgerror.ConfigurationFileError, "the configuration was not reloaded: "+why).
		WithHint("pgwarden check names the field; pgwarden's log has the details. The running configuration is unchanged.")
	e.Err = err
	return e
}

// levelKey names one level of one database.
type levelKey struct{ db, level string }

// noteModesLocked records the pool mode of every level in dbs not yet
// routed. Called with reloadMu held (or from New, before anyone else can).
func (a *App) noteModesLocked(dbs []config.Database) {
	for _, d := range dbs {
		for _, l := range d.Levels {
			k := levelKey{d.Name, l.Name}
			if _, ok := a.modes[k]; !ok {
				a.modes[k] = l.PoolMode
			}
		}
	}
}

// reloadRoutes is next's databases as they can apply now: the databases
// running since start only, each with its running upstream, and next's
// levels, except that a level keeps the pool mode it was first routed in (a
// pool's idle servers are shared by its clients, and a server a
// transaction-mode client checked in still carries that client's settings,
// which a session-mode client would inherit). It returns what waits for a
// restart, by name, and refuses a level that cannot work in this process.
func (a *App) reloadRoutes(cur, next *config.Config) ([]config.Database, []string, error) {
	running := map[string]config.Database{}
	for _, d := range cur.Databases {
		running[d.Name] = d
	}
	var out []config.Database
	var restart []string
	var problems []error
	for i, d := range next.Databases {
		was, ok := running[d.Name]
		if !ok {
			restart = append(restart, fmt.Sprintf("databases[%d]: new database %q", i, d.Name))
			continue
		}
		if d.Upstream != was.Upstream || d.AllowInsecureUpstream != was.AllowInsecureUpstream {
			restart = append(restart, fmt.Sprintf("databases[%d].upstream", i))
			d.Upstream, d.AllowInsecureUpstream = was.Upstream, was.AllowInsecureUpstream
		}
		d.Levels = slices.Clone(d.Levels)
		for j := range d.Levels {
			l := &d.Levels[j]
			if m, ok := a.modes[levelKey{d.Name, l.Name}]; ok && m != l.PoolMode {
				restart = append(restart, fmt.Sprintf("databases[%d].levels[%d].pool_mode", i, j))
				l.PoolMode = m
			}
			if l.Scope == config.ScopeRole && a.self == nil {
				problems = append(problems, fmt.Errorf("config: databases[%d].levels[%d].scope is role, but pgwarden started without vault.auth (its own Vault identity): restart with vault.auth set", i, j))
			}
		}
		out = append(out, d)
	}
	return out, restart, errors.Join(problems...)
}

// restartOnly names the settings that differ between cur and next and that
// only a restart applies.
func restartOnly(cur, next *config.Config) []string {
	var out []string
	for _, f := range []struct {
		name     string
		old, new any
	}{
		{"listen", cur.Listen, next.Listen}, {"unix_socket_dir", cur.UnixSocketDir, next.UnixSocketDir},
		{"metrics_listen", cur.MetricsListen, next.MetricsListen}, {"pprof", cur.Pprof, next.Pprof},
		{"oidc", cur.OIDC, next.OIDC}, {"vault", cur.Vault, next.Vault},
		{"trusted_networks", cur.TrustedNetworks, next.TrustedNetworks},
		{"allow_cleartext_untrusted", cur.AllowCleartextUntrusted, next.AllowCleartextUntrusted},
		{"timeouts and limits",
			[]any{cur.AuthTimeout, cur.WriteTimeout, cur.MaxHandshakes, cur.MaxSubjectConnections, cur.TokenExpiryNotice, cur.TokenExpiryGrace},
			[]any{next.AuthTimeout, next.WriteTimeout, next.MaxHandshakes, next.MaxSubjectConnections, next.TokenExpiryNotice, next.TokenExpiryGrace}},
		{"log_format", cur.LogFormat, next.LogFormat},
	} {
		if !sameJSON(f.old, f.new) {
			out = append(out, f.name)
		}
	}
	return out
}

// changedParts names what a reload changed, for its log line. The TLS pair
// is always read again, so it is named whenever TLS is on.
func changedParts(cur, now *config.Config) []string {
	out := []string{}
	for _, f := range []struct {
		name     string
		old, new any
	}{
		{"databases", cur.Databases, now.Databases}, {"pool", cur.Pool, now.Pool},
		{"console.groups", cur.Console.Groups, now.Console.Groups}, {"log_level", cur.LogLevel, now.LogLevel},
	} {
		if !sameJSON(f.old, f.new) {
			out = append(out, f.name)
		}
	}
	if now.TLSCert != "" || cur.TLSCert != "" {
		out = append(out, "tls")
	}
	return out
}

// routing turns databases into the grants and the proxy's routes.
func routing(dbs []config.Database) (*authn.Grants, map[string]proxy.Route, error) {
	ads := make([]authn.Database, 0, len(dbs))
	routes := make(map[string]proxy.Route, len(dbs))
	for _, d := range dbs {
		ad := authn.Database{Name: d.Name}
		r := proxy.Route{Upstream: d.Upstream, VaultRoles: map[string]string{}, Scopes: map[string]string{}, Static: map[string]bool{},
			Modes: map[string]string{}, Policy: pool.UpstreamPolicy{AllowInsecure: d.AllowInsecureUpstream}}
		for _, l := range d.Levels {
			ad.Levels = append(ad.Levels, authn.Level{Name: l.Name, Groups: slices.Clone(l.Groups)})
			r.VaultRoles[l.Name] = l.VaultRole
			r.Scopes[l.Name] = l.Scope
			r.Static[l.Name] = l.Static != nil
			r.Modes[l.Name] = l.PoolMode
		}
		ads = append(ads, ad)
		routes[d.Name] = r
	}
	g, err := authn.NewGrants(ads)
	if err != nil {
		return nil, nil, err
	}
	return g, routes, nil
}

// loadTLS reads cfg's certificate and key; nil without them.
func loadTLS(cfg *config.Config) (*tls.Config, error) {
	if cfg.TLSCert == "" {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("config: tls_cert %s and tls_key %s: %w", cfg.TLSCert, cfg.TLSKey, err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}}, nil
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
		{Key: "trusted_networks", Value: strings.Join(c.TrustedNetworks, ","), Default: "127.0.0.0/8,::1/128"},
		{Key: "allow_cleartext_untrusted", Value: fmt.Sprint(c.AllowCleartextUntrusted), Default: "false"},
		{Key: "auth_timeout", Value: d(c.AuthTimeout.D()), Default: "30s"},
		{Key: "write_timeout", Value: d(c.WriteTimeout.D()), Default: "1m0s"},
		{Key: "max_handshakes", Value: fmt.Sprint(c.MaxHandshakes), Default: "1000"},
		{Key: "max_subject_connections", Value: fmt.Sprint(c.MaxSubjectConnections), Default: "0"},
		{Key: "token_expiry_notice", Value: d(c.TokenExpiryNotice.D()), Default: "1m0s"},
		{Key: "token_expiry_grace", Value: d(c.TokenExpiryGrace.D()), Default: "1m0s"},
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
		{Key: "tls_cert", Value: c.TLSCert},
		{Key: "log_level", Value: c.LogLevel, Default: "info"},
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
			console.Setting{Key: p + "levels", Value: strings.Join(levels, ","), Changeable: true})
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
