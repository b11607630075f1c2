package broker

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"time"

	vault "github.com/hashicorp/vault/api"
	"golang.org/x/sync/errgroup"
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

// Sharing scopes of a credential (see the package doc).
const (
	ScopeIdentity = "identity"
	ScopeRole     = "role"
)

// Config configures a Broker.
type Config struct {
	// Client is the Vault client (address, TLS). Its token, if any, is not
	// used: logins use the client's token, role-scoped reads use Self.
	// Required.
	Client *vault.Client
	// Self is pgwarden's own Vault identity, which reads, renews and revokes
	// role-scoped leases. nil: requests in role scope are refused.
	Self *Self
	// JWTMount is the path of Vault's JWT auth method. Default "jwt".
	JWTMount string
	// DatabaseMount is the path of the database secrets engine. Default "database".
	DatabaseMount string
	// VaultTimeout bounds one Vault call. A call shared by concurrent requests
	// runs under it, detached from any one caller, so a client that gives up
	// does not fail the others waiting on the same call. Default 10s.
	VaultTimeout time.Duration
	// TokenGrace is how long past the expiry of the token that read it an
	// identity-scoped lease lives, so a session inside a transaction when its
	// token expires may finish it. Default 1m.
	TokenGrace time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// ObserveVault, when set, is called after every Vault call with the
	// operation ("login", "creds", "revoke"; "renew" only when a renewal
	// fails, with a negative duration: vault/api's LifetimeWatcher makes
	// those calls and does not time them), its duration and its error.
	ObserveVault func(op string, d time.Duration, err error)
	// ObserveLease, when set, is called for each event in a lease's life:
	// LeaseIssued, LeaseRenewed, then, once pgwarden lets it go, LeaseRevoked
	// or LeaseExpired. Each lease is issued once and let go once: by the
	// time Close returns (unless its ctx ended first), issued = revoked +
	// expired. It is never called with the broker's lock held, and must be
	// fast.
	ObserveLease func(event string)
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
	if c.TokenGrace == 0 {
		c.TokenGrace = time.Minute
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.ObserveVault == nil {
		c.ObserveVault = func(string, time.Duration, error) {}
	}
	if c.ObserveLease == nil {
		c.ObserveLease = func(string) {}
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
	// Subject is the token's subject: in identity scope, whose lease it is.
	Subject string
	// Database is the database (as clients name it) the credentials are for.
	// With VaultRole (and the subject, in identity scope) it keys the
	// credential cache, so two routes never share a credential by accident
	// of naming.
	Database string
	// VaultRole is the database secrets engine role to read creds for. The JWT
	// auth role has the same name.
	VaultRole string
	// Scope is ScopeIdentity (the default) or ScopeRole.
	Scope string
	// Static reads VaultRole's static credentials (<mount>/static-creds/):
	// one existing database user whose password Vault rotates. Role scope
	// only.
	Static bool
}

// Credential is a database login issued by Vault, and the lease behind it.
// Password is secret. Its life (Retired, Ended, OnRetire, OnEnd, Hold,
// Release) is in lease.go.
type Credential struct {
	Username string
	Password string
	// LeaseID is Vault's lease id: loggable, not secret.
	LeaseID string
	// VaultRole is the role the credential was read for.
	VaultRole string
	// Scope is who shares it; Subject, in identity scope, is whose it is.
	Scope   string
	Subject string
	// Static: a static role's user, whose password Vault rotates. It is
	// superseded after each rotation (new sessions read the new password)
	// but never retires or ends: sessions already open are not affected.
	Static bool

	lease *lease
	key   credKey
	by    *login // identity scope: the login that read it
}

// LogValue keeps the password out of structured logs.
func (c *Credential) LogValue() slog.Value {
	return slog.GroupValue(slog.String("user", c.Username), slog.String("lease_id", c.LeaseID),
		slog.String("scope", c.Scope), slog.Time("expires_at", c.ExpiresAt()))
}

// Broker issues credentials and owns their leases: it is the lease registry
// (lease → credential → the upstream connections holding it). It is safe for
// concurrent use.
type Broker struct {
	cfg Config

	loginFlight singleflight.Group
	credFlight  singleflight.Group

	mu     sync.Mutex
	logins map[[sha256.Size]byte]*login // guarded by mu; usable logins, keyed by hash(token, role)
	// tokens are the Vault tokens of client logins not yet revoked, whether
	// still usable or waiting for their last lease to finish; guarded by mu.
	tokens map[*login]struct{}
	creds  map[credKey]*Credential  // guarded by mu; the credential new sessions of a key get
	live   map[*Credential]struct{} // guarded by mu; every lease not yet finished
	closed bool                     // guarded by mu
	wg     sync.WaitGroup           // revocations and renewal loops in flight
}

// credKey keys the credential cache: the route (database), the Vault role,
// in identity scope the subject, and whether the role is static.
type credKey struct {
	database, role, subject string
	static                  bool
}

// login is one client token's Vault login. Its Vault token is revoked when
// it has expired and no lease it read is held any more.
type login struct {
	key        [sha256.Size]byte
	vaultToken string
	// expiresAt is the earlier of the client token's exp and the Vault
	// token's end; vaultEnd is the Vault token's end alone.
	expiresAt time.Time
	vaultEnd  time.Time
	// Guarded by Broker.mu.
	leases  int  // leases it read that have not finished
	expired bool // past expiresAt, or refused by Vault
	timer   *time.Timer
	// pendingEnds are the Vault ends of leases it read that have finished
	// and go with its Vault token: settle reports them.
	pendingEnds []time.Time
	// settled is set once its Vault token is revoked, or known not to be
	// (the revocation failed, or none was made at a stop); settleErr is nil
	// when it was revoked. A lease of it that finishes after that is
	// reported at once by the same outcome.
	settled   bool
	settleErr error
}

// New returns a Broker.
func New(cfg Config) (*Broker, error) {
	if err := cfg.checkAndSetDefaults(); err != nil {
		return nil, err
	}
	return &Broker{cfg: cfg, logins: map[[sha256.Size]byte]*login{}, tokens: map[*login]struct{}{},
		creds: map[credKey]*Credential{}, live: map[*Credential]struct{}{}}, nil
}

var errClosed = pgerror.New(pgerror.AdminShutdown, "pgwarden is shutting down")

var errTokenExpired = &pgerror.Error{Code: pgerror.InvalidPassword, Message: "token rejected: it has expired",
	Hint: "Send a current token from the configured identity provider as the password."}

// Credential logs in to Vault with req.Token (unless a login for it is
// cached), which proves Vault lets this identity have req.VaultRole, and
// returns a credential for it: in identity scope one read with that login
// and shared by that subject's sessions; in role scope one read by
// pgwarden's own identity and shared by everyone on the role. Errors are
// *pgerror.Error: 42501 when Vault refuses the token for that role, 08006
// when Vault cannot be reached or fails; a *VaultError is in the chain when
// Vault answered. A cached login Vault no longer honours (revoked behind
// pgwarden's back) is dropped and the request retried once with a fresh one.
func (b *Broker) Credential(ctx context.Context, req Request) (*Credential, error) {
	if req.Scope == "" {
		req.Scope = ScopeIdentity
	}
	if req.Static && req.Scope != ScopeRole {
		return nil, pgerror.New(pgerror.ConfigurationFileError, "a static role's credential is shared by everyone: its level must use role scope")
	}
	if req.Scope == ScopeRole && b.cfg.Self == nil {
		return nil, pgerror.New(pgerror.ConfigurationFileError, "this access level shares one credential per role, but pgwarden has no Vault identity of its own (vault.auth)")
	}
	for attempt := 0; ; attempt++ {
		if !req.TokenExpiry.IsZero() && !req.TokenExpiry.After(b.cfg.Now().Add(time.Second)) {
			// Expired (or about to, say while Vault answered the last
			// call): a login or lease now would end at once.
			return nil, errTokenExpired
		}
		l, cached, err := b.login(ctx, req)
		if err != nil {
			return nil, err
		}
		if req.Scope == ScopeRole {
			return b.roleCredential(ctx, req)
		}
		c, err := b.identityCredential(ctx, req, l)
		var ve *VaultError
		if attempt == 0 && cached && errors.As(err, &ve) && ve.StatusCode == 403 {
			b.cfg.Logger.Warn("Vault refused a cached login (revoked?); logging in again", "role", req.VaultRole, "error", ve)
			b.dropLogin(l)
			continue
		}
		return c, err
	}
}

// identityCredential returns the subject's credential: the cached one if
// the login that read it lasts about as long as l (within reuseSlack), or
// a new one read with l. A lease lives no longer than the login (and so the
// token) that read it; a session of a later token that lands on it ends, at
// an idle point, up to reuseSlack before its own token would have made it,
// and reconnects onto a newer lease — the price of not reading a lease for
// every new token of a client that fetches one per connection.
func (b *Broker) identityCredential(ctx context.Context, req Request, l *login) (*Credential, error) {
	key := credKey{database: req.Database, role: req.VaultRole, subject: req.Subject}
	usable := func(c *Credential) bool {
		if c == nil || c.Stale() {
			return false
		}
		return c.by == l || !c.by.expiresAt.Before(l.expiresAt.Add(-reuseSlack(b.cfg.Now(), l.expiresAt)))
	}
	b.mu.Lock()
	c := b.creds[key]
	b.mu.Unlock()
	if usable(c) {
		return c, nil
	}
	// Concurrent first requests of a subject share one read, whoever leads;
	// one whose token outlives the leader's login reads its own.
	for _, fk := range []string{flightKey(key, nil), flightKey(key, l)} {
		v, err := b.shared(ctx, &b.credFlight, fk, func(ctx context.Context) (any, error) {
			b.mu.Lock()
			c := b.creds[key]
			b.mu.Unlock()
			if usable(c) {
				return c, nil
			}
			vc, err := b.cfg.Client.Clone()
			if err != nil {
				return nil, pgerror.Wrap(err, pgerror.InternalError, "pgwarden internal error")
			}
			vc.SetToken(l.vaultToken)
			return b.read(ctx, vc, key, ScopeIdentity, l)
		})
		if err != nil {
			return nil, err
		}
		if c := v.(*Credential); usable(c) {
			return c, nil
		}
	}
	return nil, pgerror.New(pgerror.ConnectionFailure, "the credential service (Vault) issued a credential that retired at once").
		WithHint("Try again; pgwarden's operator sees the details in its log.")
}

// roleCredential returns the role's shared credential, read by pgwarden's
// own identity when there is none that has not retired.
func (b *Broker) roleCredential(ctx context.Context, req Request) (*Credential, error) {
	for attempt := 0; ; attempt++ {
		c, err := b.roleCredentialOnce(ctx, req)
		var ve *VaultError
		if errors.As(err, &ve) && ve.Denied() {
			// The read is pgwarden's own, not the client's: a refusal is
			// pgwarden's problem (its token revoked or its policy wrong).
			e := pgerror.New(pgerror.ConnectionFailure, "the credential service (Vault) refused pgwarden's own identity")
			e.Err = ve
			return nil, e.WithHint("Try again in a moment; if it persists, pgwarden's operator sees the reason in its log.")
		}
		if err != nil || !c.Stale() {
			return c, err
		}
		if attempt > 0 {
			return nil, pgerror.New(pgerror.ConnectionFailure, "the credential service (Vault) issued a credential that retired at once").
				WithHint("Try again; pgwarden's operator sees the details in its log.")
		}
		// Read in the moment pgwarden's token was being replaced: read again.
	}
}

func (b *Broker) roleCredentialOnce(ctx context.Context, req Request) (*Credential, error) {
	key := credKey{database: req.Database, role: req.VaultRole, static: req.Static}
	b.mu.Lock()
	c := b.creds[key]
	b.mu.Unlock()
	if c != nil && !c.Stale() {
		return c, nil
	}
	v, err := b.shared(ctx, &b.credFlight, flightKey(key, nil), func(ctx context.Context) (any, error) {
		b.mu.Lock()
		c := b.creds[key]
		b.mu.Unlock()
		if c != nil && !c.Stale() {
			return c, nil
		}
		vc, ep, err := b.cfg.Self.clientAndEpoch()
		if err != nil {
			return nil, err
		}
		cred, err := b.read(ctx, vc, key, ScopeRole, nil)
		var ve *VaultError
		if errors.As(err, &ve) && ve.StatusCode == 403 {
			// pgwarden's own token was refused: revoked (Self logs in again
			// now, rather than when it would next renew), or a policy gap.
			b.cfg.Logger.Warn("Vault refused a read with pgwarden's own token", "error", ve)
			b.cfg.Self.refused(vc.Token())
		}
		if err != nil || ep == nil {
			return cred, err
		}
		// Vault ends a token's leases with it: when the token that read this
		// one will be renewed no further, the lease retires, and ends no
		// later than the token.
		cred.lease.onFinish(context.AfterFunc(ep.ctx, func() {
			if end := ep.endsAt(); !end.IsZero() {
				cred.lease.capEnd(b.cfg.Now(), end)
			}
			cred.lease.doRetire()
		}))
		return cred, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*Credential), nil
}

// reuseSlack is how much sooner than a login's end the lease it may reuse
// may end: a tenth of the login's remaining life, 1s to 5m.
func reuseSlack(now, end time.Time) time.Duration {
	return min(max(end.Sub(now)/10, time.Second), 5*time.Minute)
}

func flightKey(k credKey, l *login) string {
	s := fmt.Sprintf("%s\x00%s\x00%s\x00%v", k.database, k.role, k.subject, k.static)
	if l != nil {
		s += "\x00" + string(l.key[:])
	}
	return s
}

// Forget supersedes c: it drops it from the cache, if it is still the
// cached credential for its key, so the next request reads a new one, and
// it is not handed out again; its open sessions carry on. The proxy calls it
// when PostgreSQL refuses c for a new session: its lease was revoked early,
// or a session of the shared user changed its password (ALTER ROLE
// CURRENT_USER PASSWORD, which PostgreSQL allows any role) — which must not
// let one user end everybody's sessions. A credential that was already
// replaced is left in place, so many clients refused at once cause one new
// read, not many.
func (b *Broker) Forget(c *Credential) {
	b.mu.Lock()
	if b.creds[c.key] == c {
		delete(b.creds, c.key)
	}
	b.mu.Unlock()
	c.lease.supersede()
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

// login returns a live Vault login for (req.Token, req.VaultRole), and
// whether it came from the cache.
func (b *Broker) login(ctx context.Context, req Request) (*login, bool, error) {
	key := loginKey(req.Token, req.VaultRole)
	now := b.cfg.Now()
	b.mu.Lock()
	l := b.logins[key]
	b.mu.Unlock()
	if l != nil && now.Before(l.expiresAt) {
		return l, true, nil
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
		l := &login{key: key, vaultToken: sec.Auth.ClientToken, expiresAt: req.TokenExpiry}
		if sec.Auth.LeaseDuration > 0 {
			l.vaultEnd = start.Add(time.Duration(sec.Auth.LeaseDuration) * time.Second)
			if l.vaultEnd.Before(l.expiresAt) || l.expiresAt.IsZero() {
				l.expiresAt = l.vaultEnd
			}
		}
		b.mu.Lock()
		defer b.mu.Unlock()
		if b.closed {
			go b.revokeToken(context.Background(), l)
			return nil, errClosed
		}
		b.logins[key] = l
		b.tokens[l] = struct{}{}
		l.timer = time.AfterFunc(l.expiresAt.Sub(b.cfg.Now()), func() { b.dropLogin(l) })
		return l, nil
	})
	if err != nil {
		return nil, false, err
	}
	return v.(*login), false, nil
}

// dropLogin takes l out of use (it expired, or Vault refused it) and revokes
// its Vault token once no lease it read is held.
func (b *Broker) dropLogin(l *login) {
	b.mu.Lock()
	if b.logins[l.key] == l {
		delete(b.logins, l.key)
	}
	l.expired = true
	l.timer.Stop()
	revoke := l.leases == 0 && b.takeTokenLocked(l)
	b.mu.Unlock()
	if revoke {
		go func() { defer b.wg.Done(); b.revokeToken(context.Background(), l) }()
	}
}

// takeTokenLocked takes l's Vault token from the broker's set for its
// revocation, reporting whether it was there (else Close, or another
// revocation, has it). While it is there the broker is not closed (Close
// empties the set), so the revocation is counted in wg here, under the same
// lock, and Close waits for it: it cannot be dropped between the two.
func (b *Broker) takeTokenLocked(l *login) bool {
	if _, ok := b.tokens[l]; !ok {
		return false
	}
	delete(b.tokens, l)
	b.wg.Add(1)
	return true
}

// read reads a credential for key with vc and registers its lease.
func (b *Broker) read(ctx context.Context, vc *vault.Client, key credKey, scope string, by *login) (*Credential, error) {
	start := b.cfg.Now()
	path := b.cfg.DatabaseMount + "/creds/" + key.role
	if key.static {
		path = b.cfg.DatabaseMount + "/static-creds/" + key.role
	}
	sec, err := vc.Logical().ReadWithContext(ctx, path)
	b.cfg.ObserveVault("creds", b.cfg.Now().Sub(start), err)
	if err != nil {
		return nil, vaultFailure("creds", key.role, err)
	}
	if sec == nil || sec.Data == nil {
		return nil, vaultFailure("creds", key.role, errors.New("Vault returned no data"))
	}
	user, _ := sec.Data["username"].(string)
	pass, _ := sec.Data["password"].(string)
	if user == "" || pass == "" {
		return nil, vaultFailure("creds", key.role, errors.New("Vault returned no username or password"))
	}
	c := &Credential{Username: user, Password: pass, LeaseID: sec.LeaseID, VaultRole: key.role,
		Scope: scope, Subject: key.subject, Static: key.static, key: key, by: by}
	retireAt, endAt := b.times(start, sec.LeaseDuration, by)
	var rotatedAt time.Time
	if key.static {
		rotatedAt = staticRotation(start, sec.Data["ttl"])
		retireAt, endAt = start.Add(100*365*24*time.Hour), start.Add(100*365*24*time.Hour)
	}
	var authUntil time.Time
	if by != nil {
		authUntil = by.expiresAt
	}
	c.lease = newLease(b.cfg.Now(), retireAt, endAt, authUntil, b.cfg.TokenGrace, func() { b.finished(c) })
	if key.static {
		// New sessions read the new password after Vault's rotation; open
		// ones are not touched by it.
		t := time.AfterFunc(rotatedAt.Sub(b.cfg.Now()), c.lease.supersede)
		c.lease.onFinish(t.Stop)
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		c.lease.doEnd()
		return nil, errClosed
	}
	b.creds[key] = c
	b.live[c] = struct{}{}
	if by != nil {
		by.leases++
	}
	b.mu.Unlock()
	b.cfg.ObserveLease(LeaseIssued)
	if sec.Renewable && sec.LeaseID != "" && !key.static {
		b.watch(vc, sec, c)
	}
	b.cfg.Logger.Debug("vault issued credentials", "role", key.role, "credential", c)
	return c, nil
}

// times computes Vault's bound on a lease of leaseSeconds from start: it
// ends with the lease or with the Vault token that read it, whichever comes
// first, and retires a margin (and up to half as much again, at random)
// before. (The client's bound, identity scope, is the lease's authUntil.)
func (b *Broker) times(start time.Time, leaseSeconds int, by *login) (retireAt, endAt time.Time) {
	var vaultEnd time.Time
	if leaseSeconds > 0 {
		vaultEnd = start.Add(time.Duration(leaseSeconds) * time.Second)
	}
	if by != nil && !by.vaultEnd.IsZero() && (vaultEnd.IsZero() || by.vaultEnd.Before(vaultEnd)) {
		vaultEnd = by.vaultEnd
	}
	if vaultEnd.IsZero() {
		vaultEnd = start.Add(100 * 365 * 24 * time.Hour) // Vault set no end
	}
	// Jitter: leases read together (a thousand pools at start) do not all
	// retire, and so get re-read, in the same second.
	m := margin(vaultEnd.Sub(start))
	return vaultEnd.Add(-m - rand.N(m/2+1)), vaultEnd
}

// staticRotation is a moment after Vault's next rotation of a static
// role's password (ttl, in seconds, is the time to it): its credential is
// superseded then, so new sessions read the new password, and never retires
// or ends — a rotation does not touch sessions already open. A session
// opened in the moment between rotation and then is refused by PostgreSQL
// (28P01), and the proxy forgets the credential and reads it again.
func staticRotation(start time.Time, ttl any) time.Time {
	var secs int64
	switch v := ttl.(type) {
	case json.Number:
		secs, _ = v.Int64()
	case float64:
		secs = int64(v)
	}
	return start.Add(time.Duration(max(secs, 0))*time.Second + staticSlack)
}

// staticSlack is how long after a static role's scheduled rotation its
// credential retires: Vault's rotation runs a moment after the ttl it
// reported reaches zero.
const staticSlack = 2 * time.Second

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// watch renews c's lease with vault/api's LifetimeWatcher until it retires
// or finishes. When renewal can extend it no further the lease retires (new
// sessions get a new one; old ones end at their next idle point); when Vault
// says the lease is gone (revoked behind pgwarden's back) it retires at
// once; when Vault cannot be reached renewal is tried again with backoff
// and jitter, the lease serving out the time it has meanwhile.
func (b *Broker) watch(vc *vault.Client, sec *vault.Secret, c *Credential) {
	if !b.track(1) {
		return
	}
	quit := make(chan struct{}) // closed when the lease finishes
	c.lease.onFinish(func() bool { close(quit); return true })
	go func() {
		defer b.wg.Done()
		for attempt := 0; ; attempt++ {
			w, err := vc.NewLifetimeWatcher(&vault.LifetimeWatcherInput{Secret: sec, RenewBehavior: vault.RenewBehaviorErrorOnErrors})
			if err != nil || !b.track(1) {
				return
			}
			go func() { defer b.wg.Done(); w.Start() }()
			stopped, renewed, err := b.follow(w, c, quit)
			w.Stop()
			if renewed {
				attempt = 0
			}
			var re *vault.ResponseError
			switch {
			case stopped:
				return
			case err == nil:
				b.cfg.Logger.Info("lease cannot be renewed further; new sessions get a new credential", "credential", c)
				c.lease.doRetire()
				return
			case errors.As(err, &re) && re.StatusCode >= 400 && re.StatusCode < 500:
				b.cfg.ObserveVault("renew", -1, err)
				b.cfg.Logger.Warn("Vault no longer knows the lease (revoked?); retiring its sessions", "credential", c, "error", err)
				b.Forget(c)
				c.lease.doRetire()
				return
			}
			// Vault away: try again, with backoff and jitter, while the
			// lease lives; it serves until its end meanwhile.
			b.cfg.ObserveVault("renew", -1, err)
			d := Backoff(attempt)
			b.cfg.Logger.Warn("lease renewal failed; retrying", "credential", c, "error", err, "in", d)
			t := time.NewTimer(d)
			select {
			case <-quit:
			case <-c.lease.retireCtx.Done():
			case <-t.C:
				continue
			}
			t.Stop()
			return
		}
	}()
}

// follow applies w's renewals to c until w stops (its error), the lease
// retires or finishes (stopped), reporting whether any renewal succeeded.
func (b *Broker) follow(w *vault.LifetimeWatcher, c *Credential, quit <-chan struct{}) (stopped, renewed bool, err error) {
	for {
		select {
		case <-quit:
			return true, renewed, nil
		case <-c.lease.retireCtx.Done():
			return true, renewed, nil
		case r := <-w.RenewCh():
			retireAt, endAt := b.times(r.RenewedAt, r.Secret.LeaseDuration, c.by)
			c.lease.renewed(b.cfg.Now(), retireAt, endAt)
			renewed = true
			b.cfg.ObserveLease(LeaseRenewed)
			b.cfg.Logger.Debug("renewed lease", "credential", c)
		case err := <-w.DoneCh():
			return false, renewed, err
		}
	}
}

// finished is called once when c has retired and no connection holds it:
// a role-scoped lease is revoked by pgwarden's identity; an identity-scoped
// one is let go, and its login's Vault token revoked (and the lease with it)
// once that login has expired and none of its leases is held.
//
// Each lease it registered is reported revoked or expired exactly once:
// here, by the revocation this starts, or by Close when Close took the
// lease over first (it is then no longer live here).
func (b *Broker) finished(c *Credential) {
	vaultEnd := c.lease.vaultEndAt()
	b.mu.Lock()
	if b.creds[c.key] == c {
		delete(b.creds, c.key)
	}
	if _, live := b.live[c]; !live {
		// Close took it over, or it was never registered (read while
		// closing): Close accounts for it.
		b.mu.Unlock()
		return
	}
	delete(b.live, c)
	var revokeLogin *login
	var goneWith error // its login's settled outcome, when it has one
	settled := false
	if l := c.by; l != nil {
		l.leases--
		if l.settled {
			settled, goneWith = true, l.settleErr
		} else {
			l.pendingEnds = append(l.pendingEnds, vaultEnd) // revoked with its token
		}
		if l.expired && l.leases == 0 && b.takeTokenLocked(l) {
			revokeLogin = l
		}
	}
	revokeRole := c.by == nil && c.Scope == ScopeRole && !c.Static
	if revokeRole {
		b.wg.Add(1) // not closed: c was live
	}
	b.mu.Unlock()
	switch {
	case revokeLogin != nil:
		go func() { defer b.wg.Done(); b.revokeToken(context.Background(), revokeLogin) }()
	case settled:
		// Its login's token was revoked (or given up on) already, and the
		// lease went (or goes) with it.
		b.observeGone(vaultEnd, goneWith)
	case revokeRole:
		go func() { defer b.wg.Done(); b.revokeLease(context.Background(), c) }()
	case c.Static:
		// Nothing to revoke: Vault rotated the static role's password.
		b.cfg.ObserveLease(LeaseExpired)
	}
}

// Events in a lease's life, as Config.ObserveLease reports them: a bounded
// set, fit for a metric label.
const (
	// LeaseIssued: Vault issued a credential (creds or static-creds read).
	LeaseIssued = "issued"
	// LeaseRenewed: Vault extended a lease.
	LeaseRenewed = "renewed"
	// LeaseRevoked: pgwarden revoked a lease it no longer needs while it
	// was still within Vault's TTL: itself (role scope), or with the
	// client-login Vault token that read it (identity scope).
	LeaseRevoked = "revoked"
	// LeaseExpired: a lease pgwarden let go that Vault ends without a
	// revocation: its TTL had run out, the revocation failed or was not
	// made (a stop without revoking, or one whose time ran out: it ends
	// with its TTL), or, for a static role, Vault rotated the password.
	LeaseExpired = "expired"
)

// observeGone reports a lease let go with a revocation that returned err:
// revoked when it succeeded before the lease's Vault end, expired otherwise.
func (b *Broker) observeGone(vaultEnd time.Time, err error) {
	if err == nil && b.cfg.Now().Before(vaultEnd) {
		b.cfg.ObserveLease(LeaseRevoked)
		return
	}
	b.cfg.ObserveLease(LeaseExpired)
}

// track adds n to the goroutines Close waits for, unless it is closed.
func (b *Broker) track(n int) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return false
	}
	b.wg.Add(n)
	return true
}

// revokeToken revokes a client login's Vault token, and with it every lease
// it read, and settles l with the outcome.
func (b *Broker) revokeToken(ctx context.Context, l *login) {
	vc, err := b.cfg.Client.Clone()
	if err == nil {
		vc.SetToken(l.vaultToken)
		ctx, cancel := context.WithTimeout(ctx, b.cfg.VaultTimeout)
		defer cancel()
		start := b.cfg.Now()
		err = vc.Auth().Token().RevokeSelfWithContext(ctx, "")
		b.cfg.ObserveVault("revoke", b.cfg.Now().Sub(start), err)
	} else {
		err = fmt.Errorf("vault client: %w", err)
	}
	b.settle(l, err)
	if err != nil && !b.cfg.Now().Before(l.vaultEnd) && !l.vaultEnd.IsZero() {
		return // Vault ended it already
	}
	if err != nil {
		b.cfg.Logger.Warn("could not revoke a client login's Vault token; it ends with its TTL", "error", err)
	}
}

// errNotRevoked settles a login whose Vault token pgwarden left to its TTL.
var errNotRevoked = errors.New("not revoked: left to its TTL")

// settle records what became of l's Vault token (err nil: revoked) and
// reports the leases that went with it, revoked or expired; a lease of l
// that finishes later is reported at once by the same outcome. Only the
// first call counts.
func (b *Broker) settle(l *login, err error) {
	b.mu.Lock()
	if l.settled {
		b.mu.Unlock()
		return
	}
	l.settled, l.settleErr = true, err
	ends := l.pendingEnds
	l.pendingEnds = nil
	b.mu.Unlock()
	for _, end := range ends {
		b.observeGone(end, err)
	}
}

// revokeLease revokes a role-scoped lease with pgwarden's own identity.
func (b *Broker) revokeLease(ctx context.Context, c *Credential) {
	vc, err := b.cfg.Self.client()
	if err != nil {
		b.cfg.ObserveLease(LeaseExpired) // not revoked: it ends with its TTL
		return
	}
	ctx, cancel := context.WithTimeout(ctx, b.cfg.VaultTimeout)
	defer cancel()
	vaultEnd := c.lease.vaultEndAt()
	start := b.cfg.Now()
	err = vc.Sys().RevokeWithContext(ctx, c.LeaseID)
	b.cfg.ObserveVault("revoke", b.cfg.Now().Sub(start), err)
	b.observeGone(vaultEnd, err)
	if err != nil {
		b.cfg.Logger.Warn("could not revoke a lease; it ends with its TTL", "credential", c, "error", err)
		return
	}
	b.cfg.Logger.Info("revoked lease", "credential", c)
}

// Close stops renewing. With revoke it also revokes, before it returns or
// ctx ends, every lease and client Vault token pgwarden holds (the
// sessions using them should have ended: call it after the proxy stopped).
// Without revoke they end with their TTLs. Either way each lease it takes
// over is reported (Config.ObserveLease) revoked, or expired when it was not
// revoked: Close did not (without revoke, a static role's, ctx ended first)
// or the revocation failed.
func (b *Broker) Close(ctx context.Context, revoke bool) error {
	b.mu.Lock()
	b.closed = true
	leases := make([]*Credential, 0, len(b.live))
	for c := range b.live {
		leases = append(leases, c)
	}
	tokens := make([]*login, 0, len(b.tokens))
	for l := range b.tokens {
		tokens = append(tokens, l)
		l.timer.Stop()
	}
	b.live, b.tokens, b.logins, b.creds = map[*Credential]struct{}{}, map[*login]struct{}{}, map[[sha256.Size]byte]*login{}, map[credKey]*Credential{}
	b.mu.Unlock()
	// An identity-scoped lease goes with the Vault token that read it: with
	// the revocation of its login below, with one under way (which settles
	// the login when it ends), or, when its login is settled, at once.
	ends := make(map[*Credential]time.Time, len(leases))
	for _, c := range leases {
		if c.by != nil {
			ends[c] = c.lease.vaultEndAt()
		}
	}
	type gone struct {
		end time.Time
		err error
	}
	var goneNow []gone
	b.mu.Lock()
	for c, end := range ends {
		if l := c.by; l.settled {
			goneNow = append(goneNow, gone{end, l.settleErr})
		} else {
			l.pendingEnds = append(l.pendingEnds, end)
		}
	}
	b.mu.Unlock()
	for _, g := range goneNow {
		b.observeGone(g.end, g.err)
	}
	for _, c := range leases {
		c.lease.stopTimers()
		c.lease.retire() // stops its renewal
	}
	// Eight at a time, each bounded by VaultTimeout and all by ctx: a Vault
	// that does not answer costs the shutdown ctx, no more.
	var g errgroup.Group
	g.SetLimit(8)
	for _, c := range leases {
		switch {
		case c.by != nil: // with its login
		case c.Scope == ScopeRole && !c.Static && revoke && ctx.Err() == nil:
			g.Go(func() error { b.revokeLease(ctx, c); return nil })
		default: // static (nothing to revoke), or left to its TTL
			b.cfg.ObserveLease(LeaseExpired)
		}
	}
	for _, l := range tokens {
		switch {
		case revoke && ctx.Err() == nil:
			g.Go(func() error { b.revokeToken(ctx, l); return nil })
		case revoke:
			b.settle(l, ctx.Err())
		default:
			b.settle(l, errNotRevoked)
		}
	}
	_ = g.Wait()
	done := make(chan struct{})
	go func() { b.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
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

// Leases describes every lease not yet finished, for the admin console.
func (b *Broker) Leases() []LeaseInfo {
	b.mu.Lock()
	creds := make([]*Credential, 0, len(b.live))
	for c := range b.live {
		creds = append(creds, c)
	}
	b.mu.Unlock()
	out := make([]LeaseInfo, 0, len(creds))
	for _, c := range creds {
		out = append(out, c.info())
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Database != out[j].Database {
			return out[i].Database < out[j].Database
		}
		return out[i].LeaseID < out[j].LeaseID
	})
	return out
}
