package authn

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/MicahParks/keyfunc/v3"
	"github.com/golang-jwt/jwt/v5"
	"golang.org/x/time/rate"

	"github.com/pgwarden/pgwarden/pgerror"
)

// DefaultAlgorithms are the signature algorithms accepted when Config.Algorithms
// is empty: asymmetric only.
var DefaultAlgorithms = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}

// MaxLeeway bounds Config.Leeway: clock skew beyond this is a broken clock, not skew.
const MaxLeeway = 5 * time.Minute

// Config configures a Verifier.
type Config struct {
	// IssuerURL is the OIDC issuer; its discovery document
	// (IssuerURL + "/.well-known/openid-configuration") names the JWKS. Used
	// when JWKSURL is empty. It is also the expected iss when Issuer is empty.
	// It must pass CheckFetchURL (https, or http to a loopback host), and the
	// discovery document must name Issuer as its issuer.
	IssuerURL string
	// JWKSURL names the JWKS directly, skipping discovery. It must pass
	// CheckFetchURL.
	JWKSURL string
	// Issuer is the required iss claim. Defaults to IssuerURL; one of them must be set.
	Issuer string
	// Audiences lists accepted aud values; a token must carry at least one. Required.
	Audiences []string
	// Algorithms is the allow-list of signature algorithms. Defaults to
	// DefaultAlgorithms. "none" and HS* are refused at New.
	Algorithms []string
	// Leeway is the clock skew allowed on exp, nbf and iat. Default 30s, at most MaxLeeway.
	Leeway time.Duration
	// SubjectClaim is the claim path of the subject. Default "sub".
	SubjectClaim string
	// GroupsClaim is the dotted claim path of the groups, e.g. "groups" or
	// "realm_access.roles". Default "groups".
	GroupsClaim string
	// HTTPClient fetches discovery and JWKS documents. Default: a client with a 10s timeout.
	HTTPClient *http.Client
	// CacheTTL is how long a verified token's Identity is remembered, keyed
	// by the token's SHA-256 (never the token), so that an application's pool
	// reconnecting with the same token pays for the signature check once: at
	// most CacheTTL, and never past the token's exp. A key the issuer
	// withdraws stops a cached token only after CacheTTL. Default 1m;
	// negative disables the cache.
	CacheTTL time.Duration
	// CacheSize bounds the number of tokens remembered. Default 10000.
	CacheSize int
	// RefreshInterval is how often the JWKS is fetched again. Default 5m. A token
	// signed by an unknown key also triggers a refresh, at most every 10s.
	RefreshInterval time.Duration
}

func (c *Config) checkAndSetDefaults() error {
	if c.IssuerURL == "" && c.JWKSURL == "" {
		return errors.New("authn: one of IssuerURL or JWKSURL is required")
	}
	if c.IssuerURL != "" {
		if err := CheckFetchURL(c.IssuerURL); err != nil {
			return fmt.Errorf("authn: IssuerURL: %w", err)
		}
	}
	if c.JWKSURL != "" {
		if err := CheckFetchURL(c.JWKSURL); err != nil {
			return fmt.Errorf("authn: JWKSURL: %w", err)
		}
	}
	if c.Issuer == "" {
		c.Issuer = strings.TrimSuffix(c.IssuerURL, "/")
	}
	if c.Issuer == "" {
		return errors.New("authn: Issuer is required when only JWKSURL is set")
	}
	if len(c.Audiences) == 0 {
		return errors.New("authn: at least one audience is required")
	}
	if len(c.Algorithms) == 0 {
		c.Algorithms = DefaultAlgorithms
	}
	for _, a := range c.Algorithms {
		if !slices.Contains(DefaultAlgorithms, a) {
			return fmt.Errorf("authn: algorithm %q is not allowed (only asymmetric algorithms: %s)", a, strings.Join(DefaultAlgorithms, ", "))
		}
	}
	switch {
	case c.Leeway == 0:
		c.Leeway = 30 * time.Second
	case c.Leeway < 0 || c.Leeway > MaxLeeway:
		return fmt.Errorf("authn: leeway %v is outside 0..%v", c.Leeway, MaxLeeway)
	}
	if c.SubjectClaim == "" {
		c.SubjectClaim = "sub"
	}
	if c.GroupsClaim == "" {
		c.GroupsClaim = "groups"
	}
	if c.HTTPClient == nil {
		c.HTTPClient = &http.Client{Timeout: 10 * time.Second}
	}
	if c.CacheTTL == 0 {
		c.CacheTTL = time.Minute
	}
	if c.CacheSize <= 0 {
		c.CacheSize = 10000
	}
	if c.RefreshInterval == 0 {
		c.RefreshInterval = 5 * time.Minute
	}
	return nil
}

// Verifier verifies tokens. It is safe for concurrent use. Close stops its
// background JWKS refresh.
type Verifier struct {
	cfg    Config
	keys   keyfunc.Keyfunc
	parser *jwt.Parser
	cancel context.CancelFunc

	mu    sync.Mutex
	cache map[[sha256.Size]byte]cachedIdentity // guarded by mu; see Config.CacheTTL
}

type cachedIdentity struct {
	id    *Identity
	until time.Time
}

// New fetches the JWKS (after discovery, when configured so) and returns a
// Verifier. It fails when the keys cannot be fetched, when IssuerURL, JWKSURL
// or the discovered jwks_uri fails CheckFetchURL, and when the discovery
// document names an issuer other than the expected one (Issuer, default
// IssuerURL; trailing slashes do not count), so a misconfigured issuer is
// found at start, not at the first login.
func New(ctx context.Context, cfg Config) (*Verifier, error) {
	if err := cfg.checkAndSetDefaults(); err != nil {
		return nil, err
	}
	jwksURL := cfg.JWKSURL
	if jwksURL == "" {
		u, err := discoverJWKS(ctx, cfg.HTTPClient, cfg.IssuerURL, cfg.Issuer)
		if err != nil {
			return nil, err
		}
		jwksURL = u
	}
	bg, cancel := context.WithCancel(context.Background())
	no := false
	keys, err := keyfunc.NewDefaultOverrideCtx(bg, []string{jwksURL}, keyfunc.Override{
		Client:                    cfg.HTTPClient,
		NoErrorReturnFirstHTTPReq: &no,
		RefreshInterval:           cfg.RefreshInterval,
		RefreshUnknownKID:         rate.NewLimiter(rate.Every(10*time.Second), 1),
		RateLimitWaitMax:          time.Second,
	})
	if err != nil {
		cancel()
		return nil, fmt.Errorf("authn: fetch JWKS %s: %w", jwksURL, err)
	}
	return &Verifier{
		cfg:   cfg,
		keys:  keys,
		cache: map[[sha256.Size]byte]cachedIdentity{},
		parser: jwt.NewParser(
			jwt.WithValidMethods(cfg.Algorithms),
			jwt.WithIssuer(cfg.Issuer),
			jwt.WithAudience(cfg.Audiences...),
			jwt.WithExpirationRequired(),
			jwt.WithLeeway(cfg.Leeway),
			jwt.WithIssuedAt(),
		),
		cancel: cancel,
	}, nil
}

// Close stops the background JWKS refresh. It is idempotent.
func (v *Verifier) Close() { v.cancel() }

// KeysLoaded returns how many signing keys the verifier holds now, for
// readiness: with none, no token can be verified. It reads what the last
// fetch stored and fetches nothing.
func (v *Verifier) KeysLoaded(ctx context.Context) (int, error) {
	keys, err := v.keys.Storage().KeyReadAll(ctx)
	if err != nil {
		return 0, fmt.Errorf("authn: read the JWKS: %w", err)
	}
	return len(keys), nil
}

// discoverJWKS reads the OIDC discovery document under issuerURL and returns
// its jwks_uri. The document must name expected (the iss tokens must carry) as
// its issuer, as OpenID Connect Discovery 1.0 section 4.3 requires, and its
// jwks_uri must pass CheckFetchURL.
func discoverJWKS(ctx context.Context, client *http.Client, issuerURL, expected string) (string, error) {
	u := strings.TrimSuffix(issuerURL, "/") + "/.well-known/openid-configuration"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", fmt.Errorf("authn: discovery: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("authn: discovery: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("authn: discovery %s: HTTP %d", u, resp.StatusCode)
	}
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&doc); err != nil {
		return "", fmt.Errorf("authn: discovery %s: %w", u, err)
	}
	if strings.TrimSuffix(doc.Issuer, "/") != strings.TrimSuffix(expected, "/") {
		return "", fmt.Errorf("authn: discovery document at %s names issuer %q, but tokens are expected from %q (oidc.issuer, default oidc.issuer_url)",
			u, doc.Issuer, expected)
	}
	if doc.JWKSURI == "" {
		return "", fmt.Errorf("authn: discovery %s: no jwks_uri", u)
	}
	if err := CheckFetchURL(doc.JWKSURI); err != nil {
		return "", fmt.Errorf("authn: discovery %s: jwks_uri: %w", u, err)
	}
	return doc.JWKSURI, nil
}

// IsLoopbackHost reports whether host (a URL's Hostname: no port, no
// brackets) names this machine without leaving it: an IP address in
// 127.0.0.0/8 or ::1 (also as an IPv4-mapped IPv6 address), or "localhost"
// in any case. Other names are not resolved, so a name that happens to resolve
// to a loopback address is not loopback here.
func IsLoopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.Unmap().IsLoopback()
}

// CheckFetchURL returns nil when raw is a URL that signing keys (an OIDC
// discovery document or a JWKS) may be fetched from: an absolute https URL
// with a host, or an http URL whose host is loopback (see IsLoopbackHost).
// Otherwise it returns an error that says why; the error quotes raw with any
// password in it redacted, and does not quote a raw that does not parse.
func CheckFetchURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return fmt.Errorf("not a valid URL: %w", err)
	}
	shown := u.Redacted()
	if u.Scheme != "https" && u.Scheme != "http" {
		return fmt.Errorf("%q is not an https:// URL (scheme %q; http:// is allowed only to a loopback host)", shown, u.Scheme)
	}
	if u.Host == "" || u.Hostname() == "" {
		return fmt.Errorf("%q has no host", shown)
	}
	if u.Scheme == "http" && !IsLoopbackHost(u.Hostname()) {
		return fmt.Errorf("%q uses plain http to %q, which is not a loopback host (127.0.0.0/8, ::1, localhost): "+
			"tokens' signing keys fetched over plain http can be replaced by anyone on the path; use https", shown, u.Hostname())
	}
	return nil
}

// TokenError is why a token was refused. Reason is one of the Reason* constants.
type TokenError struct {
	Reason string
	Err    error
}

// Reasons a token is refused; bounded, fit for metric labels.
const (
	ReasonMalformed  = "malformed"
	ReasonSignature  = "signature"
	ReasonAlgorithm  = "algorithm"
	ReasonExpired    = "expired"
	ReasonNotYet     = "not_yet_valid"
	ReasonAudience   = "audience"
	ReasonIssuer     = "issuer"
	ReasonNoSubject  = "no_subject"
	ReasonUnknownKey = "unknown_key"
)

func (e *TokenError) Error() string { return "token rejected (" + e.Reason + "): " + e.Err.Error() }
func (e *TokenError) Unwrap() error { return e.Err }

var reasonText = map[string]string{
	ReasonMalformed:  "the password is not a well-formed JWT",
	ReasonSignature:  "its signature does not verify against the issuer's keys",
	ReasonAlgorithm:  "its signing algorithm is not allowed",
	ReasonExpired:    "it has expired",
	ReasonNotYet:     "it is not valid yet",
	ReasonAudience:   "its audience is not accepted here",
	ReasonIssuer:     "its issuer is not trusted here",
	ReasonNoSubject:  "it has no subject",
	ReasonUnknownKey: "it is signed by a key the issuer does not publish",
}

func refuse(reason string, err error) error {
	return &pgerror.Error{
		Code:    pgerror.InvalidPassword,
		Message: "token rejected: " + reasonText[reason],
		Hint:    "Send a current token from the configured identity provider as the password.",
		Err:     &TokenError{Reason: reason, Err: err},
	}
}

// Verify checks token and returns the Identity it speaks for. Every refusal is
// a *TokenError (find it with errors.As) wrapped in a *pgerror.Error with
// SQLSTATE 28P01. A token verified in the last CacheTTL (and not expired
// since) is not checked again; the Identity returned is then the same one,
// and must not be modified.
func (v *Verifier) Verify(ctx context.Context, token string) (*Identity, error) {
	if v.cfg.CacheTTL < 0 {
		return v.verify(ctx, token)
	}
	key := sha256.Sum256([]byte(token))
	now := time.Now()
	v.mu.Lock()
	e, ok := v.cache[key]
	v.mu.Unlock()
	if ok && now.Before(e.until) {
		return e.id, nil
	}
	id, err := v.verify(ctx, token)
	if err != nil {
		return nil, err
	}
	until := now.Add(v.cfg.CacheTTL)
	if id.Expiry.Before(until) {
		until = id.Expiry
	}
	v.mu.Lock()
	if len(v.cache) >= v.cfg.CacheSize {
		// Sweep the expired; if that frees less than a tenth, drop entries
		// at random until a tenth is free, so a full cache is swept once
		// per tenth of its size, not on every insert.
		for k, e := range v.cache {
			if !now.Before(e.until) {
				delete(v.cache, k)
			}
		}
		for k := range v.cache {
			if len(v.cache) <= v.cfg.CacheSize-max(v.cfg.CacheSize/10, 1) {
				break
			}
			delete(v.cache, k)
		}
	}
	v.cache[key] = cachedIdentity{id: id, until: until}
	v.mu.Unlock()
	return id, nil
}

// verify checks token's signature and claims.
func (v *Verifier) verify(ctx context.Context, token string) (*Identity, error) {
	claims := jwt.MapClaims{}
	_, err := v.parser.ParseWithClaims(token, claims, v.keys.KeyfuncCtx(ctx))
	if err != nil {
		return nil, refuse(v.classify(token, err), err)
	}
	id := &Identity{
		Subject: stringClaim(claims, v.cfg.SubjectClaim),
		Groups:  stringsClaim(claims, v.cfg.GroupsClaim),
		Issuer:  stringClaim(claims, "iss"),
	}
	if id.Subject == "" {
		return nil, refuse(ReasonNoSubject, errors.New("empty subject claim "+v.cfg.SubjectClaim))
	}
	for _, c := range []string{"preferred_username", "email", "name"} {
		if id.Name = stringClaim(claims, c); id.Name != "" {
			break
		}
	}
	if id.Name == "" {
		id.Name = id.Subject
	}
	exp, err := claims.GetExpirationTime()
	if err != nil || exp == nil {
		return nil, refuse(ReasonMalformed, errors.New("no exp"))
	}
	id.Expiry = exp.Time
	return id, nil
}

func (v *Verifier) classify(token string, err error) string {
	if errors.Is(err, jwt.ErrTokenSignatureInvalid) || errors.Is(err, jwt.ErrTokenUnverifiable) {
		// jwt reports an algorithm outside the allow-list as an invalid
		// signature; tell the two apart from the (unverified) header.
		if t, _, perr := jwt.NewParser().ParseUnverified(token, jwt.MapClaims{}); perr == nil {
			if alg, _ := t.Header["alg"].(string); !slices.Contains(v.cfg.Algorithms, alg) {
				return ReasonAlgorithm
			}
		}
	}
	switch {
	case errors.Is(err, jwt.ErrTokenExpired):
		return ReasonExpired
	case errors.Is(err, jwt.ErrTokenNotValidYet), errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return ReasonNotYet
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return ReasonAudience
	case errors.Is(err, jwt.ErrTokenInvalidIssuer):
		return ReasonIssuer
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return ReasonSignature
	case errors.Is(err, jwt.ErrTokenMalformed):
		return ReasonMalformed
	case errors.Is(err, keyfunc.ErrKeyfunc):
		return ReasonUnknownKey
	}
	return ReasonMalformed
}
