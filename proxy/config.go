package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/pool"
)

// TokenVerifier turns the password a client sent into an Identity. *authn.Verifier
// implements it. Refusals should carry a SQLSTATE (28P01) via pgerror.
type TokenVerifier interface {
	Verify(ctx context.Context, token string) (*authn.Identity, error)
}

// Authorizer decides the access level an Identity gets on a database when it
// connects as user. *authn.Grants implements it.
type Authorizer interface {
	Decide(id *authn.Identity, database, user string) (string, error)
}

// CredentialSource issues database credentials. *broker.Broker implements it.
type CredentialSource interface {
	Credential(ctx context.Context, req broker.Request) (*broker.Credential, error)
	// Forget drops a credential PostgreSQL refused, so the next request
	// gets another.
	Forget(c *broker.Credential)
}

// Observer receives events for metrics. Implementations must be fast and
// safe for concurrent use. *metrics.Metrics implements it.
type Observer interface {
	// ClientConnected and ClientClosed bracket every accepted connection.
	ClientConnected()
	ClientClosed()
	// AuthResult reports the end of one authentication: result is "ok" or a
	// short bounded reason. database and level are empty when not yet known.
	AuthResult(database, level, result string)
	// PoolWaited reports a client that had to queue for an upstream
	// connection of (database, level), when its wait ends (served or not).
	// Clients served at once are not reported.
	PoolWaited(database, level string, d time.Duration)
	// CancelRequest reports one CancelRequest: result is CancelForwarded,
	// CancelUnknown or CancelFailed.
	CancelRequest(result string)
}

// Route says where one database goes.
type Route struct {
	// Upstream is a PostgreSQL connection string (keyword/value or URL) without
	// user or password: host, port, dbname, sslmode and the like.
	Upstream string
	// VaultRoles maps each access level to the Vault role that issues its credentials.
	VaultRoles map[string]string
	// Scopes maps each access level to who shares its credentials
	// (broker.ScopeIdentity, the default, or broker.ScopeRole).
	Scopes map[string]string
	// Static marks the levels whose credentials come from a Vault static
	// role (<mount>/static-creds/<role>).
	Static map[string]bool
	// Modes maps each access level to its pool mode, PoolSession (the
	// default) or PoolTransaction.
	Modes map[string]string
	// Policy is what pool.ParseUpstream enforces on Upstream (TLS, SCRAM).
	Policy pool.UpstreamPolicy
}

// Pool modes: how long a client holds an upstream session.
const (
	// PoolSession lends a client a session from its first message to its
	// disconnect.
	PoolSession = "session"
	// PoolTransaction lends a client a session from the first message of a
	// transaction to the ReadyForQuery that ends it.
	PoolTransaction = "transaction"
)

// Config configures a Server.
type Config struct {
	// Verifier, Authorizer and Credentials are required. Reconfigure may
	// replace Authorizer.
	Verifier    TokenVerifier
	Authorizer  Authorizer
	Credentials CredentialSource
	// Routes maps database names (as clients ask for them) to upstreams. Required.
	// The set of databases and their upstreams are fixed for the Server's
	// life; Reconfigure may replace the rest (levels, roles, scopes, modes).
	Routes map[string]Route
	// TLS, when set, is offered to clients (SSLRequest and direct TLS). nil
	// answers SSLRequest with 'N'. Reconfigure may replace it.
	TLS *tls.Config
	// TrustedNetworks are where a client may send its token without TLS.
	// Default loopback (127.0.0.0/8, ::1). Unix sockets are always trusted.
	TrustedNetworks []netip.Prefix
	// AllowCleartextUntrusted lets clients outside TrustedNetworks send their
	// token without TLS. Default false: they are refused before being asked.
	AllowCleartextUntrusted bool
	// AuthTimeout is the total time from accept to AuthenticationOk. Default 30s.
	AuthTimeout time.Duration
	// MaxTokenBytes caps the password message. Default 64 KiB.
	MaxTokenBytes int
	// MaxHandshakes caps connections that are authenticating at once (from
	// accept to AuthenticationOk); more are refused at once with 53300, before
	// anything is read or allocated for them. Default 1000.
	MaxHandshakes int
	// MaxSubjectConnections caps the sessions one token subject may hold at
	// once; more are refused with 53300. Default 0: no cap.
	MaxSubjectConnections int
	// WriteTimeout bounds every write to a client or an upstream: a peer that
	// takes no bytes for this long is cut and what the session held is freed.
	// Default 60s.
	WriteTimeout time.Duration
	// TokenExpiryNotice is how long before the client's token expires its
	// session gets a NOTICE. Default 1m.
	TokenExpiryNotice time.Duration
	// TokenExpiryGrace is how long past its token's expiry a session inside a
	// transaction may run to finish it; then it is cut. Default 1m.
	TokenExpiryGrace time.Duration
	// Pool limits and timers; see pool.Config.
	Pool pool.Config
	// Console opens the admin database "pgwarden"; see ConsoleConfig.
	Console ConsoleConfig
	// Observer receives metric events. Default: none.
	Observer Observer
	// Logger. Default slog.Default().
	Logger *slog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

func (c *Config) checkAndSetDefaults() error {
	if c.Verifier == nil || c.Authorizer == nil || c.Credentials == nil {
		return errors.New("proxy: Verifier, Authorizer and Credentials are required")
	}
	if len(c.Routes) == 0 {
		return errors.New("proxy: at least one route is required")
	}
	if _, ok := c.Routes[ConsoleDatabase]; ok {
		return fmt.Errorf("proxy: database %q is the admin console's name", ConsoleDatabase)
	}
	if c.TrustedNetworks == nil {
		c.TrustedNetworks = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	}
	if c.AuthTimeout == 0 {
		c.AuthTimeout = 30 * time.Second
	}
	if c.MaxTokenBytes == 0 {
		c.MaxTokenBytes = 64 << 10
	}
	if c.MaxHandshakes == 0 {
		c.MaxHandshakes = 1000
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = 60 * time.Second
	}
	if c.TokenExpiryNotice == 0 {
		c.TokenExpiryNotice = time.Minute
	}
	if c.TokenExpiryGrace == 0 {
		c.TokenExpiryGrace = time.Minute
	}
	if err := c.Pool.CheckAndSetDefaults(); err != nil {
		return fmt.Errorf("proxy: %w", err)
	}
	if c.MaxHandshakes < 1 || c.MaxSubjectConnections < 0 {
		return fmt.Errorf("proxy: connection limits must be positive")
	}
	for _, d := range []time.Duration{c.AuthTimeout, c.WriteTimeout, c.TokenExpiryNotice, c.TokenExpiryGrace} {
		if d < 0 {
			return fmt.Errorf("proxy: negative duration %v", d)
		}
	}
	if c.Observer == nil {
		c.Observer = nopObserver{}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	c.TLS = clientTLS(c.TLS)
	return nil
}

// clientTLS is t as offered to clients: a copy, with ALPN "postgresql" (which
// direct TLS requires) and TLS 1.2 at least unless t says otherwise. nil
// stays nil (no TLS).
func clientTLS(t *tls.Config) *tls.Config {
	if t == nil {
		return nil
	}
	t = t.Clone()
	t.NextProtos = []string{"postgresql"}
	if t.MinVersion == 0 {
		t.MinVersion = tls.VersionTLS12
	}
	return t
}

// trusted reports whether a client at addr may send a token without TLS.
func (c *Config) trusted(addr net.Addr) bool {
	switch a := addr.(type) {
	case *net.UnixAddr:
		return true
	case *net.TCPAddr:
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			return false
		}
		ip = ip.Unmap()
		for _, p := range c.TrustedNetworks {
			if p.Contains(ip) {
				return true
			}
		}
	}
	return false
}

type nopObserver struct{}

func (nopObserver) ClientConnected()                         {}
func (nopObserver) ClientClosed()                            {}
func (nopObserver) AuthResult(string, string, string)        {}
func (nopObserver) PoolWaited(string, string, time.Duration) {}
func (nopObserver) CancelRequest(string)                     {}
