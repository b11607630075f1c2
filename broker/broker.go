package broker

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	vault "github.com/hashicorp/vault/api"
	"golang.org/x/sync/singleflight"

	"github.com/pgwarden/pgwarden/pgerror"
)

// Default mount paths of Vault's JWT auth method and database secrets engine.
const (
	DefaultJWTMount      = "jwt"
	DefaultDatabaseMount = "database"
)

// MountPath normalizes a Vault mount path ("/jwt/" is "jwt"), or returns def
// when p is empty.
func MountPath(p, def string) string {
	if p = strings.Trim(p, "/"); p == "" {
		return def
	}
	return p
}

// Config configures a Broker.
type Config struct {
	// Client is the Vault client (address, TLS). Its token, if any, is not used
	// in jwt mode. Required.
	Client *vault.Client
	// JWTMount is the path of Vault's JWT auth method. Default "jwt".
	JWTMount string
	// DatabaseMount is the path of the database secrets engine. Default "database".
	DatabaseMount string
	// VaultTimeout bounds one Vault call. A call shared by concurrent requests
	// runs under it, detached from any one caller, so a client that gives up
	// does not fail the others waiting on the same call. Default 10s.
	VaultTimeout time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// ObserveVault, when set, is called after every Vault call with the
	// operation ("login" or "creds"), its duration and its error.
	ObserveVault func(op string, d time.Duration, err error)
	// Logger. Default slog.Default().
	Logger *slog.Logger
}

func (c *Config) checkAndSetDefaults() error {
	if c.Client == nil {
		return errors.New("broker: Config.Client is required")
	}
	c.JWTMount = MountPath(c.JWTMount, DefaultJWTMount)
	c.DatabaseMount = MountPath(c.DatabaseMount, DefaultDatabaseMount)
	if c.VaultTimeout == 0 {
		c.VaultTimeout = 10 * time.Second
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.ObserveVault == nil {
		c.ObserveVault = func(string, time.Duration, error) {}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// Request asks for credentials for one client connection.
type Request struct {
	// Token is the client's JWT. Secret: it is sent to Vault's login endpoint
	// and nowhere else.
	Token string
	// TokenExpiry is the token's exp; a cached login is not used past it.
	TokenExpiry time.Time
	// Database is the database (as clients name it) the credentials are for.
	// With VaultRole it keys the credential cache, so two routes can never
	// share a credential by accident of naming.
	Database string
	// VaultRole is the database secrets engine role to read creds for. The JWT
	// auth role has the same name.
	VaultRole string
}

// Credential is a database login issued by Vault. Password is secret.
type Credential struct {
	Username string
	Password string
	// LeaseID is Vault's lease id: loggable, not secret.
	LeaseID string
	// VaultRole is the role the credential was read for.
	VaultRole string
	// ExpiresAt is when the lease (or the Vault token that read it) ends; Vault
	// drops the database role then.
	ExpiresAt time.Time
	// RetireAt is a margin before ExpiresAt: the credential is not handed out
	// after it, and upstream connections using it must be closed by then.
	RetireAt time.Time
}

// LogValue keeps the password out of structured logs.
func (c *Credential) LogValue() slog.Value {
	return slog.GroupValue(slog.String("user", c.Username), slog.String("lease_id", c.LeaseID),
		slog.Time("expires_at", c.ExpiresAt))
}

// Broker issues credentials. It is safe for concurrent use.
type Broker struct {
	cfg Config

	loginFlight singleflight.Group
	credFlight  singleflight.Group

	mu     sync.Mutex
	logins map[[sha256.Size]byte]login // guarded by mu; keyed by hash(token, role)
	creds  map[credKey]*Credential     // guarded by mu
}

// credKey keys the credential cache: the route (database) and the Vault role.
type credKey struct{ database, role string }

type login struct {
	vaultToken string
	expiresAt  time.Time
}

// New returns a Broker.
func New(cfg Config) (*Broker, error) {
	if err := cfg.checkAndSetDefaults(); err != nil {
		return nil, err
	}
	return &Broker{cfg: cfg, logins: map[[sha256.Size]byte]login{}, creds: map[credKey]*Credential{}}, nil
}

// Credential logs in to Vault with req.Token (unless a login for it is cached)
// and returns credentials for req.VaultRole. Errors are *pgerror.Error: 42501
// when Vault refuses the token for that role, 08006 when Vault cannot be
// reached or fails; a *VaultError is in the chain when Vault answered.
func (b *Broker) Credential(ctx context.Context, req Request) (*Credential, error) {
	vt, err := b.login(ctx, req)
	if err != nil {
		return nil, err
	}
	now := b.cfg.Now()
	key := credKey{req.Database, req.VaultRole}
	b.mu.Lock()
	c := b.creds[key]
	b.mu.Unlock()
	if c != nil && now.Before(c.RetireAt) {
		return c, nil
	}
	// The leader reads with its own Vault token; followers wait for it. A
	// follower's own login above already proved Vault authorizes it.
	v, err := b.shared(ctx, &b.credFlight, req.Database+"\x00"+req.VaultRole, func(ctx context.Context) (any, error) {
		b.mu.Lock()
		c := b.creds[key]
		b.mu.Unlock()
		if c != nil && b.cfg.Now().Before(c.RetireAt) {
			return c, nil
		}
		c, err := b.readCreds(ctx, vt, req.VaultRole)
		if err != nil {
			return nil, err
		}
		b.mu.Lock()
		b.creds[key] = c
		b.mu.Unlock()
		return c, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*Credential), nil
}

// Forget drops c from the cache, if it is still the cached credential for its
// route, so the next request reads a new one. The proxy calls it when
// PostgreSQL refuses c: its lease was revoked early, or a session of the
// shared user changed its password (ALTER ROLE CURRENT_USER PASSWORD, which
// PostgreSQL allows any role). A credential that was already replaced is left
// alone, so many clients refused at once cause one new read, not many.
func (b *Broker) Forget(c *Credential) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for k, v := range b.creds {
		if v == c {
			delete(b.creds, k)
		}
	}
}

// shared runs fn once for key among concurrent callers. fn runs under a
// context detached from any caller's cancellation and bounded by
// VaultTimeout; each caller waits under its own ctx and gets its own
// cancellation (tagged 08006) when it gives up first.
func (b *Broker) shared(ctx context.Context, g *singleflight.Group, key string, fn func(context.Context) (any, error)) (any, error) {
	ch := g.DoChan(key, func() (any, error) {
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.cfg.VaultTimeout)
		defer cancel()
		return fn(fctx)
	})
	select {
	case r := <-ch:
		return r.Val, r.Err
	case <-ctx.Done():
		return nil, pgerror.Wrap(ctx.Err(), pgerror.ConnectionFailure, "timed out waiting for the credential service (Vault)")
	}
}

func loginKey(token, role string) [sha256.Size]byte {
	h := sha256.New()
	h.Write([]byte(role))
	h.Write([]byte{0})
	h.Write([]byte(token))
	var k [sha256.Size]byte
	h.Sum(k[:0])
	return k
}

// login returns a live Vault token for (req.Token, req.VaultRole).
func (b *Broker) login(ctx context.Context, req Request) (login, error) {
	key := loginKey(req.Token, req.VaultRole)
	now := b.cfg.Now()
	b.mu.Lock()
	l, ok := b.logins[key]
	b.mu.Unlock()
	if ok && now.Before(l.expiresAt) {
		return l, nil
	}
	v, err := b.shared(ctx, &b.loginFlight, string(key[:]), func(ctx context.Context) (any, error) {
		c, err := b.cfg.Client.Clone()
		if err != nil {
			return nil, pgerror.Wrap(err, pgerror.InternalError, "pgwarden internal error")
		}
		c.ClearToken()
		start := b.cfg.Now()
		sec, err := c.Logical().WriteWithContext(ctx, "auth/"+b.cfg.JWTMount+"/login",
			map[string]any{"role": req.VaultRole, "jwt": req.Token})
		b.cfg.ObserveVault("login", b.cfg.Now().Sub(start), err)
		if err != nil {
			return nil, vaultFailure("login", req.VaultRole, err)
		}
		if sec == nil || sec.Auth == nil || sec.Auth.ClientToken == "" {
			return nil, vaultFailure("login", req.VaultRole, errors.New("Vault returned no auth"))
		}
		l := login{vaultToken: sec.Auth.ClientToken, expiresAt: req.TokenExpiry}
		if sec.Auth.LeaseDuration > 0 {
			if te := start.Add(time.Duration(sec.Auth.LeaseDuration) * time.Second); te.Before(l.expiresAt) || l.expiresAt.IsZero() {
				l.expiresAt = te
			}
		}
		b.mu.Lock()
		b.pruneLoginsLocked(b.cfg.Now())
		b.logins[key] = l
		b.mu.Unlock()
		return l, nil
	})
	if err != nil {
		return login{}, err
	}
	return v.(login), nil
}

// pruneLoginsLocked drops expired logins so the cache is bounded by the number
// of live tokens.
func (b *Broker) pruneLoginsLocked(now time.Time) {
	for k, l := range b.logins {
		if !now.Before(l.expiresAt) {
			delete(b.logins, k)
		}
	}
}

func (b *Broker) readCreds(ctx context.Context, l login, role string) (*Credential, error) {
	c, err := b.cfg.Client.Clone()
	if err != nil {
		return nil, pgerror.Wrap(err, pgerror.InternalError, "pgwarden internal error")
	}
	c.SetToken(l.vaultToken)
	start := b.cfg.Now()
	sec, err := c.Logical().ReadWithContext(ctx, b.cfg.DatabaseMount+"/creds/"+role)
	b.cfg.ObserveVault("creds", b.cfg.Now().Sub(start), err)
	if err != nil {
		return nil, vaultFailure("creds", role, err)
	}
	if sec == nil || sec.Data == nil {
		return nil, vaultFailure("creds", role, errors.New("Vault returned no data"))
	}
	user, _ := sec.Data["username"].(string)
	pass, _ := sec.Data["password"].(string)
	if user == "" || pass == "" {
		return nil, vaultFailure("creds", role, errors.New("Vault returned no username or password"))
	}
	exp := l.expiresAt
	if sec.LeaseDuration > 0 {
		if le := start.Add(time.Duration(sec.LeaseDuration) * time.Second); le.Before(exp) {
			exp = le
		}
	}
	cred := &Credential{Username: user, Password: pass, LeaseID: sec.LeaseID, VaultRole: role, ExpiresAt: exp,
		RetireAt: exp.Add(-margin(exp.Sub(start)))}
	b.cfg.Logger.Debug("vault issued credentials", "role", role, "credential", cred)
	return cred, nil
}

// margin is how long before a credential's end it stops being handed out and
// its connections are closed: a tenth of its life, between 1s and 1m.
func margin(life time.Duration) time.Duration {
	return min(max(life/10, time.Second), time.Minute)
}

// VaultError is a failed Vault call. Messages are Vault's own error strings,
// which never hold a token or password but may name roles, claims and their
// bound values: they go to pgwarden's log, never to a client.
type VaultError struct {
	Op         string // "login" or "creds"
	Role       string
	StatusCode int // 0 when Vault was not reached
	Messages   []string
	Err        error
}

func (e *VaultError) Error() string {
	if e.StatusCode == 0 {
		return fmt.Sprintf("vault %s %s: %v", e.Op, e.Role, e.Err)
	}
	return fmt.Sprintf("vault %s %s: HTTP %d: %s", e.Op, e.Role, e.StatusCode, strings.Join(e.Messages, "; "))
}

func (e *VaultError) Unwrap() error { return e.Err }

// Denied reports whether Vault answered and refused (4xx).
func (e *VaultError) Denied() bool { return e.StatusCode >= 400 && e.StatusCode < 500 }

func vaultFailure(op, role string, err error) error {
	ve := &VaultError{Op: op, Role: role, Err: err}
	var re *vault.ResponseError
	if errors.As(err, &re) {
		ve.StatusCode = re.StatusCode
		ve.Messages = re.Errors
	}
	if ve.Denied() {
		// Vault's reasons (which claim did not match which binding) are for
		// the operator's log; the client learns what to do about it.
		e := pgerror.New(pgerror.InsufficientPrivilege, "the credential service (Vault) refused this token for the access level asked for")
		e.Err = ve
		return e.WithHint("Vault's role bindings for the level decide, and refused this token; ask pgwarden's operator, who sees the reason in pgwarden's log.")
	}
	e := pgerror.New(pgerror.ConnectionFailure, "credential service (Vault) is unavailable")
	e.Err = ve
	return e
}
