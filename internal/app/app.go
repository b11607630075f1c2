// Package app builds a running pgwarden from a config.Config: the token
// verifier, the grants, the Vault broker, the proxy server, metrics and their
// listeners. cmd/pgwarden and testenv both use it, so tests run the same
// wiring the binary does.
package app

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	vault "github.com/hashicorp/vault/api"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/broker/vaultinit"
	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/metrics"
	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/proxy"
)

// App is a wired pgwarden. Start listens; Shutdown stops.
type App struct {
	cfg      *config.Config
	log      *slog.Logger
	verifier *authn.Verifier
	server   *proxy.Server
	reloadTo reloadTarget // server; a fake in unit tests of Reload
	metrics  *metrics.Metrics
	vault    *vault.Client
	broker   *broker.Broker
	self     *broker.Self // nil without vault.auth

	// reloader reads the configuration again for RELOAD; cfgNow is the
	// configuration in force (RELOAD replaces its pool and console parts).
	reloader atomic.Pointer[func() (*config.Config, error)]
	cfgNow   atomic.Pointer[config.Config]
	// reloadMu serializes reloads: SIGHUP and RELOAD may come together.
	reloadMu sync.Mutex
	// modes is every (database, level) routed since start, with the pool
	// mode it was routed in; guarded by reloadMu. A level keeps its mode
	// until a restart (see reloadRoutes).
	modes map[levelKey]string
	// logLevel, when set (SetLogLevel, before Start), is what a reload of
	// log_level changes.
	logLevel *slog.LevelVar
	// draining is set once Shutdown starts: /readyz reports it.
	draining atomic.Bool

	listeners []net.Listener
	httpSrv   *http.Server
	httpLn    net.Listener
	serveErr  chan error
}

// NewVaultClient returns a Vault client from VAULT_* (as the Vault CLI reads
// them) with cfg's address, when set, on top.
func NewVaultClient(cfg *config.Config) (*vault.Client, error) {
	vc := vault.DefaultConfig()
	if vc.Error != nil {
		return nil, fmt.Errorf("vault config: %w", vc.Error)
	}
	if cfg.Vault.Address != "" {
		vc.Address = cfg.Vault.Address
	}
	return vault.NewClient(vc)
}

// VerifierConfig is the token verifier's part of cfg.
func VerifierConfig(cfg *config.Config) authn.Config {
	return authn.Config{
		IssuerURL: cfg.OIDC.IssuerURL, JWKSURL: cfg.OIDC.JWKSURL, Issuer: cfg.OIDC.Issuer,
		Audiences: cfg.OIDC.Audiences, Algorithms: cfg.OIDC.Algorithms, Leeway: cfg.OIDC.Leeway.D(),
		GroupsClaim: cfg.OIDC.GroupsClaim,
	}
}

// CheckUpstreams applies the proxy's upstream policy (TLS verified off
// loopback, SCRAM) to every database's connection string, naming the field of
// the first one refused.
func CheckUpstreams(cfg *config.Config) error {
	for i, d := range cfg.Databases {
		if _, err := pool.ParseUpstream(d.Upstream, pool.UpstreamPolicy{AllowInsecure: d.AllowInsecureUpstream}); err != nil {
			return fmt.Errorf("config: databases[%d].upstream: %w", i, err)
		}
	}
	return nil
}

// New wires pgwarden. It fetches the issuer's keys, so it fails early when
// the issuer is unreachable.
func New(ctx context.Context, cfg *config.Config, log *slog.Logger) (*App, error) {
	if err := CheckUpstreams(cfg); err != nil {
		return nil, err
	}
	a := &App{cfg: cfg, log: log, serveErr: make(chan error, 4)}
	a.cfgNow.Store(cfg)
	v, err := authn.New(ctx, VerifierConfig(cfg))
	if err != nil {
		return nil, err
	}
	a.verifier = v
	grants, routes, err := routing(cfg.Databases)
	if err != nil {
		v.Close()
		return nil, err
	}
	if a.vault, err = NewVaultClient(cfg); err != nil {
		v.Close()
		return nil, err
	}
	var srv *proxy.Server
	a.metrics = metrics.New(func() []metrics.PoolSize { return poolSizes(srv) })
	if au := cfg.Vault.Auth; au.Method != "" {
		a.self, err = broker.NewSelf(ctx, a.vault, broker.SelfConfig{Method: au.Method, Mount: au.Mount,
			TokenFile: au.TokenFile, Role: au.Role, SecretFile: au.SecretFile}, log)
		if err != nil {
			v.Close()
			return nil, fmt.Errorf("vault.auth: %w", err)
		}
	}
	b, err := broker.New(broker.Config{
		Client: a.vault, Self: a.self, JWTMount: cfg.Vault.JWTMount, DatabaseMount: cfg.Vault.DatabaseMount,
		VaultTimeout: cfg.Vault.Timeout.D(), TokenGrace: cfg.TokenExpiryGrace.D(),
		ObserveVault: a.metrics.ObserveVault, ObserveLease: a.metrics.LeaseEvent, Logger: log,
	})
	if err != nil {
		a.closeSelf()
		v.Close()
		return nil, err
	}
	a.broker = b
	var tlsCfg *tls.Config
	if tlsCfg, err = loadTLS(cfg); err != nil {
		a.closeSelf()
		v.Close()
		return nil, err
	}
	srv, err = proxy.NewServer(proxy.Config{
		Verifier: timedVerifier{v: v, m: a.metrics}, Authorizer: grants, Credentials: b, Routes: routes, TLS: tlsCfg,
		TrustedNetworks: cfg.TrustedPrefixes(), AllowCleartextUntrusted: cfg.AllowCleartextUntrusted,
		AuthTimeout: cfg.AuthTimeout.D(), WriteTimeout: cfg.WriteTimeout.D(),
		MaxHandshakes: cfg.MaxHandshakes, MaxSubjectConnections: cfg.MaxSubjectConnections,
		Pool:              poolConfig(cfg),
		Console:           proxy.ConsoleConfig{Groups: cfg.Console.Groups, Settings: a.settings, Reload: a.reload},
		TokenExpiryNotice: cfg.TokenExpiryNotice.D(), TokenExpiryGrace: cfg.TokenExpiryGrace.D(),
		Observer: a.metrics, Logger: log,
	})
	if err != nil {
		a.closeSelf()
		v.Close()
		return nil, err
	}
	a.server, a.reloadTo = srv, srv
	a.readMetrics()
	a.modes = map[levelKey]string{}
	a.noteModesLocked(cfg.Databases)
	a.metrics.SetLogger(log)
	a.metrics.SetReadiness(a.readinessChecks()...)
	return a, nil
}

func (a *App) closeSelf() {
	if a.self != nil {
		_ = a.self.Close(context.Background(), false)
	}
}

// Start opens the listeners and serves in the background.
func (a *App) Start() error {
	ln, err := net.Listen("tcp", a.cfg.Listen)
	if err != nil {
		return err
	}
	a.listeners = append(a.listeners, ln)
	if a.cfg.UnixSocketDir != "" {
		port := ln.Addr().(*net.TCPAddr).Port
		path := filepath.Join(a.cfg.UnixSocketDir, ".s.PGSQL."+strconv.Itoa(port))
		_ = os.Remove(path)
		uln, err := net.Listen("unix", path)
		if err != nil {
			ln.Close()
			return err
		}
		a.listeners = append(a.listeners, uln)
	}
	for _, l := range a.listeners {
		go func() { a.serveErr <- a.server.Serve(l) }()
	}
	if a.cfg.MetricsListen != "off" {
		if a.httpLn, err = net.Listen("tcp", a.cfg.MetricsListen); err != nil {
			a.server.Close()
			return err
		}
		handler := a.metrics.Handler()
		if a.cfg.Pprof {
			mux := http.NewServeMux()
			mux.Handle("/", handler)
			mux.HandleFunc("/debug/pprof/", pprof.Index)
			mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
			mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
			mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
			handler = mux
		}
		a.httpSrv = &http.Server{Handler: handler, ReadHeaderTimeout: 5 * time.Second, WriteTimeout: metricsWriteTimeout}
		go func() { _ = a.httpSrv.Serve(a.httpLn) }()
	}
	a.log.Info("pgwarden listening", "addr", ln.Addr().String(), "metrics", a.MetricsAddr(), "tls", a.cfg.TLSCert != "")
	return nil
}

// Addr is the client TCP address.
func (a *App) Addr() string { return a.listeners[0].Addr().String() }

// MetricsAddr is the metrics address, or "" when off.
func (a *App) MetricsAddr() string {
	if a.httpLn == nil {
		return ""
	}
	return a.httpLn.Addr().String()
}

// Metrics returns the collectors.
func (a *App) Metrics() *metrics.Metrics { return a.metrics }

// Errors reports a listener that stopped serving for a reason other than shutdown.
func (a *App) Errors() <-chan error { return a.serveErr }

// How long each step of Shutdown may take after the drain; StopBudget adds
// them up for orchestrators' grace periods.
const (
	// DefaultShutdownGrace is how long `pgwarden serve` lets sessions drain
	// by default (its -shutdown-grace).
	DefaultShutdownGrace = 30 * time.Second
	// MetricsShutdownTimeout bounds the wait for the metrics listener's
	// requests in flight once the sessions are gone; those still running
	// then (a slow reader, a long /debug/pprof/profile) are cut.
	MetricsShutdownTimeout = 5 * time.Second
	// RevokeTimeout bounds the revocation of leases and Vault tokens.
	RevokeTimeout = 30 * time.Second
)

// StopBudget is the longest Shutdown takes when its ctx gives sessions grace
// to drain: give an orchestrator at least that (Kubernetes'
// terminationGracePeriodSeconds) before it kills pgwarden.
func StopBudget(grace time.Duration) time.Duration {
	return grace + MetricsShutdownTimeout + RevokeTimeout
}

// metricsWriteTimeout bounds writing one metrics response, so a client that
// reads slowly cannot hold a connection. /readyz answers within 2 s;
// net/http/pprof extends the deadline of a profile or trace by the seconds
// asked for.
const metricsWriteTimeout = 10 * time.Second

// Shutdown stops listening and waits for sessions to end until ctx is done.
// From its start /readyz answers 503 (check "proxy"); the metrics listener
// serves until the sessions are gone, then gets MetricsShutdownTimeout to
// finish its requests, and the revocations RevokeTimeout (see StopBudget).
func (a *App) Shutdown(ctx context.Context) error {
	a.draining.Store(true)
	a.metrics.RecheckReadiness()
	err := a.server.Shutdown(ctx)
	if a.httpSrv != nil {
		mctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), MetricsShutdownTimeout)
		if serr := a.httpSrv.Shutdown(mctx); serr != nil {
			_ = a.httpSrv.Close()
		}
		cancel()
	}
	a.verifier.Close()
	// The sessions are gone: the leases and Vault tokens they used can go
	// too (or are left to their TTLs, when the operator says so).
	revoke := a.cfg.Vault.RevokeOnShutdown == nil || *a.cfg.Vault.RevokeOnShutdown
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), RevokeTimeout)
	defer cancel()
	if berr := a.broker.Close(rctx, revoke); berr != nil {
		a.log.Warn("revoking leases at shutdown did not finish", "error", berr)
	}
	if a.self != nil {
		if serr := a.self.Close(rctx, revoke); serr != nil {
			a.log.Warn("revoking pgwarden's own Vault token at shutdown failed", "error", serr)
		}
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("sessions cut at shutdown: %w", err)
	}
	return err
}

// VaultSpec turns the configuration into what `vault-init` writes. password
// returns each database's admin password (from the variable its
// admin.password_env names).
func VaultSpec(cfg *config.Config, password func(envName string) string) vaultinit.Spec {
	spec := vaultinit.Spec{
		DatabaseMount: cfg.Vault.DatabaseMount, JWTMount: cfg.Vault.JWTMount,
		JWT: vaultinit.JWT{
			OIDCDiscoveryURL: cfg.OIDC.IssuerURL, JWKSURL: cfg.OIDC.JWKSURL,
			BoundIssuer: cfg.OIDC.Issuer, Audiences: cfg.OIDC.Audiences, Algorithms: cfg.OIDC.Algorithms,
		},
	}
	if spec.JWT.BoundIssuer == "" {
		spec.JWT.BoundIssuer = cfg.OIDC.IssuerURL
	}
	if cfg.Vault.JWTDiscoveryURL != "" || cfg.Vault.JWTJWKSURL != "" {
		spec.JWT.OIDCDiscoveryURL, spec.JWT.JWKSURL = cfg.Vault.JWTDiscoveryURL, cfg.Vault.JWTJWKSURL
	}
	if cfg.OIDC.GroupsClaim != "" {
		// Vault takes a JSON pointer for nested claims; pgwarden a dotted path.
		spec.JWT.GroupsClaim = cfg.OIDC.GroupsClaim
		if strings.Contains(cfg.OIDC.GroupsClaim, ".") {
			spec.JWT.GroupsClaim = "/" + strings.ReplaceAll(cfg.OIDC.GroupsClaim, ".", "/")
		}
	}
	for _, d := range cfg.Databases {
		sd := vaultinit.Database{Name: d.Name, ConnectionURL: d.Admin.ConnectionURL, Username: d.Admin.Username,
			Password: password(d.Admin.PasswordEnv)}
		for _, l := range d.Levels {
			vl := vaultinit.Level{Name: l.Name, VaultRole: l.VaultRole, Groups: l.Groups,
				CreationStatements: l.CreationStatements, RevocationStatements: l.RevocationStatements,
				DefaultTTL: l.DefaultTTL.D(), MaxTTL: l.MaxTTL.D(), Scope: l.Scope}
			if l.Static != nil {
				vl.Static, vl.StaticUsername, vl.RotationPeriod = true, l.Static.Username, l.Static.RotationPeriod.D()
			}
			sd.Levels = append(sd.Levels, vl)
		}
		spec.Databases = append(spec.Databases, sd)
	}
	return spec
}

// readinessChecks are what /readyz reports, run concurrently within its 2 s
// budget, at most once a second however many ask (metrics.ReadyCacheFor):
// the issuer's keys, Vault, each database's upstream (the set is fixed until
// a restart), and whether pgwarden still accepts connections. Each failure
// shows as a short reason; its error, with addresses, goes to the log.
func (a *App) readinessChecks() []metrics.Check {
	// The health check fails at once when Vault does not answer, rather
	// than retrying past the budget as a client's Vault call does.
	health, err := a.vault.Clone()
	if err != nil {
		health = a.vault
	} else {
		health.SetMaxRetries(0)
	}
	checks := []metrics.Check{{Name: "issuer", Run: a.issuerReady}, {Name: "vault", Run: func(ctx context.Context) error { return vaultReady(ctx, health) }}}
	dbs := slices.Clone(a.cfg.Databases)
	slices.SortFunc(dbs, func(x, y config.Database) int { return strings.Compare(x.Name, y.Name) })
	for _, d := range dbs {
		tmpl, err := pool.ParseUpstream(d.Upstream, pool.UpstreamPolicy{AllowInsecure: d.AllowInsecureUpstream})
		if err != nil {
			continue // New refused it already
		}
		checks = append(checks, metrics.Check{Name: "upstream " + d.Name, Run: func(ctx context.Context) error { return dialUpstream(ctx, tmpl) }})
	}
	return append(checks, metrics.Check{Name: "proxy", Run: func(context.Context) error {
		if a.draining.Load() {
			return metrics.Unready("shutting down", nil)
		}
		return nil
	}})
}

// issuerReady passes while the verifier holds signing keys: it keeps the
// last keys it fetched when the issuer is away, and those still verify. So
// an issuer that does not answer fails it only until the first fetch.
func (a *App) issuerReady(ctx context.Context) error {
	n, err := a.verifier.KeysLoaded(ctx)
	if err != nil {
		return metrics.Unready("keys unreadable", err)
	}
	if n == 0 {
		return metrics.Unready("no signing keys", nil)
	}
	return nil
}

// vaultReady passes while Vault answers vc, initialized and unsealed.
func vaultReady(ctx context.Context, vc *vault.Client) error {
	h, err := vc.Sys().HealthWithContext(ctx)
	if err != nil {
		return metrics.Unready("unreachable", fmt.Errorf("vault %s: %w", vc.Address(), err))
	}
	switch {
	case !h.Initialized:
		return metrics.Unready("not initialized", fmt.Errorf("vault %s is not initialized", vc.Address()))
	case h.Sealed:
		return metrics.Unready("sealed", fmt.Errorf("vault %s is sealed", vc.Address()))
	}
	return nil
}

// dialUpstream opens and closes a connection to the upstream's postmaster
// (its first host that answers, as a client would try them). It sends
// nothing, so PostgreSQL logs nothing and no credential is needed; it proves
// the server is reachable, not that a login would succeed.
func dialUpstream(ctx context.Context, tmpl *pgconn.Config) error {
	hosts := []*pgconn.FallbackConfig{{Host: tmpl.Host, Port: tmpl.Port}}
	hosts = append(hosts, tmpl.Fallbacks...)
	var errs []error
	var d net.Dialer
	for _, h := range hosts {
		network, addr := pgconn.NetworkAddress(h.Host, h.Port)
		c, err := d.DialContext(ctx, network, addr)
		if err == nil {
			return c.Close()
		}
		errs = append(errs, err)
	}
	return metrics.Unready("unreachable", errors.Join(errs...))
}
