package testenv

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/MicahParks/jwkset"
	"github.com/golang-jwt/jwt/v5"
)

// Issuer is an in-process OIDC issuer on loopback: a discovery document, a JWKS
// with an RSA and an EC key, key rotation, and token minting. It also serves
// GET /mint for bin/devtoken; that endpoint exists only because this is a test
// issuer bound to loopback (testenv/cmd/devissuer, which serves it on a
// compose network, answers /mint to loopback callers only).
type Issuer struct {
	URL      string // issuer URL, no trailing slash
	Audience string // default aud of minted tokens

	srv *http.Server
	ln  net.Listener

	mu   sync.Mutex
	keys []signingKey // guarded by mu; keys[0] signs RS256 by default
	jwks *jwkset.MemoryJWKSet
}

type signingKey struct {
	kid    string
	alg    string
	method jwt.SigningMethod
	priv   crypto.Signer
}

// StartIssuer starts an issuer on 127.0.0.1 with a fresh RSA and EC key.
func StartIssuer(audience string) (*Issuer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	is, err := NewIssuer("http://"+ln.Addr().String(), audience)
	if err != nil {
		ln.Close()
		return nil, err
	}
	is.ln = ln
	is.srv = &http.Server{Handler: is.Handler(), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = is.srv.Serve(ln) }()
	return is, nil
}

// NewIssuer makes an issuer named url with a fresh RSA and EC key, without
// serving it: the caller serves Handler where url points (the compose dev
// issuer serves it over https on its network).
func NewIssuer(url, audience string) (*Issuer, error) {
	is := &Issuer{URL: url, Audience: audience, jwks: jwkset.NewMemoryStorage()}
	if err := is.addKey("RS256"); err != nil {
		return nil, err
	}
	if err := is.addKey("ES256"); err != nil {
		return nil, err
	}
	return is, nil
}

// Handler serves the discovery document, the JWKS and GET /mint.
func (is *Issuer) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"issuer":                                is.URL,
			"jwks_uri":                              is.URL + "/jwks",
			"id_token_signing_alg_values_supported": []string{"RS256", "ES256"},
			"response_types_supported":              []string{"id_token"},
			"subject_types_supported":               []string{"public"},
			"authorization_endpoint":                is.URL + "/authorize",
		})
	})
	mux.HandleFunc("GET /jwks", func(w http.ResponseWriter, r *http.Request) {
		raw, err := is.jwks.JSONPublic(r.Context())
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(raw)
	})
	mux.HandleFunc("GET /mint", is.serveMint)
	return mux
}

// Close stops the issuer StartIssuer started (one from NewIssuer has no
// server of its own).
func (is *Issuer) Close() error {
	if is.srv == nil {
		return nil
	}
	return is.srv.Close()
}

func (is *Issuer) addKey(alg string) error {
	var (
		priv   crypto.Signer
		method jwt.SigningMethod
		err    error
	)
	switch alg {
	case "RS256":
		priv, err = rsa.GenerateKey(rand.Reader, 2048)
		method = jwt.SigningMethodRS256
	case "ES256":
		priv, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		method = jwt.SigningMethodES256
	default:
		return fmt.Errorf("testenv: unsupported alg %s", alg)
	}
	if err != nil {
		return err
	}
	kid := fmt.Sprintf("%s-%d", strings.ToLower(alg), time.Now().UnixNano())
	jwk, err := jwkset.NewJWKFromKey(priv.Public(), jwkset.JWKOptions{Metadata: jwkset.JWKMetadataOptions{
		ALG: jwkset.ALG(alg), KID: kid, USE: jwkset.UseSig}})
	if err != nil {
		return err
	}
	if err := is.jwks.KeyWrite(context.Background(), jwk); err != nil {
		return err
	}
	is.mu.Lock()
	defer is.mu.Unlock()
	is.keys = append([]signingKey{{kid: kid, alg: alg, method: method, priv: priv}}, is.keys...)
	return nil
}

// Rotate adds a new key for alg ("RS256" or "ES256") that signs from now on.
// Old keys stay published, as an IdP keeps them during rotation.
func (is *Issuer) Rotate(alg string) error { return is.addKey(alg) }

// Claims describes a token to mint. Zero fields get defaults: Audience the
// issuer's, TTL 1h, Alg RS256, Issuer the issuer's URL.
type Claims struct {
	Subject  string
	Groups   []string
	Audience string
	Issuer   string
	TTL      time.Duration // negative mints an expired token
	NotYet   time.Duration // nbf this far in the future
	Alg      string        // "RS256", "ES256", or "none"
	Extra    map[string]any
}

// Mint signs a token.
func (is *Issuer) Mint(c Claims) (string, error) {
	if c.Audience == "" {
		c.Audience = is.Audience
	}
	if c.Issuer == "" {
		c.Issuer = is.URL
	}
	if c.TTL == 0 {
		c.TTL = time.Hour
	}
	if c.Alg == "" {
		c.Alg = "RS256"
	}
	now := time.Now()
	claims := jwt.MapClaims{
		"sub": c.Subject, "aud": c.Audience, "iss": c.Issuer,
		"iat": now.Add(-time.Second).Unix(), "exp": now.Add(c.TTL).Unix(),
		"preferred_username": c.Subject,
	}
	if c.TTL < 0 {
		claims["iat"] = now.Add(2 * c.TTL).Unix()
	}
	if c.Groups != nil {
		claims["groups"] = c.Groups
	}
	if c.NotYet > 0 {
		claims["nbf"] = now.Add(c.NotYet).Unix()
	}
	for k, v := range c.Extra {
		claims[k] = v
	}
	if c.Alg == "none" {
		return jwt.NewWithClaims(jwt.SigningMethodNone, claims).SignedString(jwt.UnsafeAllowNoneSignatureType)
	}
	is.mu.Lock()
	var key *signingKey
	for i := range is.keys {
		if is.keys[i].alg == c.Alg {
			key = &is.keys[i]
			break
		}
	}
	is.mu.Unlock()
	if key == nil {
		return "", fmt.Errorf("testenv: issuer has no %s key", c.Alg)
	}
	t := jwt.NewWithClaims(key.method, claims)
	t.Header["kid"] = key.kid
	return t.SignedString(key.priv)
}

// MintForeign signs a well-formed token with a key the issuer does not publish,
// under a kid it does: a bad signature.
func (is *Issuer) MintForeign(c Claims) (string, error) {
	tok, err := is.Mint(c)
	if err != nil {
		return "", err
	}
	other, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return "", err
	}
	parts := strings.Split(tok, ".")
	signingString := parts[0] + "." + parts[1]
	sig, err := jwt.SigningMethodRS256.Sign(signingString, other)
	if err != nil {
		return "", err
	}
	return signingString + "." + base64.RawURLEncoding.EncodeToString(sig), nil
}

// serveMint mints a token: /mint?sub=alice&groups=a,b&ttl=1h&aud=x.
func (is *Issuer) serveMint(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	c := Claims{Subject: q.Get("sub"), Audience: q.Get("aud"), Alg: q.Get("alg")}
	if c.Subject == "" {
		http.Error(w, "sub is required", http.StatusBadRequest)
		return
	}
	if g := q.Get("groups"); g != "" {
		c.Groups = strings.Split(g, ",")
	} else {
		c.Groups = []string{}
	}
	if t := q.Get("ttl"); t != "" {
		d, err := time.ParseDuration(t)
		if err != nil {
			if secs, err2 := strconv.Atoi(t); err2 == nil {
				d = time.Duration(secs) * time.Second
			} else {
				http.Error(w, "ttl: "+err.Error(), http.StatusBadRequest)
				return
			}
		}
		c.TTL = d
	}
	tok, err := is.Mint(c)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	_, _ = fmt.Fprintln(w, tok)
}
