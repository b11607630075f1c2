package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
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
	// ownToken: pgwarden created the token by logging in, so it revokes it.
	ownToken bool

	stop chan struct{}
	done chan struct{}
}

// NewSelf logs in (or looks the given token up) and starts keeping the token
// alive. client supplies the address and TLS; it is not changed.
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
	s := &Self{cfg: cfg, base: client, log: log, ownToken: cfg.Method != "token",
		stop: make(chan struct{}), done: make(chan struct{})}
	sec, err := s.login(ctx)
	if err != nil {
		return nil, err
	}
	go s.keepAlive(sec)
	return s, nil
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
			b, err := os.ReadFile(s.cfg.TokenFile)
			if err != nil {
				return nil, fmt.Errorf("vault token file: %w", err)
			}
			tok = strings.TrimSpace(string(b))
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
		b, err := os.ReadFile(s.cfg.SecretFile)
		if err != nil {
			return nil, fmt.Errorf("vault %s secret file: %w", s.cfg.Method, err)
		}
		body := map[string]any{"role_id": s.cfg.Role, "secret_id": strings.TrimSpace(string(b))}
		if s.cfg.Method == "kubernetes" {
			body = map[string]any{"role": s.cfg.Role, "jwt": strings.TrimSpace(string(b))}
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
	s.mu.Unlock()
	s.log.Info("logged in to Vault as pgwarden", "method", s.cfg.Method, "ttl", time.Duration(sec.Auth.LeaseDuration)*time.Second)
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
			if err != nil {
				s.log.Warn("renewing pgwarden's Vault token failed", "error", err)
			}
		} else {
			<-s.stop // a token without TTL (a root token, in development) needs no care
			return
		}
		select {
		case <-s.stop:
			return
		default:
		}
		if s.cfg.Method == "token" {
			s.log.Error("pgwarden's Vault token can be renewed no further; role-scoped credentials fail once it ends: give pgwarden a new token and restart it, or use approle or kubernetes auth")
			<-s.stop
			return
		}
		for attempt := 0; ; attempt++ {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			next, err := s.login(ctx)
			cancel()
			if err == nil {
				sec = next
				break
			}
			d := Backoff(attempt)
			s.log.Warn("logging in to Vault as pgwarden failed; retrying", "error", err, "in", d)
			select {
			case <-s.stop:
				return
			case <-time.After(d):
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
		case <-s.stop:
			return nil
		case <-w.RenewCh():
		case err := <-w.DoneCh():
			return err
		}
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
	vc, err := s.base.Clone()
	if err != nil {
		return nil, pgerror.Wrap(err, pgerror.InternalError, "pgwarden internal error")
	}
	s.mu.Lock()
	vc.SetToken(s.token)
	s.mu.Unlock()
	return vc, nil
}

// Close stops renewing and, with revoke, revokes a token pgwarden obtained
// by logging in (never one the operator gave it).
func (s *Self) Close(ctx context.Context, revoke bool) error {
	select {
	case <-s.stop:
		return nil
	default:
		close(s.stop)
	}
	<-s.done
	if !revoke || !s.ownToken {
		return nil
	}
	vc, err := s.client()
	if err != nil {
		return err
	}
	return vc.Auth().Token().RevokeSelfWithContext(ctx, "")
}
