package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/pgwarden/pgwarden/pgerror"
)

// SelfConfig says how pgwarden logs in to Vault as itself.
type SelfConfig struct {
	// Method is "token", "approle" or "kubernetes".
	Method string
	// Mount is the auth method's path; default the method's name.
	Mount string
	// TokenFile (method token) holds the token; empty: the client's own
	// token (VAULT_TOKEN).
	TokenFile string
	// Role is the AppRole role_id or the Kubernetes auth role.
	Role string
	// SecretFile holds the AppRole secret_id, or the Kubernetes service
	// account token (default the pod's own).
	SecretFile string
}

// DefaultServiceAccountTokenFile is where a Kubernetes pod finds its token.
const DefaultServiceAccountTokenFile = "/var/run/secrets/kubernetes.io/serviceaccount/token"

// Self is pgwarden's own Vault identity: the token that reads, renews and
// revokes role-scoped leases. It keeps the token alive with vault/api's
// LifetimeWatcher; when the token can be renewed no further it logs in
// again (approle, kubernetes), retrying with backoff and jitter while Vault
// is away. A token given by the operator (method token) is renewed while it
// can be and never revoked: it is the operator's.
type Self struct {
	cfg  SelfConfig
	base *vault.Client
	log  *slog.Logger

	mu       sync.Mutex
	token    string // guarded by mu
	accessor string // guarded by mu
	epoch    *epoch // guarded by mu: the life of the current token
	// kick asks keepAlive to log in again now: Vault refused the current
	// token (revoked behind pgwarden's back).
	kick     chan struct{}
	checking atomic.Bool // refused is asking Vault about a token
	// ownToken: pgwarden created the token by logging in, so it revokes it.
	ownToken bool

	// ctx ends when Close is called, cancelling a login in progress.
	ctx      context.Context
	stopOnce sync.Once
	stop     context.CancelFunc
	done     chan struct{} // closed when keepAlive has returned
}

// epoch is the life of one of Self's tokens. Vault revokes a token's leases
// when the token ends, so every lease read with it must end no later: ctx
// ends when the token will be renewed no further (it reached its max TTL, a
// new login replaces it, or Vault refused it), and end is then when the
// token ends.
type epoch struct {
	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex
	end    time.Time // zero: no end (a token without TTL)
}

func newEpoch(now time.Time, ttlSeconds int) *epoch {
	e := &epoch{}
	e.ctx, e.cancel = context.WithCancel(context.Background())
	if ttlSeconds > 0 {
		e.end = now.Add(time.Duration(ttlSeconds) * time.Second)
	}
	return e
}

// endsAt is when the token ends as things stand.
func (e *epoch) endsAt() time.Time {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.end
}

func (e *epoch) renewed(at time.Time, ttlSeconds int) {
	e.mu.Lock()
	e.end = at.Add(time.Duration(ttlSeconds) * time.Second)
	e.mu.Unlock()
}

// NewSelf logs in (or looks the given token up) and starts keeping the token
// alive. client supplies the address and TLS; it is not changed. It checks
// cfg and reads the token or secret file before it calls Vault, and its
// error names what is missing: the file, or VAULT_TOKEN.
func NewSelf(ctx context.Context, client *vault.Client, cfg SelfConfig, log *slog.Logger) (*Self, error) {
	if log == nil {
		log = slog.Default()
	}
	switch cfg.Method {
	case "token", "approle", "kubernetes":
	default:
		return nil, fmt.Errorf("broker: unknown Vault auth method %q (token, approle, kubernetes)", cfg.Method)
	}
	cfg.Mount = MountPath(cfg.Mount, cfg.Method)
	if cfg.Method == "kubernetes" && cfg.SecretFile == "" {
		cfg.SecretFile = DefaultServiceAccountTokenFile
	}
	if cfg.Method != "token" && cfg.Role == "" {
		return nil, fmt.Errorf("vault auth method %s: no role (set vault.auth.role: the AppRole role_id or the Kubernetes auth role)", cfg.Method)
	}
	if cfg.Method == "approle" && cfg.SecretFile == "" {
		return nil, errors.New("vault auth method approle: no secret_id file (set vault.auth.secret_file)")
	}
	s := &Self{cfg: cfg, base: client, log: log, ownToken: cfg.Method != "token", done: make(chan struct{}),
		kick: make(chan struct{}, 1)}
	s.ctx, s.stop = context.WithCancel(context.Background())
	sec, err := s.login(ctx)
	if err != nil {
		s.stop()
		return nil, err
	}
	go s.keepAlive(sec)
	return s, nil
}

// readSecret reads a token or secret_id from path, without the white space
// around it; what names it in errors, which never hold its content.
func readSecret(path, what string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", what, err) // *fs.PathError names the file
	}
	v := strings.TrimSpace(string(b))
	if v == "" {
		return "", fmt.Errorf("%s %s is empty", what, path)
	}
	return v, nil
}

// login obtains a token and returns it as an auth secret the
// LifetimeWatcher can renew.
func (s *Self) login(ctx context.Context) (*vault.Secret, error) {
	vc, err := s.base.Clone()
	if err != nil {
		return nil, err
	}
	var sec *vault.Secret
	switch s.cfg.Method {
	case "token":
		tok := s.base.Token()
		if s.cfg.TokenFile != "" {
			if tok, err = readSecret(s.cfg.TokenFile, "vault token file"); err != nil {
				return nil, err
			}
		}
		if tok == "" {
			return nil, errors.New("vault auth method token: no token (set vault.auth.token_file or VAULT_TOKEN)")
		}
		vc.SetToken(tok)
		look, err := vc.Auth().Token().LookupSelfWithContext(ctx)
		if err != nil {
			return nil, fmt.Errorf("vault token lookup: %w", err)
		}
		ttl, _ := look.TokenTTL()
		renewable, _ := look.TokenIsRenewable()
		accessor, _ := look.TokenAccessor()
		sec = &vault.Secret{Auth: &vault.SecretAuth{ClientToken: tok, Accessor: accessor, Renewable: renewable, LeaseDuration: int(ttl.Seconds())}}
	case "approle", "kubernetes":
		// Read at every login: a projected service account token is
		// rotated by the kubelet, a secret_id by whoever delivers it.
		what := "vault approle secret_id file"
		if s.cfg.Method == "kubernetes" {
			what = "vault kubernetes service account token file"
		}
		secret, err := readSecret(s.cfg.SecretFile, what)
		if err != nil {
			return nil, err
		}
		body := map[string]any{"role_id": s.cfg.Role, "secret_id": secret}
		if s.cfg.Method == "kubernetes" {
			body = map[string]any{"role": s.cfg.Role, "jwt": secret}
		}
		vc.ClearToken()
		sec, err = vc.Logical().WriteWithContext(ctx, "auth/"+s.cfg.Mount+"/login", body)
		if err != nil {
			return nil, fmt.Errorf("vault %s login: %w", s.cfg.Method, err)
		}
		if sec == nil || sec.Auth == nil || sec.Auth.ClientToken == "" {
			return nil, fmt.Errorf("vault %s login: Vault returned no token", s.cfg.Method)
		}
	}
	s.mu.Lock()
	s.token, s.accessor = sec.Auth.ClientToken, sec.Auth.Accessor
	old := s.epoch
	s.epoch = newEpoch(time.Now(), sec.Auth.LeaseDuration)
	s.mu.Unlock()
	if old != nil {
		old.cancel() // its leases retire, and end when it does
	}
	s.log.Info("logged in to Vault as pgwarden", "method", s.cfg.Method, "accessor", sec.Auth.Accessor,
		"ttl", time.Duration(sec.Auth.LeaseDuration)*time.Second, "renewable", sec.Auth.Renewable)
	return sec, nil
}

// keepAlive renews the token until it can be renewed no further, then logs
// in again.
func (s *Self) keepAlive(sec *vault.Secret) {
	defer close(s.done)
	for {
		if sec.Auth.LeaseDuration > 0 {
			vc, err := s.client()
			if err == nil {
				err = s.watch(vc, sec)
			}
			if err != nil && !errors.Is(err, errKicked) {
				s.log.Warn("renewing pgwarden's Vault token failed", "error", err)
			}
			s.endEpoch() // renewed no further: what it read must go before it does
		} else {
			// A token without TTL (a root token, in development) needs no
			// care, unless Vault refuses it.
			select {
			case <-s.ctx.Done():
				return
			case <-s.kick:
				s.kick <- struct{}{} // read back below
				s.endEpoch()
			}
		}
		if s.ctx.Err() != nil {
			return
		}
		kicked := s.kicked()
		if s.cfg.Method == "token" && !kicked {
			s.log.Error("pgwarden's Vault token can be renewed no further; role-scoped credentials fail once it ends: give pgwarden a new token and restart it, or use approle or kubernetes auth")
			<-s.ctx.Done()
			return
		}
		for attempt := 0; ; attempt++ {
			ctx, cancel := context.WithTimeout(s.ctx, 30*time.Second)
			next, err := s.login(ctx)
			cancel()
			if err == nil {
				sec = next
				break
			}
			if s.ctx.Err() != nil {
				return
			}
			d := Backoff(attempt)
			s.log.Warn("logging in to Vault as pgwarden failed; retrying", "error", err, "in", d)
			t := time.NewTimer(d)
			select {
			case <-s.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
	}
}

// watch runs a LifetimeWatcher on sec until it stops.
func (s *Self) watch(vc *vault.Client, sec *vault.Secret) error {
	w, err := vc.NewLifetimeWatcher(&vault.LifetimeWatcherInput{Secret: sec})
	if err != nil {
		return err
	}
	go w.Start()
	defer w.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return nil
		case <-s.kick:
			s.kick <- struct{}{} // keepAlive reads it back (kicked)
			return errKicked
		case r := <-w.RenewCh():
			if r.Secret != nil && r.Secret.Auth != nil {
				s.currentEpoch().renewed(r.RenewedAt, r.Secret.Auth.LeaseDuration)
			}
		case err := <-w.DoneCh():
			return err
		}
	}
}

// errKicked: the token was refused, and is replaced at once.
var errKicked = errors.New("Vault refused pgwarden's token")

// kicked reports (and clears) a refusal of the current token.
func (s *Self) kicked() bool {
	select {
	case <-s.kick:
		return true
	default:
		return false
	}
}

// refused says Vault answered 403 to a read with token. A 403 means a
// revoked token or a policy that does not cover the path (a level added and
// vault-init not run again), and only the first is cured by logging in
// again — which retires every role-scoped lease. So Self asks Vault about
// the token itself first (once at a time, in the background); only when
// Vault does not know it any more, and no new login replaced it already,
// is it ended and replaced now (vault/api's renewal watcher cannot tell a
// revoked token from one it may not renew, so Self would not notice).
func (s *Self) refused(token string) {
	if !s.checking.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer s.checking.Store(false)
		vc, err := s.base.Clone()
		if err != nil {
			return
		}
		vc.SetToken(token)
		ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
		defer cancel()
		_, err = vc.Auth().Token().LookupSelfWithContext(ctx)
		var re *vault.ResponseError
		if err == nil || !errors.As(err, &re) || re.StatusCode != http.StatusForbidden {
			if err == nil {
				s.log.Error("Vault refused a read with pgwarden's own token, which is valid: its policy does not cover the path (run pgwarden vault-init again?)")
			}
			return
		}
		s.mu.Lock()
		current := s.token == token
		s.mu.Unlock()
		if !current {
			return
		}
		s.log.Warn("Vault no longer knows pgwarden's own token (revoked?); logging in again")
		s.endEpoch()
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}()
}

func (s *Self) currentEpoch() *epoch {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.epoch
}

// endEpoch ends the current token's epoch: leases read with it retire.
func (s *Self) endEpoch() {
	if e := s.currentEpoch(); e != nil {
		e.cancel()
	}
}

// Backoff is the wait before retry n (from 0) of a failed call to Vault:
// with d = 500ms doubled n times and capped at 30s, a random wait in
// [d/2, d], so many pgwarden instances do not retry in step. A negative n
// counts as 0.
func Backoff(n int) time.Duration {
	d := min(500*time.Millisecond<<min(max(n, 0), 6), 30*time.Second)
	return d/2 + rand.N(d/2+1)
}

// Accessor returns the accessor of pgwarden's current Vault token: not a
// secret, it names the token in Vault's audit log and lets an operator look
// it up or revoke it. It changes when Self logs in again.
func (s *Self) Accessor() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accessor
}

// client returns a Vault client with pgwarden's current token.
func (s *Self) client() (*vault.Client, error) {
	vc, _, err := s.clientAndEpoch()
	return vc, err
}

// clientAndEpoch returns a Vault client with pgwarden's current token and
// that token's epoch (nil for a Self made without a login, in tests).
func (s *Self) clientAndEpoch() (*vault.Client, *epoch, error) {
	vc, err := s.base.Clone()
	if err != nil {
		return nil, nil, pgerror.Wrap(err, pgerror.InternalError, "pgwarden internal error")
	}
	s.mu.Lock()
	vc.SetToken(s.token)
	e := s.epoch
	s.mu.Unlock()
	return vc, e, nil
}

// Close stops renewing, cancelling a login in progress, and, with revoke,
// revokes the token pgwarden obtained by logging in last (never one the
// operator gave it). It returns when that is done or ctx ends. Only the
// first call does anything; Close is safe for concurrent use.
func (s *Self) Close(ctx context.Context, revoke bool) error {
	first := false
	s.stopOnce.Do(func() { first = true; s.stop() })
	if !first {
		return nil
	}
	select {
	case <-s.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if !revoke || !s.ownToken {
		return nil
	}
	vc, err := s.client()
	if err != nil {
		return err
	}
	return vc.Auth().Token().RevokeSelfWithContext(ctx, "")
}
